"""CLI failure paths: one line `pml: error: ...`, exit 2, checked before any model loads, nothing left behind."""

import json
import os
import subprocess
import sys

import pytest

from pml_cli.main import main

@pytest.fixture
def no_model(monkeypatch):
    import prompt_cache.models

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(prompt_cache.models, "load_model", refuse)


def one_line_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("pml: error: "), err
    return err


@pytest.mark.parametrize("option, value, says", [
    ("--top-p", "2", "(0, 1]"), ("--top-p", "0", "(0, 1]"), ("--top-p", "nan", "finite"),
    ("--max-new-tokens", "-1", ">= 0"), ("--max-new-tokens", "x", "whole number"),
    ("--temperature", "-1", ">= 0"), ("--temperature", "nan", "finite"), ("--temperature", "inf", "finite"),
    ("--seed", str(2**64), "2**64"), ("--seed", "-3", "2**64"),
])
def test_bad_generation_arguments_fail_at_parse_time(files, capsys, no_model, option, value, says):
    store = files / "store"
    err = one_line_error(capsys, ["run", str(files / "p.pml"), "--schema", str(files / "s.pml"), "--model",
                                  "tiny:llama", "--store", str(store), option, value])
    assert option in err and says in err
    assert not store.exists()


def test_bad_store_folders_are_refused_before_the_model_loads(files, capsys, no_model, monkeypatch):
    monkeypatch.setenv("HOME", str(files))
    (files / "a-file").write_text("x")
    (files / "docs").mkdir()
    (files / "docs" / "report.txt").write_text("mine")
    for store, says in [("/", "filesystem root"), (str(files), "home folder"), (str(files / "a-file"), "not a folder"),
                        (str(files / "docs"), "not a store")]:
        for cmd in (["encode", str(files / "s.pml")], ["run", str(files / "p.pml"), "--schema", str(files / "s.pml")]):
            err = one_line_error(capsys, [*cmd, "--model", "tiny:llama", "--store", store])
            assert says in err
    assert sorted(p.name for p in (files / "docs").iterdir()) == ["report.txt"]
    monkeypatch.setattr(os, "access", lambda *a, **k: False)  # as root, permissions cannot make one read-only
    assert "not writable" in one_line_error(capsys, ["encode", str(files / "s.pml"), "--store", str(files / "new")])


def test_a_failing_command_leaves_no_store_folder(files, capsys):
    (files / "bad.pml").write_text('<schema name="x"><module name="m">unclosed</schema>')
    store = files / "store"
    assert main(["encode", str(files / "bad.pml"), "--model", "tiny:llama", "--store", str(store)]) == 2
    assert not store.exists()
    assert main(["run", str(files / "nope.pml"), "--schema", str(files / "s.pml"), "--model", "tiny:llama",
                 "--store", str(store)]) == 2
    assert not store.exists()
    capsys.readouterr()


@pytest.mark.parametrize("owner", ["[]", "folder", '{"model": 1}'])
def test_an_unusable_owner_file_is_one_line(files, capsys, owner):
    store = files / "store"
    store.mkdir()
    if owner == "folder":
        (store / "owner.json").mkdir()
    else:
        (store / "owner.json").write_text(owner)
    assert main(["encode", str(files / "s.pml"), "--model", "tiny:llama", "--store", str(store)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pml: error: ") and err.count("\n") == 1 and "owner.json" in err


@pytest.mark.parametrize("errno_name", ["ENOSPC", "EROFS"])
def test_a_full_or_read_only_disk_is_one_line(files, capsys, monkeypatch, errno_name):
    import errno

    code = getattr(errno, errno_name)
    real = os.link

    def fail(src, dst, *a, **k):
        if str(dst).endswith(".safetensors"):
            raise OSError(code, os.strerror(code))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "link", fail)
    store = files / "store"
    assert main(["encode", str(files / "s.pml"), "--model", "tiny:llama", "--store", str(store)]) == 2
    err = capsys.readouterr().err.rsplit("\r", 1)[-1]  # after the progress bar's last redraw
    assert err.startswith("pml: error: cannot write to store") and err.count("\n") == 1
    assert not [p for p in store.rglob("*") if p.name.endswith(".tmp")]


def test_store_rm_refuses_an_empty_key_and_keeps_entries(files, capsys):
    store = str(files / "store")
    assert main(["encode", str(files / "s.pml"), "--model", "tiny:llama", "--store", store]) == 0
    assert main(["store", "rm", "", "--store", store]) == 2
    assert "not a key prefix" in capsys.readouterr().err
    assert main(["store", "ls", "--store", store, "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 3


def test_store_ls_lists_damaged_files_set_aside(files, capsys):
    store = files / "store"
    assert main(["encode", str(files / "s.pml"), "--model", "tiny:llama", "--store", str(store)]) == 0
    victim = next(store.rglob("*.safetensors"))
    victim.write_bytes(victim.read_bytes()[:-9])
    assert main(["store", "verify", "--store", str(store)]) == 1
    capsys.readouterr()
    assert main(["store", "ls", "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert "1 damaged file(s) set aside" in out and victim.name in out
    assert main(["store", "ls", "--store", str(store), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["key"] for r in rows if r["tier"] == "corrupt"] == [victim.stem]


def test_store_commands_refuse_folders_that_are_not_stores(files, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(files))
    (files / "docs").mkdir()
    (files / "docs" / "notes.txt").write_text("mine")
    for store in (str(files / "docs"), str(files), "/"):
        assert main(["store", "rm", "--all", "--store", store]) == 2
        err = capsys.readouterr().err
        assert err.startswith("pml: error: refusing") and err.count("\n") == 1
    assert (files / "docs" / "notes.txt").exists()


def test_rm_all_deletes_only_entry_files(files, capsys):
    # A folder shaped like a store (two-hex-digit subfolder) holding a file that is not an entry.
    store = files / "store"
    assert main(["encode", str(files / "s.pml"), "--model", "tiny:llama", "--store", str(store)]) == 0
    (store / "ab").mkdir(exist_ok=True)
    keep = store / "ab" / ("ab" + "0" * 62 + ".safetensors")
    keep.write_text("not an entry, but someone's file")
    capsys.readouterr()
    assert main(["store", "rm", "--all", "--store", str(store)]) == 0
    assert "removed 3 entries" in capsys.readouterr().out
    assert keep.exists()


def test_parse_errors_in_a_subprocess_are_one_line(files):
    out = subprocess.run([sys.executable, "-m", "pml_cli", "run", str(files / "p.pml"), "--schema",
                          str(files / "s.pml"), "--top-p", "2"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and out.stderr.startswith("pml: error: ")
    assert "Traceback" not in out.stderr
