"""Recovery policies end to end: blend:0 is independent, blend:1 is the full prefill, link:K>=len is
schema, and the recompute touches exactly the tokens it reports."""

import pytest
import torch

from attention_store import adapter
from attention_store.policies import get_policy
from attention_store.policies.blend import CHECK_LAYER
from prompt_cache import recovery
from prompt_cache.engine import PromptCache
from prompt_cache.generation import GenerationConfig
from prompt_cache.tiny import tiny_model
from tests.prompt_cache.test_exactness import LINEAR, LINEAR_PROMPT, PROMPTS, SCHEMA

ARCHS = ["llama", "gemma3"]


def fresh_logits(pc, prompt):
    """Logits of every fresh token on the cached path, recovery step included."""
    s, bound = pc.bind(prompt)
    ready = pc.recover(pc.assemble(s, bound))
    return adapter.forward(pc.lm.model, ready.fresh_ids, ready.fresh_positions, ready.cache, ready.cache_positions), ready


def cache_by_position(ready, layer):
    """{position: (key, value)} of one layer of an assembled cache."""
    keys, values = adapter.cache_kv(ready.cache)
    return {int(p): (keys[layer][0, :, i], values[layer][0, :, i]) for i, p in enumerate(ready.cache_positions)}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("prompt", sorted(PROMPTS))
def test_blend_zero_is_independent(arch, prompt):
    lm = tiny_model(arch)
    a, b = PromptCache(lm, policy="blend:0"), PromptCache(lm, policy="independent")
    for pc in (a, b):
        pc.add_schema(SCHEMA)
    got, ready = fresh_logits(a, PROMPTS[prompt])
    want, _ = fresh_logits(b, PROMPTS[prompt])
    assert ready.recomputed.numel() == 0
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_blend_one_is_the_full_prefill(arch):
    pc = PromptCache(tiny_model(arch), policy="blend:1")
    pc.add_schema(LINEAR)
    cont = list(range(40, 50))
    torch.testing.assert_close(pc.logprobs(LINEAR_PROMPT, cont), pc.logprobs(LINEAR_PROMPT, cont, use_cache=False),
                               atol=1e-4, rtol=0)
    r = pc.answer(LINEAR_PROMPT, config=GenerationConfig(max_new_tokens=2, eos_ids=()))
    assert r.usage.cached_tokens == 0 and r.usage.recomputed_tokens > 0  # everything recomputed


@pytest.mark.parametrize("arch", ARCHS)
def test_link_covering_every_block_is_the_schema_policy(arch):
    lm = tiny_model(arch)
    link, schema = PromptCache(lm, policy="link:1000"), PromptCache(lm, policy="schema")
    for pc in (link, schema):
        pc.add_schema(LINEAR)
    cont = list(range(40, 50))
    torch.testing.assert_close(link.logprobs(LINEAR_PROMPT, cont), schema.logprobs(LINEAR_PROMPT, cont),
                               atol=1e-4, rtol=0)


def test_recovery_shares_the_independent_entries():
    lm = tiny_model("llama")
    base = PromptCache(lm, policy="independent")
    base.add_schema(SCHEMA)
    base.encode("trip")
    blend = PromptCache(lm, store=base.store, policy="blend:0.3")
    blend.add_schema(SCHEMA)
    assert blend.encode("trip").encoded == 0  # nothing new to store: same keys as independent


@pytest.mark.parametrize("spec", ["link:3", "blend:0.3"])
def test_recompute_touches_exactly_the_reported_tokens(spec):
    lm = tiny_model("gemma3")  # 4 layers: deeper than blend's probe
    plain, pc = PromptCache(lm, policy="independent"), PromptCache(lm, policy=spec)
    for c in (plain, pc):
        c.add_schema(SCHEMA)
    before = plain.assemble(*plain.bind(PROMPTS["tokyo"]))
    after = pc.recover(pc.assemble(*pc.bind(PROMPTS["tokyo"])))
    chosen = set(after.recomputed.tolist())
    assert 0 < len(chosen) < after.cached_tokens
    # The last layer: a token's states changed exactly when it was reported as recomputed.
    last = len(adapter.cache_kv(after.cache)[0]) - 1
    assert last > CHECK_LAYER
    old, new = cache_by_position(before, last), cache_by_position(after, last)
    assert set(old) == set(new)
    for pos in old:
        same = torch.equal(old[pos][0], new[pos][0]) and torch.equal(old[pos][1], new[pos][1])
        assert same == (pos not in chosen), f"position {pos}: recomputed={pos in chosen}, unchanged={same}"
    if spec.startswith("blend"):
        # Up to the probe layer every token holds the full-context states the probe computed.
        order = before.cache_positions.argsort()
        probe = adapter.forward_until(lm.model, before.cache_ids[order], before.cache_positions[order], CHECK_LAYER)
        want = {int(p): v for p, v in zip(before.cache_positions[order], adapter.cache_kv(probe)[1][CHECK_LAYER][0].unbind(1))}
        got = cache_by_position(after, CHECK_LAYER)
        for pos, v in want.items():
            torch.testing.assert_close(got[pos][1], v, atol=1e-5, rtol=0)


def test_link_picks_the_first_tokens_of_each_block_after_the_first_module():
    lm = tiny_model("llama")
    pc = PromptCache(lm, policy="link:2")
    pc.add_schema(LINEAR)
    s, bound = pc.bind(LINEAR_PROMPT)
    ready = pc.assemble(s, bound)
    ctx = recovery.RecomputeContext(lm, ready)
    starts = {u: ready.cache_positions[idx[:2]].tolist() for u, idx in ctx.blocks[2:]}
    after = pc.recover(ready)
    assert sorted(after.recomputed.tolist()) == sorted(p for ps in starts.values() for p in ps)
    assert [u for u, _ in ctx.blocks][:2] == ["", "a"]  # leading root text, then the first module


def test_blend_picks_the_largest_deviations():
    lm = tiny_model("llama")
    pc = PromptCache(lm, policy="blend:0.25")
    pc.add_schema(SCHEMA)
    ready = pc.assemble(*pc.bind(PROMPTS["tokyo"]))
    dev = recovery.RecomputeContext(lm, ready).deviation(CHECK_LAYER)
    k = round(0.25 * ready.cached_tokens)
    want = set(ready.cache_positions[dev.topk(k).indices].tolist())
    assert set(pc.recover(ready).recomputed.tolist()) == want


@pytest.mark.parametrize("spec", ["blend:2", "blend:x", "blend", "link:-1", "link:abc", "link"])
def test_bad_specs_are_clear_errors(spec):
    with pytest.raises(ValueError, match="blend|link"):
        get_policy(spec)
