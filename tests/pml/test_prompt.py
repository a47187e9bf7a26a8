"""pml.prompt: binding a prompt to a layout (selection, arguments, suffix) and its errors."""

from __future__ import annotations

import pytest

from pml.errors import PMLError
from pml.layout import compute_layout
from pml.parser import parse_file, parse_prompt, parse_schema
from pml.prompt import bind_prompt

SCHEMA = """<schema name="trip">
<module name="travel">T
  <union scaffold="domestic">
    <module name="domestic">D<module name="miami">M</module></module>
    <module name="overseas">O<module name="tokyo">K</module><module name="paris">P</module></module>
  </union>
</module>
<module name="plan">Plan <parameter name="duration" length="4" scaffold="wk"/> and <parameter name="who" length="3"/>.</module>
</schema>"""


@pytest.fixture
def layout(char_tok):
    return compute_layout(parse_schema(SCHEMA), char_tok)


def bind(src: str, layout, tok):
    return bind_prompt(parse_prompt(src, path="p.pml"), layout, tok)


def test_nested_selection_in_layout_order(layout, char_tok):
    b = bind('<prompt schema="trip"><plan duration="3 d" who="me"/><travel><overseas><tokyo/></overseas></travel></prompt>', layout, char_tok)
    # Expected: layout order, not prompt order; paris is not selected because it is not referenced.
    assert b.schema == "trip"
    assert b.modules == ("travel", "travel/overseas", "travel/overseas/tokyo", "plan")
    assert b.arguments == {("plan", "duration"): tuple(map(ord, "3 d")), ("plan", "who"): tuple(map(ord, "me"))}
    assert b.suffix_ids == ()


def test_scaffold_fills_a_missing_value(layout, char_tok):
    b = bind('<prompt schema="trip"><plan who="me"/></prompt>', layout, char_tok)
    # Expected: every parameter of a selected module has an entry; duration falls back to "wk".
    assert b.arguments == {("plan", "duration"): (119, 107), ("plan", "who"): (109, 101)}


def test_plain_text_suffix(layout, char_tok):
    b = bind('<prompt schema="trip">Hello <travel/> world</prompt>', layout, char_tok)
    # Expected: prompt text is concatenated in document order wherever the references sit.
    assert b.modules == ("travel",)
    assert char_tok.decode(b.suffix_ids) == "Hello  world"


def test_chat_suffix_ends_with_assistant_prefix(layout, char_tok):
    b = bind('<prompt schema="trip">\n  <user>\n    Where to?\n  </user>\n</prompt>', layout, char_tok)
    assert b.modules == ()
    assert char_tok.decode(b.suffix_ids) == "User: Where to?\nAssistant: "


def test_example_prompt_binds(tok, examples):
    layout = compute_layout(parse_file(examples / "travel.pml"), tok)
    b = bind_prompt(parse_file(examples / "travel_prompt.pml"), layout, tok)
    assert b.modules == ("travel", "travel/overseas", "travel/overseas/tokyo", "trip-plan")
    assert tok.decode(b.arguments[("trip-plan", "duration")]) == "3 days"
    assert tok.decode(b.suffix_ids).startswith("User: I land at Haneda")
    assert tok.decode(b.suffix_ids).endswith("\nAssistant: ")


def test_report_example_binds(tok, examples):
    layout = compute_layout(parse_file(examples / "report.pml"), tok)
    b = bind_prompt(parse_file(examples / "report_prompt.pml"), layout, tok)
    assert b.modules == ("report", "question")


BAD = [
    # (id, prompt, fragment, line, element)
    ("unknown-schema", '<prompt schema="other">\n<travel/></prompt>', "prompt uses schema 'other'", 1, "prompt"),
    ("unknown-module", '<prompt schema="trip">\n<hotel/></prompt>', "unknown module 'hotel' at the top level", 2, "hotel"),
    ("unknown-nested", '<prompt schema="trip"><travel>\n<tokyo/></travel></prompt>', "unknown module 'tokyo' inside 'travel'", 2, "tokyo"),
    ("nested-at-top", '<prompt schema="trip">\n<miami/></prompt>', "unknown module 'miami'", 2, "miami"),
    ("two-union-members", '<prompt schema="trip"><travel><domestic/>\n<overseas/></travel></prompt>', "same union", 2, "overseas"),
    ("unknown-parameter", '<prompt schema="trip">\n<plan days="3" who="x"/></prompt>', "unknown parameter 'days'", 2, "plan"),
    ("value-too-long", '<prompt schema="trip">\n<plan who="everyone"/></prompt>', "8 tokens", 2, "plan"),
    ("missing-value", '<prompt schema="trip">\n<plan duration="1 d"/></prompt>', "parameter 'who'", 2, "plan"),
]


@pytest.mark.parametrize("src, fragment, line, element", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bind_errors(src, fragment, line, element, char_tok):
    s = parse_schema(SCHEMA)
    with pytest.raises(PMLError) as info:
        bind(src, compute_layout(s, char_tok), char_tok)
    e = info.value
    assert fragment in e.message
    assert (e.file, e.line, e.element) == ("p.pml", line, element)
    assert str(e).startswith(f"p.pml:{line}: error: <{element}>: ")


def test_value_at_exact_slot_length_is_fine(char_tok):
    s = parse_schema('<schema name="t"><module name="m"><parameter name="p" length="3"/></module></schema>')
    b = bind_prompt(parse_prompt('<prompt schema="t"><m p="abc"/></prompt>'), compute_layout(s, char_tok), char_tok)
    assert b.arguments[("m", "p")] == (97, 98, 99)
