"""pml.compat: the authors' PML converts to strict PML that parses and lays out, every change reported."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
from lxml import etree
from pml_fakes import CharTokenizer

from pml.compat import add_arguments, convert, convert_file, run
from pml.errors import PMLError
from pml.layout import compute_layout
from pml.model import Chat, Module, Parameter
from pml.parser import parse_prompt, parse_schema

AUTHORS = Path(__file__).resolve().parent / "authors"  # fixtures written the way their repo writes PML


class MarkedChars(CharTokenizer):
    """One token per character, with chat affixes free of edge whitespace (see ``authors_layout``)."""

    name = "fake-marked-chars"

    def chat_affixes(self, role: str) -> tuple[str, str]:
        return f"[{role}]", f"[/{role}]"


def authors_layout(src: str, tok: MarkedChars, *, drop_blank: bool = False):
    """The authors' semantics, re-stated for the tests: chat tags are replaced by affix text before
    a recovering parse; every text run loses surrounding whitespace to one space and is encoded on
    its own; union members share their start. Returns text/parameter pieces and module ranges."""
    for role in ("system", "user", "assistant"):
        pre, post = tok.chat_affixes(role)
        src = src.replace(f"<{role}>", pre).replace(f"</{role}>", post)
    root = etree.fromstring(src.encode(), etree.XMLParser(recover=True, remove_comments=True))
    pieces: list[tuple[str, int, int, tuple[int, ...]]] = []
    modules: dict[str, tuple[int, int]] = {}

    def text(path: str, raw: str | None, pos: int) -> int:
        if raw is None:
            return pos
        t = re.sub(r"^\s+|\s+$", " ", raw)
        if not t or (drop_blank and not t.strip()):
            return pos
        ids = tuple(tok.encode(t))
        pieces.append((path, "text", pos, pos + len(ids), ids))
        return pos + len(ids)

    def module(path: str, el, pos: int) -> int:
        start = pos
        pos = text(path, el.text, pos)
        for child in el:
            if child.tag == "module":
                pos = module(f"{path}/{child.get('name')}".lstrip("/"), child, pos)
            elif child.tag == "union":
                end = pos
                for m in child:
                    end = max(end, module(f"{path}/{m.get('name')}".lstrip("/"), m, pos))
                pos = end
            elif child.tag == "parameter":
                n = int(child.get("length"))
                ids = tuple(tok.encode(child.get("scaffold") or ""))
                pieces.append((path, "parameter", pos, pos + n, ids))
                pos += n
            pos = text(path, child.tail, pos)
        if path:
            modules[path] = (start, pos)
        return pos

    module("", root, 0)
    return _flat(pieces), modules


def _flat(pieces):
    """Text as (path, position, id) per token, since runs split differently (a chat affix is its own
    segment here and part of a longer run there); parameters as whole slots."""
    out = []
    for path, kind, start, end, ids in pieces:
        if kind == "text":
            out += [(path, start + i, (t,)) for i, t in enumerate(ids)]
        else:
            out.append((path, (start, end), ids))
    return sorted(out, key=lambda p: (p[1] if isinstance(p[1], int) else p[1][0], p[0]))


def our_layout(schema_xml: str, tok: MarkedChars):
    lay = compute_layout(parse_schema(schema_xml), tok)
    pieces = [(s.path, s.kind, s.start, s.end, s.token_ids) for s in lay.segments if s.kind != "module"]
    return _flat(pieces), {p: (m.start, m.end) for p, m in lay.modules.items()}


# ------------------------------------------------------------------------------------- round trip


SAME_TOKENS = """<schema name='s'><system>Be brief.</system><user><module name='a' cache='False' kind='doc'>Hello
  there <parameter name='p' length=' 4 ' scaffold='ab'/> end<module name='b'>Nested</module></module><union scaffold='c'>
<module name='c'>C text</module><module name='d'>Longer d text</module></union></user></schema>"""


def test_round_trip_keeps_tokens_and_module_order():
    conv = convert(SAME_TOKENS)
    # Expected: only spelling changes (attributes), so our layout equals the authors' piece by piece.
    assert conv.kind == "schema" and all(c.same_tokens for c in conv.changes)
    tok = MarkedChars()
    assert our_layout(conv.text, tok) == authors_layout(SAME_TOKENS, tok)
    assert list(our_layout(conv.text, tok)[1]) == ["a", "a/b", "c", "d"]


def test_round_trip_with_raw_characters_and_indentation(tmp_path):
    src = """<schema name="code">
    <module name="map.py">
        return (0 <= x < n) and a & b
    </module>
    <module name="more">   if a<b: pass   </module>
</schema>"""
    escaped = src.replace("0 <= x < n", "0 &lt;= x &lt; n").replace("a & b", "a &amp; b").replace("a<b", "a&lt;b")
    conv = convert(src)
    tok = MarkedChars()
    # Expected: the text the authors meant (escaped by hand), whitespace-only runs aside, which
    # their parser encodes as single spaces and each has a note.
    assert our_layout(conv.text, tok) == authors_layout(escaped, tok, drop_blank=True)
    whats = [c.what for c in conv.changes]
    assert whats.count("escaped a raw '<' as &lt;") == 3 and whats.count("escaped a raw '&' as &amp;") == 1
    assert all(c.line == 3 for c in conv.changes if "'&'" in c.what)


# ---------------------------------------------------------------------------- the authors' files


@pytest.mark.parametrize("name", sorted(p.name for p in AUTHORS.glob("*schema.xml")))
def test_authors_schemas_convert_and_lay_out(name, tok):
    conv = convert_file(AUTHORS / name)
    schema = parse_schema(conv.text)
    layout = compute_layout(schema, tok)
    assert layout.modules and layout.length > 0
    assert all(c.line is not None and c.what and c.why for c in conv.changes)


@pytest.mark.parametrize("name", sorted(p.name for p in AUTHORS.glob("*prompt.xml")))
def test_authors_prompts_convert_and_bind(name, tok):
    from pml.prompt import bind_prompt

    conv = convert_file(AUTHORS / name)
    prompt = parse_prompt(conv.text)
    schema = convert_file(AUTHORS / name.replace("prompt", "schema"))
    bound = bind_prompt(prompt, compute_layout(parse_schema(schema.text), tok), tok)
    assert bound.modules and bound.suffix_ids


# --------------------------------------------------------------------------- each difference


def _whats(conv) -> str:
    return "\n".join(f"{c.line}: {c.what} ({c.why}) {c.same_tokens}" for c in conv.changes)


def test_split_user_turn_longbench_style():
    schema = convert('<schema name="lb">\n<system/>\n<user><module name="context">Story: x</module>\n</schema>')
    s = parse_schema(schema.text)
    # Expected: <system/> gone, the open <user> closed at the schema's end, around the module.
    assert s.children == (Chat("user", (Module("context", s.children[0].children[0].children),)),)
    assert "removed <system/>" in _whats(schema) and "closed <user> at the end of the schema" in _whats(schema)
    prompt = convert("<prompt schema='lb'>\n<context/>\nQuestion: who?\n\n</user><assistant>Answer:</prompt>")
    p = parse_prompt(prompt.text)
    assert [type(n).__name__ for n in p.children] == ["ModuleRef", "Chat", "Text"]
    assert p.children[1].role == "user" and p.children[1].children[0].text == "Question: who?"
    assert p.children[2].text == "Answer:"
    assert "a <user> turn" in _whats(prompt) and "open <assistant>" in _whats(prompt)
    assert not any(c.same_tokens for c in prompt.changes)


def test_balanced_chat_tags_become_elements():
    conv = convert("<schema name='s'><module name='m'><system>S<union><module name='u'>U</module></union></system></module></schema>")
    m = parse_schema(conv.text).children[0]
    assert isinstance(m.children[0], Chat) and m.children[0].role == "system"


def test_turn_closed_in_another_element_is_an_error():
    with pytest.raises(PMLError) as e:
        convert("<schema name='s'>\n<user><module name='m'>text</user></module></schema>")
    assert e.value.line == 2 and e.value.element == "user" and "whole elements" in e.value.message


def test_html_entity_becomes_the_character():
    conv = convert("<schema name='s'><module name='m'>a&nbsp;b &copy;</module></schema>")
    assert parse_schema(conv.text).children[0].children[0].text == "a\u00a0b \u00a9"
    assert sum("HTML entity" in c.what for c in conv.changes) == 2


def test_parameter_without_scaffold_is_kept_and_noted():
    conv = convert("<schema name='s'><module name='m'>x <parameter name='p' len='3' scaffold=''/></module></schema>")
    assert parse_schema(conv.text).children[0].children[1] == Parameter("p", 3, None)
    w = _whats(conv)
    assert "renamed len= to length=" in w and "removed an empty scaffold" in w and "has no scaffold" in w


def test_whitespace_only_module_is_noted():
    conv = convert("<schema name='s'><module name='blank'>   \n </module></schema>")
    assert parse_schema(conv.text).children == (Module("blank"),)
    assert any("holds only whitespace" in c.what and not c.same_tokens for c in conv.changes)


def test_src_paths():
    conv = convert("<schema name='s'><module name='m' src='docs/a.txt'/></schema>", path="x.xml")
    assert any("src=" in c.what and "schema's folder" in c.why for c in conv.changes)
    with pytest.raises(PMLError, match="relative path"):
        convert("<schema name='s'><module name='m' src='/etc/passwd'/></schema>")


def test_text_between_prompt_references_is_dropped_like_theirs():
    conv = convert("<prompt schema='s'><a/> lost <b/> kept</prompt>")
    p = parse_prompt(conv.text)
    assert [getattr(n, "text", None) for n in p.children] == [None, None, "kept"]
    assert any("between module references" in c.what for c in conv.changes)


def test_unknown_element_becomes_text_and_reserved_name_is_an_error():
    conv = convert("<schema name='s'><module name='m'>a <b>bold</b> c</module></schema>")
    assert "<b>bold</b>" in parse_schema(conv.text).children[0].children[0].text
    with pytest.raises(PMLError, match="reserved"):
        convert("<schema name='s'><module name='user'>x</module></schema>")


def test_union_text_and_members_only():
    conv = convert("<schema name='s'><union>stray<module name='a'>A</module></union></schema>")
    assert any("inside <union>" in c.what and c.same_tokens for c in conv.changes)
    with pytest.raises(PMLError, match="only <module>"):
        convert("<schema name='s'><union><parameter name='p' length='1'/></union></schema>")


def test_declaration_with_encoding_in_bytes():
    data = '<?xml version="1.0" encoding="ISO-8859-1"?>\n<schema name="s"><module name="m">café</module></schema>'
    conv = convert(data.encode("latin-1"))
    assert parse_schema(conv.text).children[0].children[0].text == "café"


def test_prompt_without_schema_is_an_error():
    with pytest.raises(PMLError, match="schema="):
        convert("<prompt>just text</prompt>")


# -------------------------------------------------------------------------------- the command


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pml import-authors")
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_run_writes_beside_inputs_and_reports(tmp_path, capsys):
    src = tmp_path / "lb_schema.xml"
    src.write_text((AUTHORS / "longbench_schema.xml").read_text())
    before = src.read_text()
    assert run(_args(str(src))) == 0
    out = capsys.readouterr().out.splitlines()
    dest = tmp_path / "pml-imported" / "lb_schema.pml"
    assert out[0] == f"{src} -> {dest}" and dest.exists() and src.read_text() == before
    # Expected: one FILE:LINE: note: WHAT (WHY) line per change.
    assert len(out) == 1 + len(convert_file(src).changes)
    assert all(re.fullmatch(re.escape(str(src)) + r":\d+: note: .+ \(.+\)", line) for line in out[1:])
    parse_schema(dest.read_text())


def test_run_never_overwrites_an_input(tmp_path, capsys):
    src = tmp_path / "a.pml"
    src.write_text("<schema name='s'><module name='m'>x</module></schema>")
    assert run(_args(str(src), "--out", str(tmp_path))) == 2
    err = capsys.readouterr().err
    assert "overwrite an input" in err and err.startswith(f"{src}: error:")
    assert src.read_text() == "<schema name='s'><module name='m'>x</module></schema>"


def test_run_reports_errors_and_continues(tmp_path, capsys):
    bad = tmp_path / "bad.xml"
    bad.write_text("<schema name='s'>\n<module name='m'>x</user></module></schema>")
    good = tmp_path / "good.xml"
    good.write_text("<schema name='s'><module name='m'>x</module></schema>")
    assert run(_args(str(bad), str(good), "--out", str(tmp_path / "o"))) == 2
    cap = capsys.readouterr()
    assert cap.err.startswith(f"{bad}:2: error: <user>:") and (tmp_path / "o" / "good.pml").exists()


def test_run_to_stdout(tmp_path, capsys):
    src = tmp_path / "s.xml"
    src.write_text("<schema name='s'><module name='m' cache='no'>x</module></schema>")
    assert run(_args(str(src), "--out", "-")) == 0
    cap = capsys.readouterr()
    parse_schema(cap.out)
    assert "note: wrote cache='no'" in cap.err


def test_selecting_two_union_members_converts_but_does_not_bind(tok):
    from pml.prompt import bind_prompt

    schema = convert("<schema name='s'><union><module name='a'>A</module><module name='b'>B</module></union></schema>")
    prompt = convert("<prompt schema='s'><a/><b/></prompt>")
    layout = compute_layout(parse_schema(schema.text), tok)
    # Expected: their engine would use both (overlapping positions); PML unions are exclusive.
    with pytest.raises(PMLError, match="same union"):
        bind_prompt(parse_prompt(prompt.text), layout, tok)
