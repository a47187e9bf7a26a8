"""Stored module states equal slices of plain reference forward passes at the same positions."""

import pytest
import torch

from attention_store import adapter, encoder
from attention_store.store import AttentionStore
from attention_store.tiers import MemoryTier
from prompt_cache.tiny import tiny_model
from pml.layout import compute_layout
from pml.parser import parse_schema

SCHEMA = """<schema name="s">
  Shared intro.
  <module name="a">Module a talks about apples and pears.</module>
  <union scaffold="x">
    <module name="x">Option x is short.</module>
    <module name="y">Option y is a much longer member of the union, with more words.</module>
  </union>
  <module name="b">Module b comes after the union <parameter name="p" length="5" scaffold="hi"/> and ends.</module>
  <module name="u" cache="false">Never stored.</module>
</schema>"""


def setup(arch="llama", policy="independent"):
    lm = tiny_model(arch)
    layout = compute_layout(parse_schema(SCHEMA), lm.tokenizer)
    return lm, layout, encoder.plan(layout, policy)


def tokens_of(layout, paths):
    """(ids, positions) of the text and scaffolds owned by `paths`, in document order."""
    ids, pos = [], []
    for seg in layout.segments:
        if seg.kind != "module" and seg.path in paths:
            ids += seg.token_ids
            pos += range(seg.start, seg.start + len(seg.token_ids))
    return torch.tensor(ids), torch.tensor(pos)


def reference_kv(lm, ids, pos, n_last):
    """Plain causal forward over one contiguous sequence; KV of its last `n_last` tokens."""
    cache = adapter.new_cache()
    adapter.forward(lm.model, ids, pos, cache, None, allowed=torch.ones(len(ids), len(ids), dtype=torch.bool).tril())
    keys, values = adapter.cache_kv(cache)
    return [k[:, :, -n_last:] for k in keys], [v[:, :, -n_last:] for v in values]


def assert_entry_matches(entry, ref_k, ref_v):
    for got, want in zip(entry.keys + entry.values, ref_k + ref_v):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "llama-gqa", "gemma3", "qwen2"])
@pytest.mark.parametrize("module", ["a", "y", "b"])
def test_independent_module_equals_forward_over_sink_and_itself(arch, module):
    lm, layout, p = setup(arch, "independent")
    (entry,) = encoder.encode_units(p, lm, [module], torch.float32)
    first = min(m.start for m in layout.modules.values())
    sink_ids, sink_pos = tokens_of(layout, {""})
    keep = sink_pos < first
    mod_ids, mod_pos = tokens_of(layout, {module})
    ids, pos = torch.cat([sink_ids[keep], mod_ids]), torch.cat([sink_pos[keep], mod_pos])
    assert_entry_matches(entry, *reference_kv(lm, ids, pos, len(mod_ids)))
    assert entry.positions.tolist() == mod_pos.tolist()


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_schema_policy_module_after_union_sees_the_scaffold_member_only(arch):
    lm, layout, p = setup(arch, "schema")
    (entry,) = encoder.encode_units(p, lm, ["b"], torch.float32)
    # Everything before b in document order, minus the non-scaffold union member y.
    before = [s for s in layout.segments if s.kind != "module" and s.start < layout.modules["b"].start
              and s.path in {"", "a", "x"}]
    ids = [t for s in before for t in s.token_ids]
    pos = [s.start + i for s in before for i in range(len(s.token_ids))]
    b_ids, b_pos = tokens_of(layout, {"b"})
    ids, pos = torch.cat([torch.tensor(ids), b_ids]), torch.cat([torch.tensor(pos), b_pos])
    assert_entry_matches(entry, *reference_kv(lm, ids, pos, len(b_ids)))


def test_union_members_share_their_start_and_uncached_modules_are_never_stored():
    lm, layout, p = setup()
    store = AttentionStore(MemoryTier(1 << 30), None)
    entries = encoder.ensure_encoded(p, lm, store, torch.float32)
    assert entries["x"].positions[0] == entries["y"].positions[0] == layout.modules["x"].start
    assert "u" not in entries and all(row.meta.module != "u" for row in store.entries())
    # the parameter scaffold is stored and marked replaceable; only it
    b = entries["b"]
    slot = next(s for s in layout.segments if s.kind == "parameter")
    in_slot = (b.positions >= slot.start) & (b.positions < slot.end)
    assert b.replaceable.tolist() == in_slot.tolist() and int(in_slot.sum()) == len(slot.token_ids) > 0


def test_keys_differ_when_model_dtype_policy_or_text_differ():
    lm, layout, p = setup()
    base = encoder.unit_key(p, "a", lm, torch.float32)
    assert base == encoder.unit_key(encoder.plan(layout, "independent"), "a", lm, torch.float32)
    assert base != encoder.unit_key(p, "a", lm, torch.float16)
    assert base != encoder.unit_key(encoder.plan(layout, "schema"), "a", lm, torch.float32)
    assert base != encoder.unit_key(p, "a", tiny_model("llama", seed=1), torch.float32)
    other = compute_layout(parse_schema(SCHEMA.replace("apples", "grapes")), lm.tokenizer)
    assert base != encoder.unit_key(encoder.plan(other, "independent"), "a", lm, torch.float32)
    # under the schema policy a change upstream reaches the key of a later module (chained context)
    s1 = encoder.unit_key(encoder.plan(layout, "schema"), "b", lm, torch.float32)
    s2 = encoder.unit_key(encoder.plan(other, "schema"), "b", lm, torch.float32)
    assert s1 != s2
    # ... but not under independent, where b never saw module a
    assert encoder.unit_key(p, "b", lm, torch.float32) == encoder.unit_key(encoder.plan(other, "independent"), "b", lm, torch.float32)


def test_encode_skips_what_is_stored_and_chunks_long_schemas(monkeypatch):
    lm, layout, p = setup()
    store = AttentionStore(MemoryTier(1 << 30), None)
    monkeypatch.setattr(encoder, "CHUNK", 16)  # several forward calls for this schema
    seen = []
    first = encoder.ensure_encoded(p, lm, store, torch.float32, progress=lambda d, t: seen.append((d, t)))
    assert len(seen) > 2 and seen[-1][0] == seen[-1][1]
    calls = []
    monkeypatch.setattr(encoder, "encode_units", lambda *a, **k: calls.append(a) or [])
    again = encoder.ensure_encoded(p, lm, store, torch.float32)
    assert calls == [] and again.keys() == first.keys()
    # chunked encoding gives the same states as one pass
    monkeypatch.undo()
    (one,) = encoder.encode_units(p, lm, ["b"], torch.float32)
    assert_entry_matches(first["b"], list(one.keys), list(one.values))


def test_unknown_policy_is_a_clear_error():
    lm = tiny_model("llama")
    layout = compute_layout(parse_schema(SCHEMA), lm.tokenizer)
    with pytest.raises(ValueError, match="unknown encoding policy 'joint'"):
        encoder.plan(layout, "joint")


def test_without_sink_a_module_equals_a_forward_over_itself_alone():
    lm = tiny_model("llama")
    layout = compute_layout(parse_schema(SCHEMA), lm.tokenizer)
    (entry,) = encoder.encode_units(encoder.plan(layout, "independent:nosink"), lm, ["a"], torch.float32)
    ids, pos = tokens_of(layout, {"a"})
    assert_entry_matches(entry, *reference_kv(lm, ids, pos, len(ids)))
    with_sink = encoder.plan(layout, "independent")
    assert encoder.unit_key(with_sink, "a", lm, torch.float32) != encoder.unit_key(
        encoder.plan(layout, "independent:nosink"), "a", lm, torch.float32)


def test_planning_a_64k_token_schema_needs_little_memory():
    # Dense N x N masks would take 4 GiB per mask at 65,536 tokens; the plan keeps visibility per
    # group and builds mask rows per chunk.
    import psutil

    from prompt_cache.tiny import ByteTokenizer

    body = "".join(f'<module name="m{i}">{"x" * 1020}</module>' for i in range(64))
    layout = compute_layout(parse_schema(f'<schema name="big">{body}</schema>'), ByteTokenizer())
    before = psutil.Process().memory_info().rss
    for policy in ("independent", "schema"):
        p = encoder.plan(layout, policy)
        assert p.token_ids.numel() >= 65_000
        rows = p.allowed(torch.arange(512), torch.arange(p.token_ids.numel()))  # one chunk's mask
        assert rows.shape == (512, p.token_ids.numel())
    assert psutil.Process().memory_info().rss - before < 512 * 2**20
