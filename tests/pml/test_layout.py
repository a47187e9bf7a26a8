"""pml.layout: positions per segment and module (char tokenizer: positions = character counts)."""

from __future__ import annotations

import pytest

from pml.errors import PMLError
from pml.layout import Layout, ModuleLayout, PlainChat, Segment, Tokenizer, compute_layout
from pml.parser import parse_file, parse_schema


def lay(src: str, tok) -> Layout:
    return compute_layout(parse_schema(src), tok)


def test_fake_tokenizers_implement_the_protocol(tok, char_tok):
    assert isinstance(tok, Tokenizer) and isinstance(char_tok, Tokenizer)


def test_plain_chat_format():
    assert PlainChat.affixes("system") == ("System: ", "\n")
    assert PlainChat.affixes("user") == ("User: ", "\n")
    assert PlainChat().chat_affixes("assistant") == ("Assistant: ", "\n")
    with pytest.raises(ValueError, match="unknown chat role"):
        PlainChat.affixes("robot")


def test_bos_is_root_text_at_zero(tok):
    layout = lay('<schema name="s">Hi</schema>', tok)
    # Expected: BOS (id 1) at 0, then "Hi" at 1.
    assert layout.segments[0] == Segment("", "text", 0, 1, (1,))
    assert layout.segments[1].start == 1 and layout.length == 2


def test_no_bos_starts_at_zero(char_tok):
    layout = lay('<schema name="s">abc</schema>', char_tok)
    assert layout.segments == (Segment("", "text", 0, 3, (97, 98, 99)),)
    assert layout.length == 3


def test_union_members_share_start_and_union_takes_longest(char_tok):
    layout = lay(
        '<schema name="s">ab<union scaffold="y"><module name="x">1234</module>'
        '<module name="y">12</module><module name="z">123456</module></union>tail</schema>',
        char_tok,
    )
    m = layout.modules
    # Expected: x, y, z all start at 2; the union spans the longest (z, 6) so "tail" starts at 8.
    assert [(m[p].start, m[p].end) for p in "xyz"] == [(2, 6), (2, 4), (2, 8)]
    assert m["x"].union == m["y"].union == m["z"].union is not None
    assert [m[p].scaffold for p in "xyz"] == [False, True, False]
    assert layout.segments[-1] == Segment("", "text", 8, 12, tuple(map(ord, "tail")))
    assert layout.length == 12


def test_two_unions_have_different_ids(char_tok):
    layout = lay(
        '<schema name="s"><union><module name="a">x</module></union>'
        '<union><module name="b">y</module></union><module name="c">z</module></schema>',
        char_tok,
    )
    assert layout.modules["a"].union != layout.modules["b"].union
    assert layout.modules["c"].union is None


def test_parameter_reserves_its_length(char_tok):
    layout = lay(
        '<schema name="s"><module name="m">ab<parameter name="p" length="5" scaffold="xy"/>'
        '<parameter name="q" length="3"/>cd</module></schema>',
        char_tok,
    )
    segs = layout.module_segments("m")
    # Expected: "ab" 0-2, p 2-7 (scaffold 2 ids), q 7-10 (no scaffold), "cd" 10-12.
    assert segs == (
        Segment("m", "text", 0, 2, (97, 98)),
        Segment("m", "parameter", 2, 7, (120, 121), "p"),
        Segment("m", "parameter", 7, 10, (), "q"),
        Segment("m", "text", 10, 12, (99, 100)),
    )
    assert layout.modules["m"] == ModuleLayout("m", 0, 12, True)


def test_scaffold_longer_than_slot_is_an_error(char_tok):
    with pytest.raises(PMLError) as info:
        compute_layout(
            parse_schema('<schema name="s"><module name="m">\n<parameter name="p" length="2" scaffold="abc"/></module></schema>', path="s.pml"),
            char_tok,
        )
    e = info.value
    assert "3 tokens" in e.message and "slot holds 2" in e.message
    assert (e.file, e.line, e.element) == ("s.pml", 2, "parameter")


def test_nested_modules_paths_and_ownership(char_tok):
    layout = lay(
        '<schema name="s"><module name="a">A<module name="b">B<module name="c">C</module>b</module>a</module></schema>',
        char_tok,
    )
    assert list(layout.modules) == ["a", "a/b", "a/b/c"]
    assert [(m.start, m.end) for m in layout.modules.values()] == [(0, 5), (1, 4), (2, 3)]
    # Expected: a module owns its own text only, not its nested modules'.
    assert [s.token_ids for s in layout.module_segments("a")] == [(65,), (97,)]
    assert [s.token_ids for s in layout.module_segments("a/b")] == [(66,), (98,)]
    assert layout.ancestors("a/b/c") == ("a", "a/b")
    assert layout.ancestors("a") == ()
    assert layout.children("") == ("a",) and layout.children("a") == ("a/b",)
    kinds = [(s.path, s.kind) for s in layout.segments]
    assert kinds[0] == ("a", "module")  # document order: the module segment precedes its content
    with pytest.raises(KeyError):
        layout.module_segments("nope")


def test_chat_affixes_are_text_segments(char_tok):
    layout = lay('<schema name="s"><system>Hi</system><module name="m"><user>Q</user></module></schema>', char_tok)
    texts = [(s.path, char_tok.decode(s.token_ids)) for s in layout.segments if s.kind == "text"]
    assert texts == [("", "System: "), ("", "Hi"), ("", "\n"), ("m", "User: "), ("m", "Q"), ("m", "\n")]


def test_each_text_piece_is_tokenized_separately(tok):
    # Word tokenizer: "a b" and " c" would merge differently if joined; positions add up per piece.
    layout = lay('<schema name="s">a b<module name="m"> c</module></schema>', tok)
    texts = [s for s in layout.segments if s.kind == "text"]
    assert [len(s.token_ids) for s in texts] == [1, 2, 1]
    assert all(s.end - s.start == len(s.token_ids) for s in texts)


def test_segment_invariants_on_example(tok, examples):
    layout = compute_layout(parse_file(examples / "travel.pml"), tok)
    for s in layout.segments:
        if s.kind == "text":
            assert len(s.token_ids) == s.end - s.start > 0
        elif s.kind == "parameter":
            assert len(s.token_ids) <= s.end - s.start and s.name
        else:
            assert s.token_ids == () and (s.start, s.end) == (layout.modules[s.path].start, layout.modules[s.path].end)
    assert layout.length == max(s.end for s in layout.segments)
    dom, ovs = layout.modules["travel/domestic"], layout.modules["travel/overseas"]
    assert dom.start == ovs.start and dom.union == ovs.union and dom.scaffold and not ovs.scaffold
    assert layout.modules["travel"].end == max(dom.end, ovs.end)
    assert layout.modules["trip-plan"].start == layout.modules["travel"].end
    assert not layout.modules["budget"].cache


def test_empty_module_has_zero_length(char_tok):
    layout = lay('<schema name="s">x<module name="e"/>y</schema>', char_tok)
    assert (layout.modules["e"].start, layout.modules["e"].end) == (1, 1)
    assert layout.length == 2
