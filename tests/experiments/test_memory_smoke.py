"""Smoke test: the memory experiment runs end to end on tiny random models."""

from __future__ import annotations

import argparse
import csv

import pytest

from experiments import memory

pytestmark = pytest.mark.usefixtures("data")  # skips without the shared data


def test_memory_writes_tables(tmp_path):
    out = tmp_path / "mem"
    parser = argparse.ArgumentParser()
    memory.add_arguments(parser)
    args = parser.parse_args(["--model", "tiny:llama-gqa,tiny:gemma3", "--probe-tokens", "24", "--doc-tokens", "40",
                              "--passages", "2", "--out", str(out)])
    assert memory.run(args) == 0
    with (out / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    bpt = [r for r in rows if r["table"] == "bytes_per_token"]
    work = [r for r in rows if r["table"] == "workload"]
    assert len(bpt) == 2 * 3 and len(work) == 2 * 2  # models x dtypes, models x workloads
    for r in bpt:
        # the stored key/value bytes are exactly what the config predicts; files add a little
        assert float(r["measured_bytes_per_token"]) == float(r["computed_bytes_per_token"])
        assert float(r["disk_bytes_per_token"]) > float(r["measured_bytes_per_token"])
    fp32 = {r["model"]: float(r["computed_bytes_per_token"]) for r in bpt if r["dtype"] == "fp32"}
    assert fp32 == {"tiny:llama-gqa": 2 * 2 * 2 * 16 * 4, "tiny:gemma3": 2 * 4 * 2 * 16 * 4}
    for col in ("workload", "stored_tokens", "store_MiB", "disk_MiB", "rss_peak_encode_MiB", "rss_growth_answer_full_MiB"):
        assert all(r[col] != "" for r in work), col
    report = (out / "report.md").read_text()
    assert "Bytes per stored token" in report and "musique-2-passages" in report
