"""pml.limits: file types and sizes, parameter lengths and nesting are bounded, with errors that say so."""

from __future__ import annotations

import os
import sys

import pytest

from pml import limits
from pml.errors import PMLError
from pml.parser import parse_file, parse_schema


def _error(fn, *args) -> PMLError:
    with pytest.raises(PMLError) as e:
        fn(*args)
    return e.value


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_is_refused_without_being_opened(tmp_path):
    fifo = tmp_path / "s.pml"
    os.mkfifo(fifo)
    # Expected: refused from its stat; opening it for reading would block this test forever.
    e = _error(parse_file, fifo)
    assert e.file == str(fifo) and "not a regular file" in e.message


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_device_is_refused():
    e = _error(parse_file, "/dev/zero")
    assert "not a regular file" in str(e)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_src_fifo_is_refused(tmp_path):
    os.mkfifo(tmp_path / "d.txt")
    f = tmp_path / "s.pml"
    f.write_text('<schema name="s"><module name="a" src="d.txt"/></schema>')
    e = _error(parse_file, f)
    assert (e.file, e.line, e.element) == (str(f), 1, "module") and "not a regular file" in e.message


def test_pml_file_over_the_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(limits, "MAX_PML_FILE_BYTES", 64)
    f = tmp_path / "s.pml"
    f.write_text('<schema name="s">' + "x" * 64 + "</schema>")
    e = _error(parse_file, f)
    # Expected: the file, the limit and the constant to change are named.
    assert e.file == str(f) and "64 bytes limit" in e.message and "MAX_PML_FILE_BYTES" in e.message
    f.write_text('<schema name="s">x</schema>')
    assert parse_file(f).name == "s"


def test_src_file_over_the_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(limits, "MAX_SRC_FILE_BYTES", 10)
    (tmp_path / "d.txt").write_text("y" * 11)
    f = tmp_path / "s.pml"
    f.write_text('<schema name="s">\n<module name="a" src="d.txt"/></schema>')
    e = _error(parse_file, f)
    assert (e.line, e.element) == (2, "module") and "'d.txt'" in e.message and "10 bytes limit" in e.message
    (tmp_path / "d.txt").write_text("y" * 10)
    parse_file(f)


def test_default_limits_are_documented_sizes():
    lim = limits.current()
    assert lim.max_pml_file_bytes == lim.max_src_file_bytes == 16 * 1024 * 1024
    assert (lim.max_parameter_length, lim.max_nesting_depth) == (65536, 255)


@pytest.mark.parametrize("length", ["100000000", "99999999999999999999999", "9" * 5000, "65537"])
def test_parameter_length_over_the_limit(length):
    src = f'<schema name="s">\n<module name="a"><parameter name="p" length="{length}"/></module></schema>'
    e = _error(parse_schema, src)
    assert (e.line, e.element) == (2, "parameter") and "65536" in e.message and "'p'" in e.message


@pytest.mark.parametrize("length", ["65536", "0065536", " 7 "])
def test_parameter_length_at_the_limit(length):
    s = parse_schema(f'<schema name="s"><module name="a"><parameter name="p" length="{length}"/></module></schema>')
    assert s.children[0].children[0].length == int(length)


def test_nesting_limit_in_our_words():
    depth = limits.MAX_NESTING_DEPTH + 5
    src = '<schema name="s">' + '<module name="a">' * depth + "</module>" * depth + "</schema>"
    e = _error(parse_schema, src)
    assert f"nesting deeper than {limits.MAX_NESTING_DEPTH} levels is not supported" in e.message
    assert "XML_PARSE_HUGE" not in str(e)


def test_nesting_within_the_limit_parses():
    depth = limits.MAX_NESTING_DEPTH - 2  # the schema root is one level
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 4 * depth))
    src = '<schema name="s">' + '<module name="a">' * depth + "x" + "</module>" * depth + "</schema>"
    assert parse_schema(src).children[0].name == "a"
