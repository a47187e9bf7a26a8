"""The assembler on its own: which units are reused, what stays fresh, and the one concatenation."""

import torch

from attention_store import encoder
from attention_store.entry import KVEntry
from pml.layout import compute_layout
from pml.parser import parse_prompt, parse_schema
from pml.prompt import bind_prompt
from prompt_cache import assembler
from prompt_cache.tiny import ByteTokenizer

SCHEMA = """<schema name="s">Intro.
  <module name="a">Apples <parameter name="n" length="4" scaffold="two"/> here.</module>
  <module name="b">Bees.</module>
  <module name="live" cache="false">Now.</module>
</schema>"""


def setup(prompt):
    tok = ByteTokenizer()
    layout = compute_layout(parse_schema(SCHEMA), tok)
    plan = encoder.plan(layout, "independent")
    bound = bind_prompt(parse_prompt(prompt), layout, tok)
    return layout, plan, bound


def fake_entries(plan):
    """Entries whose every key/value element equals the token's position: easy to check after assembly."""
    out = {}
    for unit, idx in plan.units.items():
        pos = plan.positions[idx]
        kv = pos.float()[None, None, :, None].expand(1, 2, -1, 3).contiguous()
        out[unit] = KVEntry.create(key="0" * 64, schema="s", module=unit, model="m", model_fingerprint="f",
                                   policy="independent", keys=[kv, kv], values=[kv, kv], token_ids=plan.token_ids[idx],
                                   positions=pos, replaceable=plan.replaceable[idx])
    return out


def test_used_units_are_root_then_selected_cacheable_modules():
    _, plan, bound = setup('<prompt schema="s"><b/><live/>Q?</prompt>')
    assert assembler.used_units(plan, bound) == ["", "b"]  # `live` is never stored


def test_fresh_tokens_are_values_uncached_modules_and_the_prompt_text():
    layout, _, bound = setup('<prompt schema="s"><a n="six"/><live/>Q?</prompt>')
    ids, pos = assembler.fresh_tokens(layout, bound)
    slot = next(s for s in layout.segments if s.kind == "parameter")
    live = next(s for s in layout.segments if s.path == "live" and s.kind == "text")
    assert ids[:3] == ByteTokenizer().encode("six") and pos[:3] == [slot.start, slot.start + 1, slot.start + 2]
    assert pos[3:3 + live.length] == list(range(live.start, live.end))
    assert pos[-len(bound.suffix_ids):] == list(range(layout.length, layout.length + len(bound.suffix_ids)))


def test_a_value_equal_to_the_scaffold_is_served_from_the_store():
    layout, _, bound = setup('<prompt schema="s"><a/>Q?</prompt>')
    ids, _ = assembler.fresh_tokens(layout, bound)
    assert ids == list(bound.suffix_ids)


def test_assemble_keeps_positions_and_drops_replaced_scaffolds():
    layout, plan, bound = setup('<prompt schema="s"><a n="six"/><b/>Q?</prompt>')
    ready = assembler.assemble(layout, plan, bound, fake_entries(plan), torch.float32)
    slot = next(s for s in layout.segments if s.kind == "parameter")
    want = torch.cat([plan.positions[plan.units[u]] for u in ("", "a", "b")])
    want = want[(want < slot.start) | (want >= slot.end)]  # the scaffold "two" gives way to "six"
    assert torch.equal(ready.cache_positions, want)
    k0 = ready.cache.layers[0].keys
    assert k0.shape == (1, 2, len(want), 3) and torch.equal(k0[0, 0, :, 0], want.float())
    assert ready.next_position == layout.length + len(bound.suffix_ids)


def test_baseline_is_the_same_ids_in_layout_order():
    layout, _, bound = setup('<prompt schema="s"><b/>Q?</prompt>')
    tok = ByteTokenizer()
    assert assembler.baseline_tokens(layout, bound) == [tok.BOS, *tok.encode("Intro.\n"), *tok.encode("Bees."),
                                                        *bound.suffix_ids]
