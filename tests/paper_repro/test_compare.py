"""The reference table parses, and the comparison report is built from experiment summaries."""

import csv

import pytest

from experiments import paper_reference as reference
from paper_repro import compare


def test_reference_table_parses_every_row(paper_reference):
    rows = reference.load(paper_reference)
    llama = {r.task: r for r in rows if r.model == "Llama-2-7B"}
    # the file lists 14 Llama-2-7B tasks and 3 each for Falcon-7B and MPT-7B
    assert len(llama) == 14 and len(rows) == 20
    assert (llama["passage_retrieval_en"].baseline, llama["passage_retrieval_en"].cached) == (7.5, 4.2)
    assert llama["passage_retrieval_en"].delta == -3.3


def test_missing_reference_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="paper reference file not found"):
        reference.load(tmp_path / "nope.md")
    (tmp_path / "empty.md").write_text("# nothing here\n")
    with pytest.raises(ValueError, match="no per-task table"):
        reference.load(tmp_path / "empty.md")


def test_report_from_summaries(tmp_path, capsys, paper_reference):
    q = tmp_path / "runs" / "quality" / "m"
    q.mkdir(parents=True)
    with (q / "summary.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, ["task", "n", "baseline", "delta_independent", "ttft_baseline_ms", "ttft_independent_ms"])
        w.writeheader()
        w.writerow({"task": "longbench/multi_news", "n": 4, "baseline": 10.0, "delta_independent": -1.5,
                    "ttft_baseline_ms": 4000, "ttft_independent_ms": 200})
    assert compare.main(["--model", "m", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"),
                         "--reference", str(paper_reference)]) == 0
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| longbench/multi_news | 200 | 15.9 | 15.9 | 0 | 4 | 10.0 | -1.5 |" in report
    assert "20.0x to 20.0x" in report  # 4000 / 200
    assert "not measured yet" in report  # no speed summary was given
