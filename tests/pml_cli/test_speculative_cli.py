"""`pml run --speculative` / `--draft-model`: same text as plain greedy, stats in the JSON, clear errors."""

import json

import pytest

from pml_cli.main import main

SCHEMA = """<schema name="notes">
  Notes.
  <module name="a">the river runs to the lake. the river runs to the sea. the river runs.</module>
</schema>"""
PROMPT = '<prompt schema="notes"><a/>Where does the river run? the river runs to</prompt>'


@pytest.fixture
def common(tmp_path):
    (tmp_path / "s.pml").write_text(SCHEMA)
    (tmp_path / "p.pml").write_text(PROMPT)
    return ["run", str(tmp_path / "p.pml"), "--schema", str(tmp_path / "s.pml"), "--model", "tiny:llama",
            "--store", str(tmp_path / "store"), "--max-new-tokens", "12", "--json"]


def run_json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_speculative_runs_equal_plain_and_report_stats(common, tmp_path, capsys):
    plain = run_json(capsys, common)
    assert plain["speculative"] is None
    lookup = run_json(capsys, common + ["--speculative", "lookup:3"])
    # tiny:llama drafting for itself: every draft is accepted.
    draft = run_json(capsys, common + ["--draft-model", "tiny:llama", "--draft-store", str(tmp_path / "ds")])
    for out, drafter in ((lookup, "lookup"), (draft, "model")):
        assert out["text"] == plain["text"]
        sp = out["speculative"]
        assert sp["drafter"] == drafter and {"proposed", "accepted", "forwards"} <= set(sp)
        assert out["usage"]["completion_tokens"] == 1 + sp["forwards"] + sp["accepted"]
    assert draft["speculative"]["accepted"] == draft["speculative"]["proposed"] > 0
    assert draft["speculative"]["k"] == 4


@pytest.mark.parametrize("extra, message", [
    (["--speculative", "guess"], "expected lookup"),
    (["--speculative", "lookup:x"], "expected lookup"),
    (["--speculative", "lookup:0"], "K must be"),
    (["--speculative", "model:2"], "needs --draft-model"),
    (["--speculative", "lookup", "--draft-model", "tiny:llama"], "needs --draft-model"),
    (["--speculative", "lookup", "--temperature", "0.5"], "greedy-exact only"),
    (["--draft-model", "tiny:qwen2", "--draft-store", "{tmp}/ds"], None),  # same tokenizer, other arch: allowed
])
def test_bad_speculative_options_are_one_line_errors(common, capsys, extra, message, tmp_path):
    code = main(common + [e.replace("{tmp}", str(tmp_path)) for e in extra])
    err = capsys.readouterr().err
    if message is None:
        assert code == 0
        return
    assert code == 2 and err.startswith("pml: error: ") and message in err and err.count("\n") == 1
