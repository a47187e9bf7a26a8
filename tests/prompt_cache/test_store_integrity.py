"""PromptCache over a store it cannot trust blindly: forged entries, shared entries under pins, lazy folders."""

import dataclasses

import pytest
import torch

from attention_store import encoder
from attention_store.entry import KVEntry
from attention_store.store import AttentionStore, StoreMismatch, open_store
from attention_store.tiers import DiskTier, MemoryTier
from prompt_cache.engine import PromptCache
from prompt_cache.generation import GenerationConfig

SYSTEM = "You are a careful assistant who answers from the notes below."


def schema(name: str, body: str) -> str:
    return f'<schema name="{name}">\n  <system>{SYSTEM}</system>\n  {body}\n</schema>'


A = schema("a", '<module name="rivers">Rivers run to the sea and lakes are still.</module>')
B = schema("b", '<module name="hills">Hills are high and valleys are low and wide.</module>')
C = schema("c", '<module name="big">' + "Filler text about nothing in particular. " * 12 + "</module>")
GREEDY = GenerationConfig(max_new_tokens=4, eos_ids=())


@pytest.fixture(scope="module")
def lm():
    from prompt_cache.tiny import tiny_model

    return tiny_model("llama")


def unit_keys(pc, name):
    s = pc.schemas[name]
    return {u: encoder.unit_key(s.plan, u, pc.lm, pc.storage_dtype) for u in s.plan.units}


# ---------------------------------------------------------------- 6: pins by content key


def test_pinning_keeps_entries_shared_with_a_schema_stored_first(lm, tmp_path):
    pc = PromptCache(lm, AttentionStore(MemoryTier(1 << 30), None))
    for text in (A, B, C):
        pc.add_schema(text)
    shared = set(unit_keys(pc, "a").values()) & set(unit_keys(pc, "b").values())
    assert shared  # the root text (system prompt) is the same entry in both schemas
    pc.encode("a")  # the shared entry is recorded under schema "a"
    pc.encode("b")
    pc.pin("b")
    # Leave room for b's entries and c's module minus one byte: putting c's module must evict
    # something, and only unpinned entries may go.
    cfg = lm.model.config
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4
    big = per_token * len(pc.schemas["c"].plan.units["big"])
    need = sum(pc.store.memory.get(k).nbytes for k in unit_keys(pc, "b").values())
    pc.store.memory.budget_bytes = need + big - 1
    pc.encode("c")
    # expected: every entry of "b", the shared one included, is still in memory
    assert set(unit_keys(pc, "b").values()) <= set(pc.store.memory.keys_lru())
    pc.store.memory.budget_bytes = 1
    pc.unpin("b")
    assert not set(unit_keys(pc, "b").values()) & set(pc.store.memory.keys_lru())


def test_two_schemas_pinning_a_shared_entry_keep_it_until_both_unpin(lm):
    pc = PromptCache(lm, AttentionStore(MemoryTier(1 << 30), None))
    for text in (A, B, C):
        pc.add_schema(text)
    (shared,) = set(unit_keys(pc, "a").values()) & set(unit_keys(pc, "b").values())
    pc.encode("a")
    pc.encode("b")
    pc.pin("a")
    pc.pin("b")
    pc.unpin("a")
    pc.store.memory.budget_bytes = 1
    pc.encode("c")
    assert shared in pc.store.memory  # "b" still holds it
    pc.unpin("b")
    assert shared not in pc.store.memory


# ---------------------------------------------------------------- 9: served entries match the plan


def test_a_forged_entry_with_a_valid_checksum_is_recomputed_not_served(lm, tmp_path):
    pc = PromptCache(lm, open_store(tmp_path, lm))
    pc.add_schema(A)
    pc.add_schema(B)
    pc.encode("a")
    pc.encode("b")
    keys_a, keys_b = unit_keys(pc, "a"), unit_keys(pc, "b")
    disk = DiskTier(tmp_path)
    honest = disk.get(keys_a["rivers"])
    other = disk.get(keys_b["hills"])
    # Another entry's states under the right key, with a recomputed checksum: self-consistent.
    forged = KVEntry(dataclasses.replace(other.meta, key=honest.meta.key), other.keys, other.values,
                     other.token_ids, other.positions, other.replaceable)
    disk.delete(keys_a["rivers"])
    disk.put(forged)
    fresh = PromptCache(lm, open_store(tmp_path, lm))
    fresh.add_schema(A)
    plan = fresh.schemas["a"].plan
    entries = encoder.ensure_encoded(plan, lm, fresh.store, fresh.storage_dtype)
    got = entries["rivers"]
    idx = plan.units["rivers"]
    assert got.matches(plan.token_ids[idx], plan.positions[idx])
    assert all(torch.equal(x, y) for x, y in zip(got.keys, honest.keys))
    assert DiskTier(tmp_path).get(keys_a["rivers"]).matches(plan.token_ids[idx], plan.positions[idx])


# ---------------------------------------------------------------- 4, 10: the store folder


def test_opening_a_store_writes_nothing_until_an_entry_is_stored(lm, tmp_path):
    root = tmp_path / "store"
    pc = PromptCache(lm, open_store(root, lm))
    assert not root.exists()
    with pytest.raises(Exception):
        pc.add_schema("<schema name='x'><module name='m'>unclosed</schema>")
    assert not root.exists()
    pc.add_schema(A)
    pc.encode("a")
    assert (root / "owner.json").is_file()


def test_two_models_opening_a_fresh_store_cannot_both_store_into_it(tmp_path):
    from prompt_cache.tiny import tiny_model

    m1, m2 = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    first, second = PromptCache(m1, open_store(tmp_path, m1)), PromptCache(m2, open_store(tmp_path, m2))
    for pc in (first, second):
        pc.add_schema(A)
    first.encode("a")
    with pytest.raises(StoreMismatch, match="holds states of model"):
        second.encode("a")
    assert {row.meta.model_fingerprint for row in first.store.entries()} == {m1.fingerprint}
    assert len(list(tmp_path.rglob("*.safetensors"))) == len(first.schemas["a"].plan.units)


def test_answers_match_after_a_store_round_trip(lm, tmp_path):
    # the copy-on-load path serves the same states as the memory tier did
    pc = PromptCache(lm, open_store(tmp_path, lm))
    pc.add_schema(A)
    prompt = '<prompt schema="a"><rivers/>Where do rivers go?</prompt>'
    want = pc.answer(prompt, config=GREEDY)
    again = PromptCache(lm, open_store(tmp_path, lm))
    again.add_schema(A)
    assert again.answer(prompt, config=GREEDY).token_ids == want.token_ids


def test_encode_ms_counts_entries_re_encoded_because_their_files_were_damaged(lm, tmp_path):
    pc = PromptCache(lm, open_store(tmp_path, lm))
    pc.add_schema(A)
    pc.encode("a")
    for f in tmp_path.rglob("*.safetensors"):
        f.write_bytes(f.read_bytes()[:-9])
    fresh = PromptCache(lm, open_store(tmp_path, lm))
    fresh.add_schema(A)
    r = fresh.answer('<prompt schema="a"><rivers/>Where do rivers go?</prompt>', config=GREEDY)
    assert r.timing.encode_ms > 0


def test_two_models_racing_on_a_fresh_store_end_with_one_model_in_it(tmp_path, monkeypatch):
    import tempfile
    import threading
    import time

    from prompt_cache.tiny import tiny_model

    real = tempfile.mkstemp

    def slow_mkstemp(*a, **k):  # both processes get past "no owner yet" before either writes
        out = real(*a, **k)
        time.sleep(0.2)
        return out

    monkeypatch.setattr(tempfile, "mkstemp", slow_mkstemp)
    models = [tiny_model("llama", seed=0), tiny_model("llama", seed=1)]
    refused = []

    def run(m):
        try:
            pc = PromptCache(m, open_store(tmp_path, m))
            pc.add_schema(A)
            pc.encode("a")
        except StoreMismatch:
            refused.append(m.name)

    threads = [threading.Thread(target=run, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # expected: one model was refused and the store holds the states of the other alone
    assert len(refused) == 1
    fingerprints = {row.meta.model_fingerprint for row in AttentionStore.from_dir(tmp_path).entries()}
    assert len(fingerprints) == 1
