"""Speculative decoding: output equals plain greedy decoding for every drafter and k; stats add up."""

import pytest

from prompt_cache import generation, speculative
from prompt_cache.engine import PromptCache
from prompt_cache.generation import GenerationConfig
from prompt_cache.speculative import LookupDrafter, SpeculativeConfig
from prompt_cache.tiny import tiny_model

# Repetitive module text, so that prompt lookup finds n-gram matches (and is sometimes wrong).
SCHEMA = """<schema name="s">
  Intro.
  <module name="doc">the cat sat on the mat. the cat sat on the hat. the dog sat on the log.</module>
  <module name="q">Question about <parameter name="topic" length="4"/> please.</module>
</schema>"""
PROMPT = '<prompt schema="s"><doc/><q topic="cats"/>Where did the cat sit? the cat sat on</prompt>'
NO_EOS = GenerationConfig(max_new_tokens=24, eos_ids=())


@pytest.fixture(scope="module")
def target():
    return tiny_model("llama", seed=0)


def engine(lm, spec=None):
    pc = PromptCache(lm, speculative=spec)
    pc.add_schema(SCHEMA)
    return pc


@pytest.fixture(scope="module")
def drafts(target):
    # A draft from another seed (often wrong), and the target's own weights (always right).
    return {"model-other": tiny_model("llama", seed=1), "model-same": target}


def drafter_config(name, k, drafts):
    if name == "lookup":
        return SpeculativeConfig(k=k)
    return SpeculativeConfig(k=k, drafter="model", draft=engine(drafts[name]))


@pytest.fixture(scope="module")
def plain(target):
    pc = engine(target)
    return {(c, cfg): pc.answer(PROMPT, use_cache=c, config=cfg).token_ids
            for c in (True, False) for cfg in (NO_EOS, GenerationConfig(max_new_tokens=40))}


@pytest.mark.parametrize("k", range(1, 9))
@pytest.mark.parametrize("drafter", ["lookup", "model-other", "model-same"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_speculative_output_equals_plain_greedy(target, plain, drafts, drafter, k, use_cache):
    r = engine(target, drafter_config(drafter, k, drafts)).answer(PROMPT, use_cache=use_cache, config=NO_EOS)
    assert r.token_ids == plain[(use_cache, NO_EOS)]
    st = r.speculative
    # Every verification forward yields its accepted drafts plus one token of the model's own; the
    # first token comes from the prefill.
    assert len(r.token_ids) == 1 + st["forwards"] + st["accepted"]
    assert st["accepted"] <= st["proposed"] <= k * st["forwards"]
    if drafter == "model-same":  # the draft is the target itself: every draft is the greedy token
        assert st["accepted"] == st["proposed"] > 0
        assert st["forwards"] < len(r.token_ids) - 1 or k == 1


@pytest.mark.parametrize("drafter", ["lookup", "model-other"])
def test_speculative_stops_at_eos_like_plain(target, plain, drafts, drafter):
    cfg = GenerationConfig(max_new_tokens=40)  # the byte tokenizer's EOS ends generation
    r = engine(target, drafter_config(drafter, 5, drafts)).answer(PROMPT, config=cfg)
    assert r.token_ids == plain[(True, cfg)]


def test_other_architectures_are_exact_too():
    for arch in ("llama-gqa", "qwen2", "gemma3"):  # gemma3: sliding windows applied by position
        lm = tiny_model(arch, seed=0)
        want = engine(lm).answer(PROMPT, config=NO_EOS).token_ids
        for k in (1, 3, 8):
            got = engine(lm, SpeculativeConfig(k=k)).answer(PROMPT, config=NO_EOS)
            assert got.token_ids == want, (arch, k)


def test_lookup_drafter_continues_the_latest_match():
    d = LookupDrafter([5, 6, 7, 8, 5, 6, 9, 1], max_ngram=2)
    # The sequence ends in (5, 6): its latest earlier occurrence is followed by 9, 1, then the
    # sequence itself.
    assert d.propose([5, 6], 3) == [9, 1, 5]
    assert d.propose([7], 2) == [8, 5]
    assert d.propose([42], 4) == []  # nothing to match


def test_verify_rolls_the_cache_back_to_the_accepted_prefix(target):
    pc = engine(target)
    s, bound = pc.bind(PROMPT)
    ready = pc.assemble(s, bound)
    logits, state = generation.prefill(target, ready.cache, ready.cache_positions, ready.fresh_ids,
                                       ready.fresh_positions, ready.next_position)
    before, nxt = state.positions.numel(), state.next_position
    token = int(logits.argmax())
    step = generation.decode_step(target, _copy(state), token)
    wrong = (int(step.argmax()) + 1) % 259  # a first draft the model never picks
    accepted, bonus = speculative.verify(target, state, token, [wrong, 7, 7])
    # Nothing accepted: the cache keeps `token` only; the model's token is its plain greedy choice.
    assert accepted == [] and bonus == int(step.argmax())
    assert state.positions.numel() == before + 1 == state.cache.get_seq_length()
    assert state.next_position == nxt + 1 and int(state.positions[-1]) == nxt


def _copy(state):
    from attention_store import adapter

    keys, values = adapter.cache_kv(state.cache)
    return generation.DecodeState(adapter.new_cache([k.clone() for k in keys], [v.clone() for v in values]),
                                  state.positions.clone(), state.next_position)


def test_sampling_is_refused_clearly(target):
    pc = engine(target, SpeculativeConfig(k=4))
    with pytest.raises(ValueError, match="greedy-exact only"):
        pc.answer(PROMPT, config=GenerationConfig(max_new_tokens=4, temperature=0.7))


def test_a_draft_without_the_schema_is_refused(target):
    draft = PromptCache(tiny_model("llama", seed=1))
    pc = engine(target, SpeculativeConfig(k=2, drafter="model", draft=draft))
    with pytest.raises(ValueError, match="no schema 's'"):
        pc.answer(PROMPT, config=NO_EOS)


@pytest.mark.parametrize("kwargs, message", [
    (dict(k=0), "k must be"), (dict(drafter="oracle"), "unknown drafter"),
    (dict(drafter="model"), "needs `draft`"), (dict(max_ngram=0), "max_ngram"),
])
def test_bad_configs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpeculativeConfig(**kwargs)
