"""Data-parallel experiments: the item split, shard files and merge, and two launched processes agreeing with one."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from experiments import distributed
from experiments.distributed import World

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("n_items", [0, 1, 4, 7, 10])
@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_share_partitions_items_in_order(n_items, size):
    items = list(range(n_items))
    shares = [distributed.share(items, World(r, size)) for r in range(size)]
    # expected: the shares, concatenated by rank, are the item list itself; sizes differ by at most one
    assert sum(shares, []) == items
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_world_from_env_and_bad_values():
    assert distributed.world({}) == World(0, 1, 0)
    assert distributed.world({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == World(3, 4, 1)
    with pytest.raises(ValueError, match="not within"):
        distributed.world({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match="integers"):
        distributed.world({"RANK": "x"})


def test_shard_paths_and_merge(tmp_path):
    merged = tmp_path / "items.jsonl"
    # expected: one process writes the merged file itself; several write one shard each
    assert distributed.shard_path(merged, World(0, 1)) == merged
    paths = [distributed.shard_path(merged, World(r, 2)) for r in range(2)]
    assert [p.name for p in paths] == ["items.rank0-of2.jsonl", "items.rank1-of2.jsonl"]
    merged.write_text(json.dumps({"id": "a", "v": 0}) + "\n")
    paths[0].write_text(json.dumps({"id": "b", "v": 1}) + "\n" + '{"id": "cut')  # a line cut by a kill
    paths[1].write_text(json.dumps({"id": "c", "v": 2}) + "\n" + json.dumps({"id": "a", "v": 9}) + "\n")
    assert distributed.shard_files(merged) == paths
    assert distributed.merge_shards(merged) == 3
    rows = [json.loads(line) for line in merged.read_text().splitlines()]
    # expected: every id once, the merged file's row kept over a shard's, shards gone
    assert [(r["id"], r["v"]) for r in rows] == [("a", 0), ("b", 1), ("c", 2)]
    assert distributed.shard_files(merged) == [] and distributed.merge_shards(merged) == 0


def test_item_log_counts_other_shards_as_done_but_appends_to_its_own(tmp_path):
    from experiments.outputs import ItemLog

    other = tmp_path / "items.rank1-of2.jsonl"
    other.write_text(json.dumps({"id": "x"}) + "\n")
    own = tmp_path / "items.rank0-of2.jsonl"
    log = ItemLog(own, also_read=[other])
    assert log.done("x") and not log.done("y")
    log.add({"id": "y"})
    assert other.read_text().count("\n") == 1 and json.loads(own.read_text())["id"] == "y"


def test_placement_rules():
    args = Namespace(device=None, device_map="auto")
    assert distributed.placement(args, World(0, 1), None) == {"device": None, "device_map": "auto"}
    with pytest.raises(ValueError, match="--device-map auto with 2 processes"):
        distributed.placement(args, World(0, 2), None)
    args = Namespace(device="cuda:1", device_map=None)
    # expected: an explicit --device wins over the process's own device
    assert distributed.placement(args, World(1, 2), Namespace(device="cuda:1"))["device"] == "cuda:1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quality(out: Path, data: Path, launch: list[str]) -> subprocess.CompletedProcess:
    args = ["quality", "--model", "tiny:llama", "--tasks", "longbench_mini/hotpotqa", "--limit", "4",
            "--max-context-tokens", "200", "--max-new-tokens", "3", "--kl-tokens", "3", "--threads", "1",
            "--data", str(data), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, *launch, "-m", "experiments", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def _summary(out: Path) -> list[dict]:
    with (out / "summary.csv").open() as f:
        return list(csv.DictReader(f))


TIMED = {"ttft_ms", "cache_ms", "prefill_ms", "encode_ms", "wall_s"}


def _untimed(row):
    if isinstance(row, dict):
        return {k: _untimed(v) for k, v in row.items() if k not in TIMED}
    return row


def test_two_launched_processes_give_the_one_process_summary(tmp_path, data):
    one, two = tmp_path / "one", tmp_path / "two"
    single = _quality(one, data, [])
    assert single.returncode == 0, single.stderr[-2000:]
    # On a machine without CUDA, `accelerate launch --cpu` starts one process (more need mpirun);
    # --multi_gpu starts N with torchrun, and the experiment joins them over gloo on 127.0.0.1.
    launch = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1",
              "--main_process_port", str(_free_port())]
    double = _quality(two, data, launch)
    assert double.returncode == 0, double.stderr[-2000:]
    assert "process 0 of 2" in double.stderr and "process 1 of 2" in double.stderr

    a, b = _summary(one), _summary(two)
    # expected: every column equal except timings and the recorded world size
    drop = lambda rows: [{k: v for k, v in r.items() if not k.endswith("_ms") and k != "world_size"} for r in rows]  # noqa: E731
    assert drop(a) == drop(b)
    assert (a[0]["world_size"], b[0]["world_size"], b[0]["n"]) == ("1", "2", "4")
    assert b[0]["placement"] == "single device (cpu)"

    # expected: the shards were merged into the one items.jsonl, holding each item once, with the
    # same answers as the single process's
    task = Path("longbench_mini/hotpotqa")
    assert sorted(p.name for p in (two / task).iterdir()) == ["items.jsonl"]
    rows = lambda out: {r["id"]: _untimed(r) for r in map(json.loads, (out / task / "items.jsonl").read_text().splitlines())}  # noqa: E731
    assert len((two / task / "items.jsonl").read_text().splitlines()) == 4
    assert rows(one) == rows(two)
    assert "processes: 2" in (two / "report.md").read_text()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("experiment", ["quality", "latency", "sink"])
def test_experiment_device_cuda_without_cuda_is_one_line_exit_2(experiment, data, tmp_path, capsys):
    from experiments import cli

    argv = [experiment, "--model", "tiny:llama", "--data", str(data), "--out", str(tmp_path / "o"), "--device", "cuda"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CUDA is not available" in err
