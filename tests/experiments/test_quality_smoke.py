"""The quality experiment end to end on two items with a tiny random model: files, columns, resume."""

from __future__ import annotations

import csv
import json


from experiments import cli




def _run(out, data, capsys):
    argv = ["quality", "--model", "tiny:llama", "--tasks", "longbench_mini/hotpotqa", "--limit", "2",
            "--max-context-tokens", "300", "--max-new-tokens", "3", "--data", str(data), "--out", str(out)]
    assert cli.main(argv) == 0
    return capsys.readouterr()


def test_quality_smoke_and_resume(tmp_path, data, capsys):
    out = tmp_path / "q"
    first = _run(out, data, capsys)
    assert "2 items (0 already done)" in first.err
    items = out / "longbench_mini" / "hotpotqa" / "items.jsonl"
    rows = [json.loads(line) for line in items.read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert set(row) >= {"id", "baseline", "independent", "schema", "truncated", "policies_identical"}
        # expected: 300 bytes keep only part of the ~10k-byte context, and the item says so
        assert row["truncated"] and row["original_tokens"] > row["context_tokens"]
        assert set(row["schema"]) >= {"score", "identical", "first_token_same", "kl", "ttft_ms"}
    with (out / "summary.csv").open() as f:
        summary = list(csv.DictReader(f))
    assert [r["task"] for r in summary] == ["longbench_mini/hotpotqa"] and summary[0]["n"] == "2"
    for p in ("independent", "schema"):
        for col in ("cached_", "delta_", "identical_%_", "first_token_%_", "mean_kl_"):
            assert col + p in summary[0]
    assert {"task", "metric", "n", "baseline", "truncated"} <= set(summary[0])
    assert (out / "quality_delta.png").stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "tiny" in report and "Truncation" in report and "hotpotqa" in report

    # expected: a second run finds both items done and appends nothing
    second = _run(out, data, capsys)
    assert "2 items (2 already done)" in second.err
    assert len(items.read_text().splitlines()) == 2


def test_bench_parser_has_every_experiment():
    import argparse

    parser = argparse.ArgumentParser(prog="pml")
    cli.add_bench(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "quality", "--limit", "1", "--policy", "schema"])
    assert args.limit == 1 and args.policy == ["schema"] and callable(args.func)
    for name in cli.EXPERIMENTS:
        assert callable(parser.parse_args(["bench", name]).func)


def test_policies_identical_only_for_one_module_after_root_text():
    from prompt_cache.tiny import ByteTokenizer
    from experiments import quality, workloads
    from pml.layout import compute_layout
    from pml.parser import parse_schema

    tok = ByteTokenizer()
    one, _ = workloads.build_schema("one", "Read this.\n", ("a long document",))
    two, _ = workloads.build_schema("two", "Read these.\n", ("first passage", "second passage"))
    # expected: one module after root text sees the same under both policies; the second passage does not
    both = ["independent", "schema"]
    assert quality.policies_identical(compute_layout(parse_schema(one), tok), both)
    assert not quality.policies_identical(compute_layout(parse_schema(one), tok), ["independent", "blend:0.1"])
    assert not quality.policies_identical(compute_layout(parse_schema(two), tok), both)


def test_summarize_and_kl():
    import torch

    from experiments import metrics, quality

    lp = torch.log_softmax(torch.tensor([[1.0, 2.0, 3.0]]), -1)
    assert metrics.mean_kl(lp, lp) == 0.0
    assert metrics.mean_kl(lp, torch.log_softmax(torch.zeros(1, 3), -1)) > 0
    rows = [{"truncated": True, "policies_identical": False, "baseline": {"score": 1.0, "ttft_ms": 10.0},
             "independent": {"score": 0.5, "identical": False, "first_token_same": True, "kl": 0.2, "ttft_ms": 1.0}},
            {"truncated": False, "policies_identical": False, "baseline": {"score": 0.0, "ttft_ms": 10.0},
             "independent": {"score": 0.0, "identical": True, "first_token_same": True, "kl": None, "ttft_ms": 1.0}}]
    s = quality.summarize("t", "qa_f1", rows, ["independent"])
    # expected: baseline 50, cached 25, delta -25; one of two identical; KL averaged over the item that has one
    assert (s["baseline"], s["cached_independent"], s["delta_independent"]) == (50.0, 25.0, -25.0)
    assert s["identical_%_independent"] == 50.0 and s["first_token_%_independent"] == 100.0
    assert s["mean_kl_independent"] == 0.2 and s["truncated"] == 1
