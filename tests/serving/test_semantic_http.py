"""The semantic cache behind the HTTP API: a repeated question is answered without the model, marked
`x-semantic-cache: hit`; another context, setting or tenant is a miss."""

from __future__ import annotations

import httpx
import pytest

from tests.serving.conftest import API_KEY

SCHEMA = '<schema name="kb"><module name="doc">The river Alder floods in spring.</module></schema>'


@pytest.fixture(scope="module")
def server():
    from attention_store.store import AttentionStore
    from attention_store.tiers import MemoryTier
    from prompt_cache.models import load_model
    from prompt_cache.semantic import SemanticCache, SemanticCacheConfig
    from prompt_cache.semantic.embedder import HashingEmbedder
    from serving.server import BackgroundServer, ServeConfig
    from serving.worker import Worker

    lm = load_model("tiny:llama")
    calls = []
    forward = lm.model.forward
    lm.model.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)  # count model work
    semantic = SemanticCache(HashingEmbedder(), SemanticCacheConfig(threshold=0.9))
    worker = Worker(lm, AttentionStore(MemoryTier(device=lm.model.device), None), semantic=semantic)
    worker.add_schema(SCHEMA)
    with BackgroundServer(worker, ServeConfig(model="tiny:llama", api_keys=(API_KEY,))) as s:
        yield s, calls
    worker.close()


def chat(s, messages, **extra):
    body = {"model": "tiny:llama", "messages": messages, "max_tokens": 4, **extra}
    return httpx.post(f"{s.url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {API_KEY}"},
                      timeout=60)


def test_a_repeated_question_is_answered_without_the_model(server):
    s, calls = server
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "When does the Alder flood?"}]
    first = chat(s, msgs)
    assert first.status_code == 200 and first.headers["x-semantic-cache"] == "miss"
    before = len(calls)
    # expected: the same question with a surface change hits, no forward runs, same answer
    again = chat(s, msgs[:1] + [{"role": "user", "content": "when does the Alder flood"}])
    assert again.headers["x-semantic-cache"] == "hit" and len(calls) == before
    assert again.json()["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]
    usage = again.json()["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"]


def test_another_context_setting_or_tenant_is_a_miss(server):
    s, calls = server
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is the Alder?"}]
    assert chat(s, msgs).headers["x-semantic-cache"] == "miss"
    other_system = [{"role": "system", "content": "Be verbose."}, msgs[1]]
    assert chat(s, other_system).headers["x-semantic-cache"] == "miss"
    assert chat(s, msgs, max_tokens=5).headers["x-semantic-cache"] == "miss"
    assert chat(s, msgs, cache_salt="tenant-b").headers["x-semantic-cache"] == "miss"
    assert chat(s, msgs).headers["x-semantic-cache"] == "hit"
    totals = httpx.get(f"{s.url}/v1/usage", headers={"authorization": f"Bearer {API_KEY}"}).json()
    assert totals["semantic_hits"] >= 2
    metrics = httpx.get(f"{s.url}/metrics", headers={"authorization": f"Bearer {API_KEY}"}).text
    assert 'pml_semantic_cache_total{result="hit"}' in metrics


def test_pml_and_stream(server):
    s, calls = server
    body = {"pml": '<prompt schema="kb"><doc/><user>Does the Alder flood?</user></prompt>'}
    first = chat(s, [], **body)
    assert first.status_code == 200, first.text
    assert first.headers["x-semantic-cache"] == "miss"
    body["stream"] = True
    with httpx.stream("POST", f"{s.url}/v1/chat/completions", timeout=60,
                      json={"model": "tiny:llama", "max_tokens": 4, "messages": [], **body},
                      headers={"authorization": f"Bearer {API_KEY}"}) as r:
        assert r.headers["x-semantic-cache"] == "hit"
        text = "".join(r.iter_text())
    assert "[DONE]" in text
