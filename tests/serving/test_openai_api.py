"""The OpenAI endpoints through the real `openai` client against a live server: chat, stream, PML, usage, caching."""

import concurrent.futures

import openai
import pytest

from tests.serving.conftest import API_KEY

MODEL = "tiny:llama"
SCHEMA = """<schema name="notes">
  Notes for the assistant.
  <module name="rivers">Rivers: the Nile is long, the Amazon carries the most water.</module>
  <module name="peaks">Peaks: Everest is high, K2 is hard to climb.</module>
</schema>"""


@pytest.fixture(scope="module")
def client(live):
    server, _ = live
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


def chat(client, text, system="You answer questions about maps and places. " * 3, **kw):
    kw = {"max_tokens": 6, "temperature": 0, **kw}
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": system}, {"role": "user", "content": text}], **kw)


def test_second_identical_request_reports_cached_tokens_and_same_greedy_text(client):
    first = chat(client, "Where is Lima?")
    second = chat(client, "Where is Lima?")
    u1, u2 = first.usage, second.usage
    assert u1.prompt_tokens == u2.prompt_tokens > 100
    # Nothing was cached before the first request; the second serves every full block but the
    # last token (always computed), in 4-token blocks.
    assert u1.prompt_tokens_details.cached_tokens == 0
    assert u2.prompt_tokens_details.cached_tokens == (u2.prompt_tokens - 1) // 4 * 4
    assert u2.total_tokens == u2.prompt_tokens + u2.completion_tokens
    assert second.choices[0].message.content == first.choices[0].message.content
    assert first.choices[0].finish_reason in ("stop", "length")


def test_greedy_output_identical_with_and_without_a_shared_prefix(client):
    system = "A different system prompt about oceans and tides. " * 2
    chat(client, "Name a bay.", system=system)  # caches the system prompt's blocks
    warm = chat(client, "Name a sea.", system=system, max_tokens=12)
    # A salt nobody used: the same prompt computed from scratch, the no-cache path.
    cold = chat(client, "Name a sea.", system=system, max_tokens=12, extra_body={"cache_salt": "never-used"})
    assert warm.usage.prompt_tokens_details.cached_tokens > 0 == cold.usage.prompt_tokens_details.cached_tokens
    assert warm.choices[0].message.content == cold.choices[0].message.content
    assert warm.usage.completion_tokens == cold.usage.completion_tokens


def test_stream_gives_the_same_text_and_usage(client):
    whole = chat(client, "Where is Oslo?", max_tokens=10)
    stream = chat(client, "Where is Oslo?", max_tokens=10, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    usage = [c.usage for c in chunks if c.usage is not None]
    assert text == whole.choices[0].message.content
    assert finish == [whole.choices[0].finish_reason]
    assert len(usage) == 1 and usage[0].completion_tokens == whole.usage.completion_tokens
    assert usage[0].prompt_tokens_details.cached_tokens > 0


def test_length_and_stop(client):
    r = chat(client, "Count.", max_tokens=3)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    full = chat(client, "Count.", max_tokens=12).choices[0].message.content
    stop = next(full[i:i + 2] for i in range(1, len(full) - 1) if "\ufffd" not in full[i:i + 2])
    cut = chat(client, "Count.", max_tokens=12, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == full[:full.find(stop)]


def test_completions_endpoint_caches_a_plain_prompt(client):
    prompt = "The capital of France is a city on the river Seine, and its name is"
    a = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0)
    b = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0)
    assert a.choices[0].text == b.choices[0].text
    assert a.usage.prompt_tokens_details.cached_tokens == 0
    assert b.usage.prompt_tokens_details.cached_tokens == (b.usage.prompt_tokens - 1) // 4 * 4


def test_completions_with_a_list_of_prompts_give_one_choice_each(client):
    prompts = ["The capital of Peru is", "Rivers flow into the", "A short poem about snow:"]
    alone = [client.completions.create(model=MODEL, prompt=p, max_tokens=4, temperature=0) for p in prompts]
    several = client.completions.create(model=MODEL, prompt=prompts, max_tokens=4, temperature=0)
    assert [c.index for c in several.choices] == [0, 1, 2]
    assert [c.text for c in several.choices] == [a.choices[0].text for a in alone]
    assert several.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert several.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    with pytest.raises(openai.BadRequestError, match="separate requests"):
        client.completions.create(model=MODEL, prompt=prompts, max_tokens=4, stream=True)
    with pytest.raises(openai.BadRequestError, match="prompt list is empty"):
        client.completions.create(model=MODEL, prompt=[], max_tokens=4)


def test_pml_prompt_via_extra_body_reuses_modules(client):
    http = client._client
    r = http.post(f"{client.base_url}schemas", json={"pml": SCHEMA}, headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200 and r.json()["name"] == "notes" and len(r.json()["sha256"]) == 64
    names = [s["name"] for s in http.get(f"{client.base_url}schemas",
                                         headers={"Authorization": f"Bearer {API_KEY}"}).json()["data"]]
    assert "notes" in names
    prompts = ['<prompt schema="notes"><rivers/><user>Which river is longest?</user></prompt>',
               '<prompt schema="notes"><peaks/><user>Which peak is hardest?</user></prompt>']
    for p in prompts:
        r = client.chat.completions.create(model=MODEL, messages=[], max_tokens=4, temperature=0,
                                           extra_body={"pml": p})
        # The module and the schema's root text came from the store; only the user turn was computed.
        assert 0 < r.usage.prompt_tokens_details.cached_tokens < r.usage.prompt_tokens
    # Streaming works for PML too, with the same greedy text.
    whole = client.chat.completions.create(model=MODEL, messages=[], max_tokens=6, temperature=0,
                                           extra_body={"pml": prompts[0]})
    streamed = client.chat.completions.create(model=MODEL, messages=[], max_tokens=6, temperature=0, stream=True,
                                              extra_body={"pml": prompts[0]})
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == whole.choices[0].message.content


def test_cache_salt_isolates_tenants(client):
    base = chat(client, "Where is Quito?")  # cached under the empty salt now
    other = chat(client, "Where is Quito?", extra_body={"cache_salt": "tenant-b"})
    again = chat(client, "Where is Quito?", extra_body={"cache_salt": "tenant-b"})
    # Tenant b sees none of the unsalted blocks, then its own.
    assert other.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens > 0
    assert other.choices[0].message.content == base.choices[0].message.content


def test_eight_concurrent_clients_get_the_sequential_answers(client):
    questions = [f"Question {i}: where is city number {i}?" for i in range(8)]
    sequential = {q: chat(client, q, max_tokens=5).choices[0].message.content for q in questions}

    def session(q):
        return [chat(client, q, max_tokens=5).choices[0].message.content for _ in range(5)]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = dict(zip(questions, pool.map(session, questions)))
    # 40 requests, all answered, each equal to its sequential answer.
    assert all(answers == [sequential[q]] * 5 for q, answers in results.items())


def test_models_health_metrics_usage(client, live):
    server, _ = live
    http = client._client
    h = {"Authorization": f"Bearer {API_KEY}"}
    assert [m.id for m in client.models.list()][0] == server.worker.lm.name
    assert http.get(server.url + "/health").json()["status"] == "ok"
    chat(client, "Where is Rome?")
    text = http.get(server.url + "/metrics").text
    for name in ("pml_requests_total", "pml_prompt_tokens_total{kind=\"cached\"}", "pml_cache_hit_rate",
                 "pml_store_bytes{tier=\"memory\"}", "pml_memory_evictions", "pml_prefix_expirations",
                 "pml_ttft_seconds_bucket"):
        assert name in text, name
    totals = http.get(server.url + "/v1/usage", headers=h).json()
    assert totals["requests"] >= 1 and totals["prompt_tokens"] >= totals["cached_tokens"] > 0
