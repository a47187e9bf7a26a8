"""Disk-tier entries read straight into cache buffers (`attention_store.direct`)."""

import logging

import pytest
import torch

from attention_store.direct import DamagedEntry, EntryFile
from attention_store.store import AttentionStore
from attention_store.tiers import DiskTier, MemoryTier
from tests.attention_store.test_store import _flip_payload, _garbage_header, _truncate, _wrong_key, make_entry


def _buffers(e, capacity, dtype):
    _, heads, _, d = e.keys[0].shape
    fill = lambda: torch.full((1, heads, capacity, d), float("nan"), dtype=dtype)  # noqa: E731
    return [fill() for _ in e.keys], [fill() for _ in e.values]


@pytest.mark.parametrize("stored,into", [(torch.float32, torch.float32), (torch.float16, torch.float32),
                                         (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("spans", [[(0, 9, 0)], [(0, 3, 2), (5, 9, 5)], [(4, 6, 0)], [(7, 9, 1), (1, 2, 0)]])
def test_read_into_places_each_run(tmp_path, monkeypatch, stored, into, spans):
    monkeypatch.setattr("attention_store.direct.SCRATCH_BYTES", 24)  # several scratch rounds per gap
    disk = DiskTier(tmp_path)
    e = make_entry(layers=3, kv_heads=2, tokens=9, head_dim=4, dtype=stored)
    disk.put(e)
    f = disk.open(e.meta.key)
    assert isinstance(f, EntryFile) and f.meta == e.meta and f.num_layers == 3
    assert torch.equal(f.token_ids, e.token_ids) and torch.equal(f.positions, e.positions)
    assert torch.equal(f.replaceable, e.replaceable) and f.matches(e.token_ids, e.positions)
    keys, values = _buffers(e, 12, into)
    f.read_into(keys, values, spans)
    for got, want in zip((*keys, *values), (*e.keys, *e.values)):
        filled = torch.zeros(12, dtype=torch.bool)
        for lo, hi, at in spans:
            assert torch.equal(got[:, :, at:at + hi - lo], want[:, :, lo:hi].to(into))
            filled[at:at + hi - lo] = True
        assert got[:, :, ~filled].isnan().all()  # nothing written outside the runs
    assert f.fd == -1  # closed after the read


def test_damage_in_the_states_is_found_while_reading(tmp_path, caplog):
    disk = DiskTier(tmp_path)
    e = make_entry(tokens=6)
    disk.put(e)
    _flip_payload(disk.path(e.meta.key))
    f = disk.open(e.meta.key)  # the header is sound: the damage is in the states
    assert f is not None
    keys, values = _buffers(e, 6, torch.float32)
    with caplog.at_level(logging.WARNING), pytest.raises(DamagedEntry, match="set aside"):
        f.read_into(keys, values, [(0, 6, 0)])
    assert e.meta.key not in disk and any("damaged" in r.getMessage() for r in caplog.records)


def test_file_truncated_after_open_is_damage(tmp_path):
    disk = DiskTier(tmp_path)
    e = make_entry(tokens=6)
    disk.put(e)
    f = disk.open(e.meta.key)
    _truncate(disk.path(e.meta.key))  # in place, while open
    with pytest.raises(DamagedEntry, match="ends at byte"):
        f.read_into(*_buffers(e, 6, torch.float32), [(0, 6, 0)])
    assert disk.open(e.meta.key) is None and e.meta.key not in disk  # the next open sets it aside


@pytest.mark.parametrize("damage", [_garbage_header, _wrong_key, _truncate])
def test_damaged_header_is_a_miss_at_open(tmp_path, damage):
    disk = DiskTier(tmp_path / "store")
    e = make_entry()
    disk.put(e)
    damage(disk.path(e.meta.key))
    assert disk.open(e.meta.key) is None
    assert e.meta.key not in disk


def test_store_defers_disk_hits_only_when_it_does_not_promote(tmp_path):
    e = make_entry()
    AttentionStore.from_dir(tmp_path).put(e)
    promoting = AttentionStore(MemoryTier(1 << 20), DiskTier(tmp_path))
    got, tier = promoting.get(e.meta.key, defer=True)
    assert tier == "disk" and not isinstance(got, EntryFile) and e.meta.key in promoting.memory
    one_shot = AttentionStore(MemoryTier(1 << 20), DiskTier(tmp_path), promote_disk_hits=False)
    got, tier = one_shot.get(e.meta.key, defer=True)
    assert tier == "disk" and isinstance(got, EntryFile) and e.meta.key not in one_shot.memory
    got, tier = one_shot.get(e.meta.key)  # not deferred: the ordinary read, still not promoted
    assert tier == "disk" and not isinstance(got, EntryFile) and e.meta.key not in one_shot.memory
    with pytest.raises(ValueError, match="already read"):
        f, _ = one_shot.get(e.meta.key, defer=True)
        f.close()
        f.read_into(*_buffers(e, 5, torch.float32), [(0, 5, 0)])


def test_load_reads_the_whole_entry(tmp_path):
    disk = DiskTier(tmp_path)
    e = make_entry()
    disk.put(e)
    got = disk.open(e.meta.key).load()
    assert torch.equal(torch.cat(got.keys), torch.cat(e.keys))
