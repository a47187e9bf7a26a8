"""PML requests that wait for the model together are answered in one packed batch, each exactly as alone."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import openai
import pytest

from pml.errors import PMLError
from prompt_cache.generation import GenerationConfig
from tests.serving.conftest import API_KEY

MODEL = "tiny:llama"
SCHEMA = """<schema name="atlas">
  Facts for the assistant.
  <module name="rivers">Rivers: the Nile is long, the Amazon carries the most water.</module>
  <module name="peaks">Peaks: Everest is high, K2 is hard to climb.</module>
  <union>
    <module name="north">The north is cold.</module>
    <module name="south">The south is warm.</module>
  </union>
</schema>"""
PROMPTS = ['<prompt schema="atlas"><rivers/><user>Which river is longest?</user></prompt>',
           '<prompt schema="atlas"><peaks/><north/><user>Which peak is hardest?</user></prompt>',
           '<prompt schema="atlas"><rivers/><peaks/><south/><user>Name one.</user></prompt>',
           '<prompt schema="atlas"><user>Say hello.</user></prompt>']
GREEDY = GenerationConfig(max_new_tokens=6, temperature=0.0)


@pytest.fixture(scope="module")
def worker():
    from prompt_cache.models import load_model
    from serving.server import ServeConfig, build_worker

    w = build_worker(ServeConfig(model=MODEL, memory_only=True), lm=load_model(MODEL))
    w.add_schema(SCHEMA)
    yield w
    w.close()


def _while_busy(worker, coroutines):
    """Run the coroutines while the model thread is held busy, so that they all queue, then release it."""
    release = threading.Event()

    async def go():
        held = asyncio.ensure_future(worker.run(release.wait))
        tasks = [asyncio.ensure_future(c) for c in coroutines]
        while len(worker._waiting) < len(tasks):
            await asyncio.sleep(0.01)
        release.set()
        await held
        return await asyncio.gather(*tasks, return_exceptions=True)

    return asyncio.run(go())


def test_waiting_requests_are_packed_and_each_answered_as_alone(worker):
    alone = [worker.answer_pml(p, GREEDY) for p in PROMPTS]
    before = worker.totals.batches, worker.totals.batched_requests
    pieces: list[str] = []
    other = GenerationConfig(max_new_tokens=3, temperature=0.0)
    got = _while_busy(worker, [
        worker.answer_pml_queued(PROMPTS[0], GREEDY),
        worker.answer_pml_queued(PROMPTS[1], GREEDY, on_text=pieces.append),  # streamed from the batch
        worker.answer_pml_queued('<prompt schema="atlas"><nowhere/></prompt>', GREEDY),  # fails alone
        worker.answer_pml_queued(PROMPTS[2], GREEDY),
        worker.answer_pml_queued(PROMPTS[3], other),  # other settings: not in that batch
        worker.answer_pml_queued(PROMPTS[3], GREEDY),
    ])
    assert isinstance(got[2], PMLError) and "nowhere" in str(got[2])
    packed = [got[0], got[1], got[3], got[5]]
    assert [c.token_ids for c in packed] == [c.token_ids for c in alone]
    assert [c.text for c in packed] == [c.text for c in alone]
    assert [(c.prompt_tokens, c.cached_tokens) for c in packed] == [(c.prompt_tokens, c.cached_tokens) for c in alone]
    assert "".join(pieces) == got[1].text
    assert got[4].token_ids == alone[3].token_ids[:3]
    # One batch of the four good same-settings requests; the other-settings one went alone.
    assert (worker.totals.batches - before[0], worker.totals.batched_requests - before[1]) == (1, 4)


def test_max_batch_bounds_the_batch(worker):
    before = worker.totals.batches, worker.totals.batched_requests
    worker.max_batch = 2
    try:
        got = _while_busy(worker, [worker.answer_pml_queued(p, GREEDY) for p in PROMPTS])
    finally:
        worker.max_batch = 8
    assert all(not isinstance(c, BaseException) for c in got)
    assert (worker.totals.batches - before[0], worker.totals.batched_requests - before[1]) == (2, 4)


def test_max_batch_below_one_is_refused():
    from serving.worker import Worker

    with pytest.raises(ValueError, match="max_batch"):
        Worker(None, None, max_batch=0)


def test_concurrent_http_clients_share_a_batch(live):
    server, _ = live
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    h = {"Authorization": f"Bearer {API_KEY}"}
    assert client._client.post(f"{server.url}/v1/schemas", json={"pml": SCHEMA}, headers=h).status_code == 200

    def ask(p):
        r = client.chat.completions.create(model=MODEL, messages=[], max_tokens=5, temperature=0, extra_body={"pml": p})
        return r.choices[0].message.content, r.usage.prompt_tokens_details.cached_tokens

    sequential = [ask(p) for p in PROMPTS]
    before = client._client.get(f"{server.url}/v1/usage", headers=h).json()
    release = threading.Event()
    held = server.worker._pool.submit(release.wait)  # the model is busy: the requests queue up
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        futures = [pool.submit(ask, p) for p in PROMPTS]
        deadline = time.monotonic() + 60
        while len(server.worker._waiting) < len(PROMPTS) and time.monotonic() < deadline:
            time.sleep(0.01)
        waiting = len(server.worker._waiting)
        release.set()
        held.result()
        answers = [f.result() for f in futures]
    after = client._client.get(f"{server.url}/v1/usage", headers=h).json()
    assert waiting == len(PROMPTS)  # nothing of a PML request but its answer runs on the model thread
    assert answers == sequential
    assert after["batched_requests"] - before["batched_requests"] == len(PROMPTS)
    # A malformed prompt is a 400 before any text, streamed or not.
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError, match="nowhere"):
            client.chat.completions.create(model=MODEL, messages=[], max_tokens=5, stream=stream,
                                           extra_body={"pml": '<prompt schema="atlas"><nowhere/></prompt>'})
    metrics = client._client.get(f"{server.url}/metrics", headers=h).text
    assert "pml_batched_requests" in metrics
