"""pml.cli: exit codes and output shapes of `pml validate` and `pml layout`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pml import cli



@pytest.fixture
def run(capsys, tok):
    """Call main(argv) with the fake word tokenizer; returns (exit code, stdout, stderr)."""
    loaded = []

    def loader(name):
        loaded.append(name)
        return tok

    def call(*argv):
        code = cli.main([str(a) for a in argv], tokenizer_loader=loader)
        out, err = capsys.readouterr()
        return code, out, err

    call.loaded = loaded
    return call


@pytest.fixture
def bad_schema(tmp_path):
    f = tmp_path / "bad.pml"
    f.write_text('<schema name="s">\n<module name="a"/>\n<module name="a"/>\n</schema>')
    return f


def test_validate_ok(run, examples):
    files = [examples / n for n in ("travel.pml", "travel_prompt.pml", "report.pml")]
    code, out, err = run("validate", *files)
    assert code == 0 and err == ""
    assert out.splitlines() == [f"{f}: ok" for f in files]
    assert run.loaded == []  # structural checks need no tokenizer


def test_validate_bad_file(run, examples, bad_schema):
    code, out, err = run("validate", examples / "travel.pml", bad_schema)
    assert code == 2
    assert out == f"{examples / 'travel.pml'}: ok\n"
    assert err.splitlines() == [f"{bad_schema}:3: error: <module>: " + err.split("<module>: ", 1)[1].strip()]
    assert "duplicate module name 'a'" in err


def test_validate_malformed_has_line(run, tmp_path):
    f = tmp_path / "m.pml"
    f.write_text('<schema name="s">\n<module name="a">\n</schema>\n')
    code, _, err = run("validate", f)
    assert code == 2 and err.startswith(f"{f}:3: error: malformed XML")


def test_validate_prompt_against_schema(run, examples, tmp_path):
    code, out, _ = run("validate", examples / "travel_prompt.pml", "--schema", examples / "travel.pml", "--model", "m1")
    assert code == 0 and out == f"{examples / 'travel_prompt.pml'}: ok\n"
    assert run.loaded == ["m1"]
    long = tmp_path / "long.pml"
    long.write_text('<prompt schema="travel">\n<trip-plan duration="one two three four five"/></prompt>')
    code, out, err = run("validate", long, "--schema", examples / "travel.pml")
    assert code == 2 and out == ""
    assert err.startswith(f"{long}:2: error: <trip-plan>: value of parameter 'duration' is 5 tokens")
    assert run.loaded[-1] is None  # pml alone names no model: the loader picks its default


def test_validate_bad_schema_option(run, examples, bad_schema):
    code, _, err = run("validate", examples / "travel_prompt.pml", "--schema", bad_schema)
    assert code == 2 and err.startswith(f"{bad_schema}:3: error:")


def test_validate_schema_with_model_checks_scaffolds(run, tmp_path):
    f = tmp_path / "s.pml"
    f.write_text('<schema name="s"><module name="m">\n<parameter name="p" length="1" scaffold="two words"/></module></schema>')
    assert run("validate", f)[0] == 0  # structure only
    code, _, err = run("validate", f, "--model", "x")
    assert code == 2 and err.startswith(f"{f}:2: error: <parameter>: scaffold of parameter 'p' is 2 tokens")


def test_layout_table(run, examples):
    code, out, err = run("layout", examples / "travel.pml")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["path", "kind", "start", "end", "tokens"]
    assert lines[1].split() == ["(root)", "text", "0", "1", "1"]  # BOS
    assert any(ln.split()[:2] == ["trip-plan:duration", "parameter"] for ln in lines)
    assert lines[-1].startswith("schema travel: ")


def test_layout_json(run, examples, tok):
    code, out, _ = run("layout", examples / "travel.pml", "--json", "--model", "m2")
    assert code == 0 and run.loaded == ["m2"]
    rows = json.loads(out)
    assert all(set(r) == {"path", "kind", "start", "end", "tokens"} for r in rows)
    assert rows[0] == {"path": "", "kind": "text", "start": 0, "end": 1, "tokens": 1}
    dom = next(r for r in rows if r["path"] == "travel/domestic" and r["kind"] == "module")
    ovs = next(r for r in rows if r["path"] == "travel/overseas" and r["kind"] == "module")
    assert dom["start"] == ovs["start"] and dom["tokens"] == 0
    param = next(r for r in rows if r["kind"] == "parameter")
    assert param["end"] - param["start"] == 4


def test_layout_names_each_parameter(run, tmp_path):
    # Two slots in one module: each row says which parameter it is (MODULE:PARAM).
    schema = tmp_path / "two.pml"
    schema.write_text('<schema name="two"><module name="m">From <parameter name="src" length="3"/> to '
                      '<parameter name="dst" length="3"/>.</module></schema>')
    code, out, _ = run("layout", schema, "--json")
    assert code == 0
    assert [r["path"] for r in json.loads(out) if r["kind"] == "parameter"] == ["m:src", "m:dst"]


def test_layout_bad_input(run, bad_schema, examples):
    code, out, err = run("layout", bad_schema)
    assert code == 2 and out == "" and err.startswith(f"{bad_schema}:3: error: <module>:")
    code, _, err = run("layout", examples / "travel_prompt.pml")
    assert code == 2 and "expected a <schema> file" in err


def test_tokenizer_load_failure_is_an_error_line(capsys, examples):
    def broken(name):
        raise OSError("no such model")

    code = cli.main(["layout", str(examples / "travel.pml"), "--model", "nope"], tokenizer_loader=broken)
    assert code == 2
    assert capsys.readouterr().err.startswith("error: cannot load tokenizer 'nope': OSError: no such model")
    code = cli.main(["validate", str(examples / "travel_prompt.pml"), "--schema", str(examples / "travel.pml")],
                    tokenizer_loader=broken, default_model="some-default")
    out, err = capsys.readouterr()
    # without --model, the message names the default model the caller gave
    assert code == 2 and out == "" and err.startswith("error: cannot load tokenizer 'some-default'")


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "validate" in capsys.readouterr().err


def test_subprocess_entry_point(tmp_path, examples, bad_schema):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    ok = subprocess.run([sys.executable, "-m", "pml.cli", "validate", str(examples / "travel.pml")], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and ok.stdout == f"{examples / 'travel.pml'}: ok\n"
    bad = subprocess.run([sys.executable, "-m", "pml.cli", "validate", str(bad_schema)], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and bad.stderr.startswith(f"{bad_schema}:3: error: <module>: duplicate module name")
    assert "Traceback" not in bad.stderr
