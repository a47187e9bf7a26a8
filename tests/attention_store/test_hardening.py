"""Disk tier and store folder under hostile conditions: files changed underneath, forged, misfiled, symlinked."""

import errno
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from attention_store import admin
from attention_store.entry import KVEntry
from attention_store.errors import StoreError, StoreMismatch
from attention_store.keys import entry_key
from attention_store.owner import claim_owner
from attention_store.store import AttentionStore, check_store_dir
from attention_store.tiers import CORRUPT_DIR, DiskTier


def make_entry(seed=0, tokens=5, layers=2, kv_heads=2, head_dim=4, schema="s", module="m"):
    gen = torch.Generator().manual_seed(seed)
    shape = (1, kv_heads, tokens, head_dim)
    keys = [torch.randn(shape, generator=gen) for _ in range(layers)]
    values = [torch.randn(shape, generator=gen) for _ in range(layers)]
    token_ids = torch.randint(3, 259, (tokens,), generator=gen)
    positions = torch.arange(10, 10 + tokens)
    key = entry_key(seed=seed, token_ids=token_ids, position_ids=positions, schema=schema, module=module)
    return KVEntry.create(key=key, schema=schema, module=module, model="tiny", model_fingerprint="m" * 64,
                          policy="independent", keys=keys, values=values, token_ids=token_ids,
                          positions=positions, replaceable=torch.zeros(tokens, dtype=torch.bool))


def same_tensors(a: KVEntry, b: KVEntry) -> bool:
    return all(torch.equal(x, y) for x, y in zip((*a.keys, *a.values), (*b.keys, *b.values)))


# ---------------------------------------------------------------- 1: served states are copies


def test_a_file_rewritten_in_place_after_loading_does_not_change_served_states(tmp_path):
    disk = DiskTier(tmp_path)
    e, other = make_entry(seed=1), make_entry(seed=2)
    disk.put(e)
    got = disk.get(e.meta.key)
    path = disk.path(e.meta.key)
    # What `cp other.safetensors path` does: the same inode, rewritten in place with other bytes.
    DiskTier(tmp_path / "o").put(other)
    src = (tmp_path / "o" / other.meta.key[:2] / f"{other.meta.key}.safetensors").read_bytes()
    with open(path, "r+b") as fh:
        fh.seek(0)
        data = bytearray(fh.read())
        data[-64:] = src[-64:]  # payload bytes of the other entry
        fh.seek(0)
        fh.write(bytes(data))
    assert same_tensors(got, e)  # the loaded entry still holds what was verified


def test_truncating_a_loaded_file_in_place_does_not_crash_the_reader(tmp_path):
    # Run in a subprocess: with memory-mapped states the process dies with SIGBUS on the next read.
    script = textwrap.dedent(f"""
        import os, sys, torch
        sys.path.insert(0, {str(os.getcwd())!r})
        sys.path.insert(0, {str(os.path.dirname(__file__))!r})
        from test_hardening import make_entry
        from attention_store.tiers import DiskTier
        disk = DiskTier({str(tmp_path)!r})
        e = make_entry(seed=3, tokens=2048, head_dim=64)
        disk.put(e)
        got = disk.get(e.meta.key)
        os.truncate(disk.path(e.meta.key), 16)
        total = sum(float(t.double().sum()) for t in (*got.keys, *got.values))
        want = sum(float(t.double().sum()) for t in (*e.keys, *e.values))
        assert total == want, (total, want)
        assert disk.get(e.meta.key) is None  # the truncated file is a miss (recomputed), not a crash
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=os.getcwd())
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert out.stdout.strip() == "ok"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_in_place_of_an_entry_is_a_miss_not_a_hang(tmp_path):
    disk = DiskTier(tmp_path)
    e = make_entry()
    disk.path(e.meta.key).parent.mkdir(parents=True)
    os.mkfifo(disk.path(e.meta.key))
    assert disk.get(e.meta.key) is None
    disk.put(e)
    assert same_tensors(disk.get(e.meta.key), e)


# ---------------------------------------------------------------- 9: metadata under the checksum


def test_edited_metadata_fails_the_checksum(tmp_path, caplog):
    disk = DiskTier(tmp_path)
    e = make_entry(schema="alpha")
    disk.put(e)
    path = disk.path(e.meta.key)
    data = path.read_bytes()
    assert data.count(b"alpha") == 1
    path.write_bytes(data.replace(b"alpha", b"omega"))  # same length: a well-formed file with other metadata
    with caplog.at_level(logging.WARNING):
        assert disk.get(e.meta.key) is None
    assert any("checksum" in r.getMessage() for r in caplog.records)


def test_files_of_the_older_format_are_recomputed_not_read(tmp_path):
    from safetensors.torch import save

    disk = DiskTier(tmp_path)
    e = make_entry()
    disk.put(e)
    path = disk.path(e.meta.key)
    tensors = {k: v.contiguous() for k, v in e.tensors().items()}
    path.write_bytes(save(tensors, metadata={"format": "pml-kv/1", "meta": e.meta.to_json(), "checksum": "x"}))
    assert disk.get(e.meta.key) is None and not path.exists()  # removed so the recomputed entry can be stored
    disk.put(e)
    assert same_tensors(disk.get(e.meta.key), e)


def test_store_get_with_expectation_quarantines_a_self_consistent_forgery(tmp_path):
    honest, other = make_entry(seed=1), make_entry(seed=2)
    store = AttentionStore.from_dir(tmp_path)
    # Another entry's states under the honest key, with a recomputed (valid) checksum.
    forged = KVEntry(honest.meta, other.keys, other.values, other.token_ids, other.positions, other.replaceable)
    store.disk.put(forged)
    assert store.disk.get(honest.meta.key) is not None  # the file alone is self-consistent
    assert store.get(honest.meta.key, expect=(honest.token_ids, honest.positions)) == (None, None)
    assert honest.meta.key not in store  # moved aside, so the recomputed entry can be stored
    store.put(honest)
    got, _ = store.get(honest.meta.key, expect=(honest.token_ids, honest.positions))
    assert same_tensors(got, honest)


def test_entry_matches():
    e = make_entry()
    assert e.matches(e.token_ids.tolist(), e.positions.tolist())
    assert not e.matches(e.token_ids, e.positions + 1)
    assert not e.matches(e.token_ids[:-1], e.positions[:-1])


# ---------------------------------------------------------------- 15: one publish per entry


def test_a_key_already_on_disk_is_not_written_again(tmp_path):
    a, b = DiskTier(tmp_path), DiskTier(tmp_path)
    e = make_entry()
    a.put(e)
    before = os.stat(a.path(e.meta.key))
    b.put(e)
    a.put(e)
    after = os.stat(a.path(e.meta.key))
    assert (a.published, b.published) == (1, 0)
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)


def test_threads_racing_to_publish_one_key_publish_it_once(tmp_path, monkeypatch):
    import tempfile

    real = tempfile.mkstemp

    def slow_mkstemp(*a, **k):  # widen the window between "not there" and "published"
        out = real(*a, **k)
        time.sleep(0.05)
        return out

    monkeypatch.setattr(tempfile, "mkstemp", slow_mkstemp)
    tiers = [DiskTier(tmp_path) for _ in range(4)]
    e = make_entry()
    threads = [threading.Thread(target=t.put, args=(e,)) for t in tiers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(t.published for t in tiers) == 1
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [f"{e.meta.key}.safetensors"]


# ---------------------------------------------------------------- 10: one owner per folder


def _owner(n):
    return {"model": f"m{n}", "model_fingerprint": str(n) * 64, "tokenizer_fingerprint": "t" * 64}


def test_two_models_claiming_a_fresh_folder_at_once_one_wins(tmp_path, monkeypatch):
    import tempfile

    real = tempfile.mkstemp

    def slow_mkstemp(*a, **k):
        out = real(*a, **k)
        time.sleep(0.1)
        return out

    monkeypatch.setattr(tempfile, "mkstemp", slow_mkstemp)
    tiers = [DiskTier(tmp_path, owner=_owner(n)) for n in (1, 2)]
    errors = []

    def write(tier, seed):
        try:
            tier.put(make_entry(seed=seed))
        except StoreMismatch as e:
            errors.append(e)

    threads = [threading.Thread(target=write, args=(t, i)) for i, t in enumerate(tiers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # expected: exactly one claimed the folder and stored; the other was refused and stored nothing
    assert len(errors) == 1 and "holds states of model" in str(errors[0])
    winner = json.loads((tmp_path / "owner.json").read_text())
    assert sum(t.published for t in tiers) == 1
    assert [t.published for t in tiers] == [int(winner["model"] == "m1"), int(winner["model"] == "m2")]


def test_claim_owner_is_idempotent_for_the_same_model(tmp_path):
    assert claim_owner(tmp_path, _owner(1)) is True
    assert claim_owner(tmp_path, _owner(1)) is False
    with pytest.raises(StoreMismatch):
        claim_owner(tmp_path, _owner(2))


# ---------------------------------------------------------------- 4: which folders can be stores


def test_obviously_wrong_store_folders_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    for bad, why in [("/", "filesystem root"), (tmp_path / "home", "home folder")]:
        with pytest.raises(StoreError, match=why):
            check_store_dir(bad)
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="not a folder"):
        check_store_dir(tmp_path / "file")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "thesis.tex").write_text("x")
    with pytest.raises(StoreError, match="not a store"):
        check_store_dir(tmp_path / "docs")
    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    with pytest.raises(StoreError, match="not writable"):
        check_store_dir(tmp_path / "new")
    assert check_store_dir(tmp_path / "new", writable=False) == tmp_path / "new"
    assert not (tmp_path / "new").exists()  # checking creates nothing


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_failed_write_is_a_store_error_and_leaves_no_file(tmp_path, monkeypatch, code):
    disk = DiskTier(tmp_path)
    e = make_entry()

    def fail(*a, **k):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(StoreError, match="cannot write to store"):
        disk.put(e)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


# ---------------------------------------------------------------- 7: confined to the store folder


def test_symlinked_shard_is_neither_listed_nor_deleted_through(tmp_path):
    outside = tmp_path / "outside"
    victim = make_entry(seed=5)
    DiskTier(outside).put(victim)
    target = outside / victim.meta.key[:2]
    store = tmp_path / "store"
    DiskTier(store).put(make_entry(seed=6))
    (store / victim.meta.key[:2]).symlink_to(target, target_is_directory=True)
    disk = DiskTier(store)
    assert victim.meta.key not in disk and disk.get(victim.meta.key) is None
    assert victim.meta.key not in {m.key for m in disk.entries()}
    assert admin.remove([store], everything=True) == 1
    assert admin.remove([store], [victim.meta.key[:8]]) == 0
    assert (target / f"{victim.meta.key}.safetensors").is_file()  # outside the store: untouched
    with pytest.raises(StoreError, match="symlink"):
        disk.put(victim)
    assert (target / f"{victim.meta.key}.safetensors").stat().st_nlink == 1


def test_rm_all_removes_misfiled_entries_and_empty_prefix_is_refused(tmp_path):
    disk = DiskTier(tmp_path)
    e = make_entry()
    disk.put(e)
    wrong = "00" if not e.meta.key.startswith("00") else "ff"
    (tmp_path / wrong).mkdir()
    misfiled = tmp_path / wrong / f"{e.meta.key}.safetensors"
    misfiled.write_bytes(disk.path(e.meta.key).read_bytes())
    for bad in ("", "XYZ", "../"):
        with pytest.raises(StoreError, match="not a key prefix"):
            admin.remove([tmp_path], [bad])
    with pytest.raises(StoreError, match="--all"):
        admin.remove([tmp_path])
    assert e.meta.key in disk and misfiled.exists()
    assert admin.remove([tmp_path], everything=True) == 2
    assert not misfiled.exists() and e.meta.key not in disk


def test_verify_sets_misfiled_files_aside(tmp_path):
    disk = DiskTier(tmp_path)
    e = make_entry()
    disk.put(e)
    wrong = "00" if not e.meta.key.startswith("00") else "ff"
    (tmp_path / wrong).mkdir()
    (tmp_path / wrong / f"{e.meta.key}.safetensors").write_bytes(disk.path(e.meta.key).read_bytes())
    assert admin.verify([tmp_path]) == {e.meta.key: True, f"{e.meta.key}.safetensors": False}


# ---------------------------------------------------------------- 8: leftovers and quarantine bounded


def test_opening_a_store_removes_temp_files_older_than_a_run(tmp_path, tiny):
    from attention_store.store import open_store

    lm = tiny("llama")
    shard = tmp_path / "ab"
    shard.mkdir()
    old, young = shard / ".abc.safetensors.x1.tmp", shard / ".abd.safetensors.x2.tmp"
    old.write_bytes(b"partial")
    young.write_bytes(b"being written")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    open_store(tmp_path, lm)
    assert not old.exists() and young.exists()  # a young temp file may be a live writer's


def test_corrupt_folder_keeps_only_the_newest(tmp_path):
    disk = DiskTier(tmp_path, corrupt_keep=3)
    entries = [make_entry(seed=i) for i in range(6)]
    for i, e in enumerate(entries):
        disk.put(e)
        path = disk.path(e.meta.key)
        path.write_bytes(path.read_bytes()[:-5])
        assert disk.get(e.meta.key) is None
        os.utime(tmp_path / CORRUPT_DIR / path.name, (1000 + i, 1000 + i))  # set aside in this order
    kept = admin.list_corrupt([tmp_path])
    assert [c.path.name for c in kept] == [f"{e.meta.key}.safetensors" for e in entries[:2:-1]]
