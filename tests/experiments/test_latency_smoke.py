"""Smoke test: the latency experiment and the speed benchmark run end to end on a tiny random model."""

from __future__ import annotations

import argparse
import csv
import json

import pytest

from experiments import latency, speed

pytestmark = pytest.mark.usefixtures("data")  # skips without the shared data


def _args(module, argv):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


def test_latency_writes_every_output(tmp_path):
    out = tmp_path / "lat"
    argv = ["--model", "tiny:llama", "--lengths", "32,64,128", "--limit", "2", "--modules", "1,2",
            "--repeats", "2", "--new-tokens", "2", "--out", str(out)]
    assert latency.run(_args(latency, argv)) == 0
    # 2 lengths x 2 module counts x 2 repeats, each row timing all three modes
    rows = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    assert {r["length"] for r in rows} == {32, 64}
    assert all(r["context_tokens"] == r["length"] for r in rows)
    for mode in latency.MODES:
        assert all(r[f"{mode}_ttft_ms"] > 0 for r in rows)
    assert all(r["memory_cached_tokens"] == r["disk_cached_tokens"] > r["length"] - 1 for r in rows)
    with (out / "summary.csv").open() as f:
        summary = list(csv.DictReader(f))
    assert len(summary) == 2 * 2 * 3  # (length, modules) x mode
    for col in ("length", "modules", "mode", "ttft_ms_median", "ttft_ms_min", "ttft_ms_max", "cache_ms_median",
                "prefill_ms_median", "decode_tok_s_median", "speedup"):
        assert col in summary[0]
    assert (out / "ttft_vs_length.png").stat().st_size > 1000
    assert "TTFT" in (out / "report.md").read_text()
    assert not (out / "store-scratch").exists()

    # A rerun finds every item done and only rewrites the summary.
    assert latency.run(_args(latency, argv)) == 0
    assert len((out / "items.jsonl").read_text().splitlines()) == 8


def test_speed_reports_every_target(tmp_path):
    out = tmp_path / "speed"
    code = speed.run(_args(speed, ["--model", "tiny:llama", "--context", "96", "--repeats", "3", "--profile",
                                   "--out", str(out)]))
    assert code in (0, 1)  # 1 = a target missed, which a tiny model is expected to do
    report = (out / "report.md").read_text()
    for name, *_ in speed.TARGETS:
        assert name in report
    assert "PASS" in report or "FAIL" in report
    rows = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert sorted({r["mode"] for r in rows}) == sorted(speed.MODES) and len(rows) == 12
    assert "Physical limit of the cached forward" in report and "GFLOP/s" in report
    assert "Decoding after the cached prefill" in report and "identical tokens" in report


def test_speed_under_contention_and_as_fresh_cli_processes(tmp_path):
    from experiments import speed_extras

    out = tmp_path / "speed"
    code = speed.run(_args(speed, ["--model", "tiny:llama", "--context", "64", "--repeats", "3", "--contention", "1",
                                   "--cli", "--out", str(out)]))
    assert code in (0, 1)
    report = (out / "report.md").read_text()
    assert "competing processes: 1" in report and "1 still running at the end" in report
    assert "`pml run` as fresh processes" in report and "pml run, fresh processes: full / cached TTFT" in report


def test_competitors_stop_at_their_deadline_and_when_asked():
    from experiments import speed_extras

    with speed_extras.Contention(1, seconds=4) as c:
        assert c.alive() == 1
        c.procs[0].wait(timeout=60)  # the deadline ends it without our help
        assert c.alive() == 0
    with speed_extras.Contention(2) as c:
        assert c.alive() == 2
    assert all(p.poll() is not None for p in c.procs)  # leaving the block stops them


def test_batch_benchmark_compares_outputs_and_reports_the_ratio(tmp_path):
    from experiments import batch

    out = tmp_path / "batch"
    code = batch.run(_args(batch, ["--model", "tiny:llama", "--batch", "3", "--context", "48", "--max-new-tokens", "4",
                                   "--repeats", "1", "--contention", "1", "--out", str(out)]))
    assert code in (0, 1)
    report = (out / "report.md").read_text()
    assert "batch / one by one = " in report and "identical for 3 of 3 prompts" in report
    assert "competing processes: 1" in report and "--contention 1`" in report


@pytest.mark.parametrize("name", ["batch", "speed", "serving"])
@pytest.mark.parametrize("bad", ["-1", "two"])
def test_a_bad_contention_count_is_a_one_line_error(name, bad, capsys):
    """`--contention` takes a whole number >= 0; anything else stops the parser before work starts."""
    from experiments.cli import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([name, "--contention", bad])
    assert e.value.code == 2
    assert f"--contention: expected a whole number >= 0, got '{bad}'" in capsys.readouterr().err
