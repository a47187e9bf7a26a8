"""One store folder shared by several processes: each entry written once, never read half-written."""

import multiprocessing
import os
import signal
import time

import pytest

SCHEMA = """<schema name="shared">
  You answer questions about notes.
  <module name="a">First note: rivers run to the sea.</module>
  <module name="b">Second note: <parameter name="thing" length="6" scaffold="hills"/> are high.</module>
  <union><module name="c">Third note, c.</module><module name="d">Third note, d.</module></union>
</schema>"""


def _digests(root):
    """key -> checksum of every tensor of the entry, read back from disk by a fresh tier."""
    from attention_store.entry import payload_checksum
    from attention_store.tiers import DiskTier

    disk = DiskTier(root)
    return {k: payload_checksum(disk.get(k).tensors()) for k in disk._keys()}


def _encode_worker(root, barrier, results):
    from attention_store.store import open_store
    from prompt_cache.engine import PromptCache
    from prompt_cache.tiny import tiny_model

    lm = tiny_model("llama")
    pc = PromptCache(lm, open_store(root, lm))
    pc.add_schema(SCHEMA)
    barrier.wait()  # everyone encodes at the same moment
    report = pc.encode("shared")
    results.put((os.getpid(), pc.store.disk.published, report.modules, _digests(root)))


def test_four_processes_encoding_one_schema_store_each_entry_once(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_encode_worker, args=(str(tmp_path), barrier, results)) for _ in range(4)]
    for p in procs:
        p.start()
    got = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    modules = {m for _, _, m, _ in got}
    assert len(modules) == 1
    (n,) = modules
    # expected: every entry published by exactly one process, and all four read identical tensors
    assert sum(published for _, published, _, _ in got) == n
    digests = [d for _, _, _, d in got]
    assert all(d == digests[0] for d in digests) and len(digests[0]) == n
    assert not [p for p in tmp_path.rglob("*.tmp")]


def _killed_writer(root, started):
    from attention_store.store import open_store
    from prompt_cache.engine import PromptCache
    from prompt_cache.tiny import tiny_model

    real_fsync = os.fsync

    def hang_on_entries(fd):
        # The entry's temp file is complete on disk but not yet published: be killed right here.
        if ".safetensors." in os.readlink(f"/proc/self/fd/{fd}"):
            started.set()
            time.sleep(300)
        real_fsync(fd)

    os.fsync = hang_on_entries
    lm = tiny_model("llama")
    pc = PromptCache(lm, open_store(root, lm))
    pc.add_schema(SCHEMA)
    pc.encode("shared")


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to see which file is fsynced")
def test_a_writer_killed_mid_write_leaves_nothing_served_and_the_next_reader_recomputes(tmp_path, tiny):
    from attention_store.store import open_store
    from prompt_cache.engine import PromptCache

    ctx = multiprocessing.get_context("spawn")
    started = ctx.Event()
    writer = ctx.Process(target=_killed_writer, args=(str(tmp_path / "store"), started))
    writer.start()
    assert started.wait(timeout=300), "the writer never reached an entry write"
    os.kill(writer.pid, signal.SIGKILL)
    writer.join(timeout=60)
    assert writer.exitcode == -signal.SIGKILL
    assert [p.name for p in (tmp_path / "store").rglob("*.safetensors")] == []  # only its temp file is left
    assert [p for p in (tmp_path / "store").rglob(".*.tmp")]

    lm = tiny("llama")
    pc = PromptCache(lm, open_store(tmp_path / "store", lm))
    pc.add_schema(SCHEMA)
    report = pc.encode("shared")
    assert report.encoded == report.modules > 0  # nothing of the killed writer was taken as stored
    clean = PromptCache(lm, open_store(tmp_path / "clean", lm))
    clean.add_schema(SCHEMA)
    clean.encode("shared")
    assert _digests(tmp_path / "store") == _digests(tmp_path / "clean")
