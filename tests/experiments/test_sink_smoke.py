"""`pml bench sink` end to end on one tiny-model item: the harness and the CLI pass-through work."""

import csv

from pml_cli.main import main


def test_sink_experiment_smoke(tmp_path, capsys, data):
    out = tmp_path / "sink"
    argv = ["bench", "sink", "--model", "tiny:llama", "--tasks", "musique", "--limit", "1",
            "--max-context-tokens", "200", "--max-new-tokens", "3", "--out", str(out), "--data", str(data)]
    assert main(argv) == 0
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["task"] for r in rows] == ["musique"] and rows[0]["n"] == "1"
    assert {"sink_mean_kl", "no_sink_mean_kl", "sink_first_token_%"} <= set(rows[0])
    assert (out / "report.md").read_text().startswith("# Attention sink")
    lines = (out / "items.jsonl").read_text().splitlines()
    assert main(argv) == 0  # resumes: the finished item is not redone
    assert (out / "items.jsonl").read_text().splitlines() == lines
