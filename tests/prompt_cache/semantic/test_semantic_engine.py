"""PromptCache with a semantic cache: a hit answers without a model forward; any context change misses."""

import pytest

from prompt_cache.engine import PromptCache
from prompt_cache.generation import GenerationConfig
from prompt_cache.semantic.cache import SemanticCache, SemanticCacheConfig
from prompt_cache.semantic.embedder import HashingEmbedder
from prompt_cache.tiny import tiny_model

SCHEMA = """<schema name="s">
  Intro.
  <module name="doc">A document about the history of tea in China and India.</module>
  <module name="other">A document about coffee.</module>
  <module name="q">Question about <parameter name="topic" length="8"/> please.</module>
</schema>"""


def prompt(question, modules='<doc/><q topic="tea"/>', system=None):
    sys_turn = f"<system>{system}</system>" if system else ""
    return f'<prompt schema="s">{modules}{sys_turn}<user>{question}</user></prompt>'


Q, NEAR = "When was tea first drunk in China?", "when was tea first drunk in china"
CFG = GenerationConfig(max_new_tokens=5, eos_ids=())


@pytest.fixture
def counted():
    """An engine with a semantic cache, and a list that grows by one per model forward."""
    lm = tiny_model("llama")
    calls = []
    inner = lm.model.forward

    def forward(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)

    lm.model.forward = forward
    pc = PromptCache(lm, semantic_cache=SemanticCache(HashingEmbedder(), SemanticCacheConfig(threshold=0.8)))
    pc.add_schema(SCHEMA)
    pc.encode("s")
    return pc, calls


def test_a_hit_returns_the_stored_answer_without_a_forward(counted):
    pc, calls = counted
    first = pc.answer(prompt(Q), config=CFG)
    assert first.semantic_cache == "miss" and calls
    calls.clear()
    streamed = []
    again = pc.answer(prompt(NEAR), config=CFG, on_text=streamed.append)
    assert calls == []  # no model forward at all
    assert again.semantic_cache == "hit"
    assert (again.text, again.token_ids, again.finish_reason) == (first.text, first.token_ids, first.finish_reason)
    assert streamed == [first.text] and again.to_json()["semantic_cache"] == "hit"
    assert pc.semantic_cache.stats.hits == 1 and pc.semantic_cache.stats.misses == 1


@pytest.mark.parametrize("changed", [
    dict(p=prompt(Q, modules='<doc/><q topic="coffee"/>')),  # another parameter value
    dict(p=prompt(Q, modules='<other/><q topic="tea"/>')),  # other modules
    dict(p=prompt(Q, system="Answer in French.")),  # another system prompt
    dict(p=prompt(Q), config=GenerationConfig(max_new_tokens=6, eos_ids=())),  # other settings
    dict(p=prompt(Q), use_cache=False),  # full prefill: other numerics
])
def test_a_changed_context_never_hits(counted, changed):
    pc, calls = counted
    pc.answer(prompt(Q), config=CFG)
    calls.clear()
    r = pc.answer(changed["p"], use_cache=changed.get("use_cache", True), config=changed.get("config", CFG))
    assert r.semantic_cache == "miss" and calls


def test_without_a_semantic_cache_nothing_is_marked():
    pc = PromptCache(tiny_model("llama"))
    pc.add_schema(SCHEMA)
    assert pc.answer(prompt(Q), config=CFG).semantic_cache is None
