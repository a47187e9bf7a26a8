"""pml.errors: the diagnostic format leaves out unknown parts."""

from __future__ import annotations

import pytest

from pml.errors import PMLError


@pytest.mark.parametrize(
    "kwargs, text",
    [
        (dict(file="a.pml", line=3, element="module"), "a.pml:3: error: <module>: bad"),
        (dict(file="a.pml", line=3), "a.pml:3: error: bad"),
        (dict(file="a.pml"), "a.pml: error: bad"),
        (dict(line=3, element="union"), "3: error: <union>: bad"),
        ({}, "error: bad"),
    ],
)
def test_format(kwargs, text):
    e = PMLError("bad", **kwargs)
    assert str(e) == text
    assert (e.message, e.file, e.line, e.element) == ("bad", kwargs.get("file"), kwargs.get("line"), kwargs.get("element"))


def test_with_file_fills_only_a_missing_file():
    assert PMLError("m", line=2).with_file("x.pml").file == "x.pml"
    assert PMLError("m", file="a.pml").with_file("x.pml").file == "a.pml"
