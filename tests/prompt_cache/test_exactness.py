"""Cached answers equal reference forward passes: the properties that make reuse exact, not approximate.

The reference here is built from the policy *definitions* (per-token rules written out below), not
from the encoder's plan, and runs as one forward over all tokens with one mask.
"""

import pytest
import torch

from attention_store import adapter
from prompt_cache.engine import PromptCache
from prompt_cache.generation import GenerationConfig
from prompt_cache.tiny import tiny_model

ARCHS = ["llama", "llama-gqa", "gemma3", "qwen2"]

SCHEMA = """<schema name="trip">
  You are a travel planner.
  <module name="intro">We plan trips for families and couples.</module>
  <union scaffold="domestic">
    <module name="domestic">Domestic trips use trains and buses.</module>
    <module name="overseas">Overseas trips need passports.
      <module name="tokyo">Tokyo has many temples.</module>
      <module name="paris">Paris has museums.</module>
    </module>
  </union>
  <module name="plan">Plan <parameter name="days" length="6" scaffold="a few"/> days of travel.</module>
  <module name="live" cache="false">Today is sunny.</module>
  Answer briefly.
</schema>"""

PROMPTS = {
    "tokyo": '<prompt schema="trip"><intro/><overseas><tokyo/></overseas><plan days="three"/><live/>'
             "Where should we go first?</prompt>",
    "skip-and-scaffold": '<prompt schema="trip"><domestic/><plan/>Which train?</prompt>',
    "paris-only": '<prompt schema="trip"><overseas><paris/></overseas>Best museum?</prompt>',
}

LINEAR = """<schema name="linear">
  Notes follow.
  <module name="a">Alpha module text about rivers.</module>
  <module name="b">Beta module text about mountains.</module>
  <module name="c">Gamma text.</module>
  End of notes.
</schema>"""
LINEAR_PROMPT = '<prompt schema="linear"><a/><b/><c/>Summarize the notes.</prompt>'


def chain(path):
    parts = path.split("/") if path else []
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def visible(layout, policy, q_owner, q_pos, k_owner, k_pos, first_module):
    """May schema token q see earlier schema token k when modules are encoded? (the definitions)"""
    if policy == "independent":
        return q_owner == k_owner or (k_owner == "" and k_pos < first_module)
    for member in chain(k_owner):
        m = layout.modules[member]
        if m.union is None or member in chain(q_owner):
            continue
        q_in_union = any(layout.modules[a].union == m.union for a in chain(q_owner))
        if q_in_union or not m.scaffold:
            return False
    return True


def reference(lm, layout, bound, policy, extra=(), rule=None):
    """One forward over [schema tokens, fresh tokens] with the policy's mask; logits of fresh tokens.

    `rule(layout, q_owner, q_pos, k_owner, k_pos, first_module)` replaces the built-in definitions
    (`visible`), for policies defined in tests.
    """
    rule = rule or (lambda layout, *args: visible(layout, policy, *args))
    mods = layout.modules
    seq = []  # (id, pos, owner, slot) of every cacheable schema token, in document order
    for seg in layout.segments:
        if seg.kind == "module" or (seg.path and not mods[seg.path].cache):
            continue
        for i, t in enumerate(seg.token_ids):
            seq.append((t, seg.start + i, seg.path, seg.name if seg.kind == "parameter" else None))
    first_module = min(m.start for m in mods.values())
    used = {""} | set(bound.modules)
    fresh = []  # (id, pos)
    for seg in layout.segments:
        if seg.kind == "module" or seg.path not in bound.modules:
            continue
        if seg.kind == "parameter":
            value = tuple(bound.arguments.get((seg.path, seg.name), seg.token_ids))
            if mods[seg.path].cache and value == tuple(seg.token_ids):
                continue
            fresh += [(t, seg.start + i) for i, t in enumerate(value)]
        elif not mods[seg.path].cache:
            fresh += [(t, seg.start + i) for i, t in enumerate(seg.token_ids)]
    fresh += [(t, layout.length + i) for i, t in enumerate(bound.suffix_ids)]
    fresh += [(t, layout.length + len(bound.suffix_ids) + i) for i, t in enumerate(extra)]

    def value_kept(owner, slot):
        seg = next(s for s in layout.segments if s.path == owner and s.name == slot and s.kind == "parameter")
        return tuple(bound.arguments.get((owner, slot), seg.token_ids)) == tuple(seg.token_ids)

    n, f = len(seq), len(fresh)
    allowed = torch.zeros(n + f, n + f, dtype=torch.bool)
    for qi, (_, qp, qo, _) in enumerate(seq):
        for ki in range(qi + 1):
            allowed[qi, ki] = rule(layout, qo, qp, seq[ki][2], seq[ki][1], first_module)
    for ki, (_, _, owner, slot) in enumerate(seq):
        if owner in used and (slot is None or value_kept(owner, slot)):
            allowed[n:, ki] = True
    allowed[n:, n:] = torch.ones(f, f, dtype=torch.bool).tril()
    ids = torch.tensor([s[0] for s in seq] + [t for t, _ in fresh])
    pos = torch.tensor([s[1] for s in seq] + [p for _, p in fresh])
    logits = adapter.forward(lm.model, ids, pos, adapter.new_cache(), None, allowed=allowed)
    return logits[n:]


def cached_fresh_logits(pc, prompt, extra=()):
    """All fresh-token logits of the cached path (assemble, then one forward over fresh tokens)."""
    s, bound = pc.bind(prompt)
    ready = pc.assemble(s, bound)
    ids = torch.cat([ready.fresh_ids, torch.tensor(extra, dtype=torch.long)])
    pos = torch.cat([ready.fresh_positions, torch.arange(len(extra)) + ready.next_position])
    return adapter.forward(pc.lm.model, ids, pos, ready.cache, ready.cache_positions), s, bound


@pytest.mark.parametrize("arch", ARCHS)
def test_schema_policy_full_selection_equals_full_prefill(arch):
    # Every module in schema order plus text at the end, encoded in schema context: the cache is
    # exactly the prefix of the full prefill, so logits and greedy outputs must match.
    pc = PromptCache(tiny_model(arch), policy="schema")
    pc.add_schema(LINEAR)
    s, bound = pc.bind(LINEAR_PROMPT)
    n = len(bound.suffix_ids)
    cont = list(range(40, 52))
    cached = pc.logprobs(LINEAR_PROMPT, cont, use_cache=True)
    full = pc.logprobs(LINEAR_PROMPT, cont, use_cache=False)
    assert n > 0 and cached.shape == full.shape
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=0)
    config = GenerationConfig(max_new_tokens=12, eos_ids=())
    a = pc.answer(LINEAR_PROMPT, use_cache=True, config=config)
    b = pc.answer(LINEAR_PROMPT, use_cache=False, config=config)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 12
    assert a.usage.prompt_tokens == b.usage.prompt_tokens
    assert a.usage.cached_tokens == a.usage.prompt_tokens - n and b.usage.cached_tokens == 0


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("policy", ["independent", "schema"])
@pytest.mark.parametrize("prompt", sorted(PROMPTS))
def test_any_selection_equals_block_reference(arch, policy, prompt):
    pc = PromptCache(tiny_model(arch), policy=policy)
    pc.add_schema(SCHEMA)
    got, s, bound = cached_fresh_logits(pc, PROMPTS[prompt])
    want = reference(pc.lm, s.layout, bound, policy)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_reference_is_sensitive_to_the_policy():
    # Guard against a test that cannot fail: the two policies give different logits here.
    lm = tiny_model("llama")
    pc = PromptCache(lm, policy="independent")
    pc.add_schema(SCHEMA)
    _, s, bound = cached_fresh_logits(pc, PROMPTS["tokyo"])
    a = reference(lm, s.layout, bound, "independent")
    b = reference(lm, s.layout, bound, "schema")
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("policy", ["independent", "schema"])
def test_greedy_decoding_after_gaps_equals_reference_loop(arch, policy):
    # The prompt skips modules and picks a short union member, so positions have gaps; decoding must
    # continue at max position + 1, not at the cache length.
    pc = PromptCache(tiny_model(arch), policy=policy)
    pc.add_schema(SCHEMA)
    prompt = PROMPTS["paris-only"]
    out = pc.answer(prompt, config=GenerationConfig(max_new_tokens=8, eos_ids=()))
    s, bound = pc.bind(prompt)
    assert pc.assemble(s, bound).cached_tokens < s.layout.length  # there really are gaps
    generated = []
    for _ in range(8):
        logits = reference(pc.lm, s.layout, bound, policy, extra=generated)
        generated.append(int(logits[-1].argmax()))
    assert list(out.token_ids) == generated


def test_cached_tokens_and_usage_count_what_came_from_the_store():
    pc = PromptCache(tiny_model("llama"))
    pc.add_schema(SCHEMA)
    r = pc.answer(PROMPTS["tokyo"], config=GenerationConfig(max_new_tokens=3, eos_ids=()))
    s, bound = pc.bind(PROMPTS["tokyo"])
    ready = pc.assemble(s, bound)
    base = pc.answer(PROMPTS["tokyo"], use_cache=False, config=GenerationConfig(max_new_tokens=3, eos_ids=()))
    # fresh = parameter value + the cache="false" module + the prompt's own text
    assert r.usage.cached_tokens == ready.cached_tokens
    assert r.usage.prompt_tokens == ready.cached_tokens + ready.fresh_ids.numel() == base.usage.prompt_tokens
    assert r.usage.completion_tokens == 3 and base.usage.cached_tokens == 0
