"""`pml bench cost` end to end on the tiny model: three scenarios against live servers, usage that adds up."""

import json

from experiments.cli import main


def test_cost_bench_runs_all_scenarios(tmp_path, data):
    out = tmp_path / "run"
    assert main(["cost", "--model", "tiny:llama", "--system-tokens", "400", "--tools", "1", "--turns", "2", "--doc-tokens", "300",
                 "--questions", "2", "--modules", "4", "--module-tokens", "100", "--prompts", "2", "--max-tokens", "2", "--min-prefix", "0",
                 "--threads", "0", "--data", str(data), "--out", str(out)]) == 0
    rows = {(r["scenario"], r["api"]): r for r in json.loads((out / "summary.json").read_text())["rows"]}
    assert set(r[0] for r in rows) == {"agent", "document", "pml-schema"}
    for r in rows.values():
        assert r["computed"] + r["cached"] == r["prompt_tokens"] > 0
        assert r["cost_usd_cache"] <= r["cost_usd_nocache"]
    # Turn 2 of the agent chat reuses turn 1's prompt; the document's second question reads what the first wrote.
    assert rows["agent", "openai chat"]["cached"] >= 300
    assert rows["document", "anthropic messages"]["written"] > 0 and rows["document", "anthropic messages"]["cached"] > 0
    # Different module picks: PML reuses modules on every prompt.
    assert rows["pml-schema", "openai chat + pml"]["hit_rate"] > 0.5
    assert "| scenario |" in (out / "report.md").read_text()
