"""Storage tiers: content keys, exact disk round trips, damage detection, LRU budget, promotion."""

import logging
import multiprocessing
import threading

import pytest
import torch

from attention_store.entry import KVEntry
from attention_store.keys import EntryKey, entry_key
from attention_store.store import AttentionStore
from attention_store.tiers import DiskTier, MemoryTier

KEY_FIELDS = dict(model_fingerprint="m" * 64, tokenizer_fingerprint="t" * 64, dtype=torch.float16,
                  token_ids=[1, 5, 7, 9], position_ids=[0, 1, 2, 3], context="c" * 64, policy="scoped")


def make_entry(layers=2, kv_heads=2, tokens=5, head_dim=4, dtype=torch.float32, schema="s", seed=0, module="m"):
    gen = torch.Generator().manual_seed(seed)
    shape = (1, kv_heads, tokens, head_dim)
    keys = [torch.randn(shape, generator=gen).to(dtype) for _ in range(layers)]
    values = [torch.randn(shape, generator=gen).to(dtype) for _ in range(layers)]
    token_ids = torch.randint(3, 259, (tokens,), generator=gen)
    key = entry_key(**{**KEY_FIELDS, "dtype": dtype, "token_ids": token_ids, "policy": f"p{seed}-{schema}-{module}"})
    return KVEntry.create(key=key, schema=schema, module=module, model="tiny", model_fingerprint="m" * 64,
                          policy="scoped", keys=keys, values=values, token_ids=token_ids,
                          positions=torch.arange(10, 10 + tokens), replaceable=torch.arange(tokens) % 2 == 0)


def assert_same(a: KVEntry, b: KVEntry):
    assert a.meta == b.meta
    for x, y in zip((*a.keys, *a.values), (*b.keys, *b.values)):
        assert x.dtype == y.dtype
        assert torch.equal(x, y)
    assert torch.equal(a.token_ids, b.token_ids) and torch.equal(a.positions, b.positions)
    assert torch.equal(a.replaceable, b.replaceable)


# ---------------------------------------------------------------- keys


@pytest.mark.parametrize("field,other", [
    ("model_fingerprint", "n" * 64), ("tokenizer_fingerprint", "u" * 64), ("dtype", torch.bfloat16),
    ("policy", "isolated"), ("token_ids", [1, 5, 7, 8]), ("token_ids", [1, 5, 7]),
    ("position_ids", [0, 1, 2, 4]), ("context", "d" * 64),
])
def test_key_differs_when_any_field_differs(field, other):
    assert entry_key(**KEY_FIELDS) != entry_key(**{**KEY_FIELDS, field: other})


def test_key_is_canonical():
    # Same content in another container type, or in another argument order, gives the same key.
    a = entry_key(**KEY_FIELDS)
    b = entry_key(**{**dict(reversed(list(KEY_FIELDS.items()))), "token_ids": torch.tensor([1, 5, 7, 9]),
                     "position_ids": (0, 1, 2, 3)})
    assert a == b and len(a) == 64
    with pytest.raises(TypeError):
        entry_key(x=object())


# ---------------------------------------------------------------- entries


def test_entry_validates_shapes():
    e = make_entry()
    with pytest.raises(ValueError, match="layer 1"):
        KVEntry(e.meta, (e.keys[0], e.keys[1][:, :, :3]), e.values, e.token_ids, e.positions, e.replaceable)
    with pytest.raises(ValueError, match="token_ids"):
        KVEntry(e.meta, e.keys, e.values, e.token_ids[:3], e.positions, e.replaceable)
    with pytest.raises(ValueError, match="1, kv_heads"):
        KVEntry(e.meta, tuple(k[0] for k in e.keys), tuple(v[0] for v in e.values), e.token_ids, e.positions,
                e.replaceable)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_bytes_per_token(dtype):
    layers, kv_heads, head_dim, tokens = 3, 2, 8, 7
    e = make_entry(layers=layers, kv_heads=kv_heads, head_dim=head_dim, tokens=tokens, dtype=dtype)
    size = torch.tensor([], dtype=dtype).element_size()
    assert e.nbytes / tokens == 2 * layers * kv_heads * head_dim * size
    assert e.meta.nbytes == e.nbytes and e.meta.dtype == str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------- disk


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_disk_round_trip_exact(tmp_path, dtype):
    disk = DiskTier(tmp_path)
    e = make_entry(dtype=dtype)
    disk.put(e)
    assert e.meta.key in disk
    assert disk.path(e.meta.key) == tmp_path / e.meta.key[:2] / f"{e.meta.key}.safetensors"
    got = disk.get(e.meta.key)
    assert_same(got, e)
    assert disk.entries() == [e.meta]
    assert disk.verify_all() == {e.meta.key: True}
    assert disk.delete(e.meta.key) and not disk.delete(e.meta.key)
    assert disk.get(e.meta.key) is None


def _flip_payload(path):
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF  # inside the tensor payload (after the header)
    path.write_bytes(bytes(data))


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 37])


def _garbage_header(path):
    data = bytearray(path.read_bytes())
    data[8:40] = b"{garbage" + b"\xff" * 24
    path.write_bytes(bytes(data))


def _wrong_key(path):
    # a valid file for another entry sitting under this key's name
    other = make_entry(seed=99)
    DiskTier(path.parent.parent / "other").put(other)
    path.write_bytes((path.parent.parent / "other" / other.meta.key[:2] / f"{other.meta.key}.safetensors").read_bytes())


@pytest.mark.parametrize("damage", [_flip_payload, _truncate, _garbage_header, _wrong_key])
def test_damaged_file_is_detected_not_served(tmp_path, caplog, damage):
    disk = DiskTier(tmp_path / "store")
    e = make_entry()
    disk.put(e)
    damage(disk.path(e.meta.key))
    with caplog.at_level(logging.WARNING, logger="attention_store.store"):
        assert disk.get(e.meta.key) is None
        assert disk.get(e.meta.key) is None  # second miss: no second warning
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "damaged" in warnings[0].getMessage()
    assert e.meta.key not in disk  # moved aside
    disk.put(e)  # the caller recomputes and stores again
    assert_same(disk.get(e.meta.key), e)


def test_verify_finds_damage(tmp_path):
    disk = DiskTier(tmp_path, verify_on_load=False)
    good, bad = make_entry(seed=1), make_entry(seed=2)
    disk.put(good)
    disk.put(bad)
    _flip_payload(disk.path(bad.meta.key))
    assert disk.verify_all() == {good.meta.key: True, bad.meta.key: False}


def test_killed_writer_leftover_is_never_read(tmp_path):
    disk = DiskTier(tmp_path)
    e = make_entry()
    # what a writer killed before os.replace leaves behind: a partial temp file next to where the entry goes
    tmp = disk.path(e.meta.key).parent / f".{e.meta.key}.abc123.tmp"
    tmp.parent.mkdir(parents=True)
    tmp.write_bytes(b"partial")
    assert disk.get(e.meta.key) is None and e.meta.key not in disk
    assert disk.entries() == []
    assert disk.remove_stale_temp(older_than_s=-1) == 1 and not tmp.exists()


def _write_many(root, seed, n):
    disk = DiskTier(root)
    e = make_entry(seed=seed, tokens=64, head_dim=32)
    for _ in range(n):
        disk.put(e)


def test_concurrent_writers_of_one_key(tmp_path):
    # Threads and processes write the same entry; readers meanwhile see nothing or the whole entry.
    e = make_entry(seed=7, tokens=64, head_dim=32)
    threads = [threading.Thread(target=_write_many, args=(tmp_path, 7, 10)) for _ in range(3)]
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_many, args=(tmp_path, 7, 10)) for _ in range(2)]
    for w in (*threads, *procs):
        w.start()
    reader = DiskTier(tmp_path)
    seen = 0
    while any(t.is_alive() for t in threads) or any(p.is_alive() for p in procs):
        got = reader.get(e.meta.key)
        if got is not None:
            assert_same(got, e)
            seen += 1
    for t in threads:
        t.join()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    assert_same(reader.get(e.meta.key), e)
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix == ".tmp"]
    assert leftovers == [] and not (tmp_path / "corrupt").exists()


# ---------------------------------------------------------------- memory


def test_memory_tier_lru_eviction_within_budget():
    size = make_entry().nbytes
    mem = MemoryTier(budget_bytes=3 * size)
    a, b, c, d = (make_entry(seed=i) for i in range(4))
    for e in (a, b, c):
        mem.put(e)
    assert mem.get(a.meta.key) is not None  # a is now most recently used: b is the oldest
    mem.put(d)
    # expected: b evicted, 3 entries, total within budget
    assert mem.keys_lru() == [c.meta.key, a.meta.key, d.meta.key]
    assert mem.total_bytes <= mem.budget_bytes
    assert b.meta.key not in mem and mem.get(b.meta.key) is None


def test_memory_tier_pinning(caplog):
    size = make_entry().nbytes
    mem = MemoryTier(budget_bytes=2 * size)
    p1, p2 = make_entry(seed=1, schema="keep"), make_entry(seed=2, schema="keep")
    other = make_entry(seed=3, schema="other")
    p3 = make_entry(seed=4, schema="keep")
    mem.pin_keys([p1.meta.key, p2.meta.key, p3.meta.key], holder="keep")
    mem.put(p1)
    mem.put(other)
    mem.put(p2)
    # expected: the unpinned entry goes even though p1 is older
    assert set(mem.keys_lru()) == {p1.meta.key, p2.meta.key}
    with caplog.at_level(logging.WARNING, logger="attention_store.store"):
        mem.put(p3)  # pinned alone exceed the budget: kept, with a warning
    assert len(mem) == 3 and any("pinned" in r.getMessage() for r in caplog.records)
    mem.unpin_keys(holder="keep")
    assert len(mem) == 2 and mem.total_bytes <= mem.budget_bytes
    assert p1.meta.key not in mem  # the least recently used goes first


def test_memory_tier_skips_entry_bigger_than_budget():
    e = make_entry()
    mem = MemoryTier(budget_bytes=e.nbytes - 1)
    mem.put(e)
    assert len(mem) == 0


# ---------------------------------------------------------------- store


def test_store_promotes_disk_hits(tmp_path):
    e = make_entry()
    AttentionStore.from_dir(tmp_path).put(e)
    store = AttentionStore.from_dir(tmp_path, memory_budget_bytes=1 << 20)  # a fresh process: memory empty
    assert e.meta.key not in store.memory
    got, tier = store.get(e.meta.key)
    assert tier == "disk"
    assert_same(got, e)
    got, tier = store.get(e.meta.key)
    assert tier == "memory"
    assert store.entries()[0].tiers == ("memory", "disk")
    assert store.get(EntryKey("0" * 64)) == (None, None)
    assert store.delete(e.meta.key) and e.meta.key not in store


def test_store_without_memory_or_disk(tmp_path):
    e = make_entry()
    mem_only = AttentionStore(MemoryTier(1 << 20), None)
    mem_only.put(e)
    assert mem_only.get(e.meta.key)[1] == "memory"
    disk_only = AttentionStore(None, DiskTier(tmp_path))
    disk_only.put(e)
    assert disk_only.get(e.meta.key)[1] == "disk"


def test_default_store_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PML_CACHE_HOME", str(tmp_path))
    store = AttentionStore.from_dir()
    assert store.disk.root == tmp_path / "store"
