"""`pml bench recovery` end to end on two items with a tiny model: the table, plot and goal lines."""

from __future__ import annotations

import csv

from experiments import cli


def test_recovery_smoke(tmp_path, data, capsys):
    out = tmp_path / "r"
    argv = ["recovery", "--model", "tiny:llama", "--tasks", "longbench_mini/hotpotqa", "--limit", "2",
            "--max-context-tokens", "300", "--max-new-tokens", "3", "--kl-tokens", "3", "--data", str(data),
            "--out", str(out), "--policy", "independent", "blend:0.2", "link:4", "blend:1"]
    assert cli.main(argv) == 0
    with (out / "recovery.csv").open() as f:
        table = {r["setting"]: r for r in csv.DictReader(f)}
    assert set(table) == {"independent", "blend:0.2", "link:4", "blend:1"}
    assert float(table["independent"]["recomputed_%"]) == 0
    assert float(table["blend:1"]["recomputed_%"]) == 100  # blend:1 recomputes the whole context
    # blend:1 is the full prefill: its greedy answers are the baseline's
    assert float(table["blend:1"]["identical_%"]) == 100
    assert 0 < float(table["blend:0.2"]["recomputed_%"]) < 100
    assert (out / "recovery_pareto.png").stat().st_size > 0
    assert "the goal" in (out / "recovery.md").read_text()
