"""`pml bench speculative` end to end on a tiny model: every mode's output equals plain greedy."""

import csv

from experiments.speculative import cut_at_whitespace
from pml_cli.main import main
from prompt_cache.tiny import ByteTokenizer


def test_speculative_experiment_smoke(tmp_path, capsys, data):
    out = tmp_path / "spec"
    argv = ["bench", "speculative", "--model", "tiny:llama", "--tasks", "qmsum", "--limit", "1",
            "--context-tokens", "150", "--max-new-tokens", "8", "--k", "2,5", "--out", str(out), "--data", str(data)]
    assert main(argv) == 0
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [(r["task"], r["mode"]) for r in rows] == [(t, m) for t in ("qmsum", "all")
                                                      for m in ("plain", "lookup:2", "lookup:5")]
    assert all(r["same_as_plain"] == r["items"] == "1" for r in rows)
    assert (out / "report.md").read_text().startswith("# Speculative decoding")


def test_cut_at_whitespace_stays_within_the_budget():
    tok = ByteTokenizer()
    text, kept, original = cut_at_whitespace("alpha beta gamma delta", tok, 13)
    # 13 bytes would end inside "gamma": the cut goes back to the space before it.
    assert (text, kept, original) == ("alpha beta", 10, 22)
    assert cut_at_whitespace("short", tok, 13) == ("short", 5, 5)
