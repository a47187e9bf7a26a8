"""Property: whatever text comes in, parsing, layout and binding raise nothing but PMLError."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pml.errors import PMLError
from pml.layout import compute_layout
from pml.model import Schema
from pml.parser import parse_file, parse_prompt, parse_schema
from pml.prompt import bind_prompt

from pml_fakes import EXAMPLES, CharTokenizer, WordTokenizer

EXAMPLE_FILES = sorted(EXAMPLES.glob("*.pml"))
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TRAVEL_LAYOUT = compute_layout(parse_file(EXAMPLES / "travel.pml"), WordTokenizer())

TAGS = ["schema", "prompt", "module", "union", "parameter", "system", "user", "assistant", "travel",
        "overseas", "tokyo", "trip-plan", "x", "a:b"]
ATTRS = ["name", "length", "scaffold", "cache", "src", "schema", "duration", "foo"]
VALUES = ["a", "travel", "trip-plan", "2", "0", "-1", "true", "false", "docs/coastal_report.txt",
          "../x", "/etc/passwd", "", "a b", "1x", "3 days"]
SNIPPETS = ["<", ">", "&", "&amp;", "&lt;", "&foo;", "\"", "'", "/", "=", "<!--", "-->", "<![CDATA[", "]]>",
            "<!DOCTYPE x>", "<!ENTITY e 'x'>", "<?pi?>", "\x00", "\ud800", "é", "\n", " ", "<module name='m'>",
            "</module>", "<parameter name='p' length='2'/>", "<union>", "</union>"]


def only_pml_errors(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except PMLError:
        return None


def check_text(text: str, path) -> None:
    """Run everything a user could run on `text`: any exception but PMLError fails the test."""
    for tok in (WordTokenizer(), CharTokenizer()):
        schema = only_pml_errors(parse_schema, text, path=path)
        if isinstance(schema, Schema):
            only_pml_errors(compute_layout, schema, tok)
        prompt = only_pml_errors(parse_prompt, text, path=path)
        if prompt is not None:
            only_pml_errors(bind_prompt, prompt, TRAVEL_LAYOUT, WordTokenizer())


@st.composite
def mutated_example(draw):
    f = draw(st.sampled_from(EXAMPLE_FILES))
    text = f.read_text(encoding="utf-8")
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(text)))
        j = draw(st.integers(i, min(len(text), i + 20)))
        piece = draw(st.one_of(st.sampled_from(SNIPPETS), st.text(max_size=5)))
        op = draw(st.sampled_from(["delete", "insert", "replace"]))
        if op == "delete":
            text = text[:i] + text[j:]
        elif op == "insert":
            text = text[:i] + piece + text[i:]
        else:
            text = text[:i] + piece + text[j:]
    return f, text


@SETTINGS
@given(mutated_example())
def test_mutated_examples_raise_only_pml_errors(case):
    f, text = case
    check_text(text, f)


def _element(children):
    return st.builds(
        lambda tag, attrs, kids, text: (
            f"<{tag}" + "".join(f' {k}="{v}"' for k, v in attrs.items()) + ">" + text + "".join(kids) + f"</{tag}>"
        ),
        st.sampled_from(TAGS),
        st.dictionaries(st.sampled_from(ATTRS), st.sampled_from(VALUES), max_size=3),
        st.lists(children, max_size=3),
        st.one_of(st.just(""), st.sampled_from(SNIPPETS), st.text(max_size=8)),
    )


RANDOM_XML = st.recursive(st.one_of(st.text(max_size=10), st.sampled_from(SNIPPETS)), _element, max_leaves=12)


@SETTINGS
@given(RANDOM_XML)
def test_random_xml_raises_only_pml_errors(text):
    check_text(text, EXAMPLES / "random.pml")


@SETTINGS
@given(st.binary(max_size=200))
def test_random_bytes_raise_only_pml_errors(data):
    only_pml_errors(parse_schema, data)
    only_pml_errors(parse_prompt, data)


@pytest.mark.parametrize("f", EXAMPLE_FILES, ids=[f.name for f in EXAMPLE_FILES])
def test_examples_are_valid(f):
    # The unmutated examples parse (the property above is not vacuous).
    assert parse_file(f) is not None
