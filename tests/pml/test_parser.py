"""pml.parser: every construct parses into the typed tree; every bad input is a located PMLError."""

from __future__ import annotations

import os
import time

import pytest

from pml.errors import PMLError
from pml.model import Chat, Module, ModuleRef, Parameter, Prompt, Schema, Text, Union
from pml.parser import normalize_text, parse_file, parse_prompt, parse_schema


def test_every_schema_construct():
    src = """<schema name="s">
  <system>Be brief.</system>
  Intro text.
  <module name="a" cache="false">
    A text <parameter name="p" length="3" scaffold="x"/> after.
    <module name="b">B text</module>
    <union scaffold="u1">
      <module name="u1">one</module>
      <module name="u2"><user>two</user></module>
    </union>
  </module>
  <user><module name="c">in a turn</module></user>
</schema>"""
    s = parse_schema(src)
    # Expected: the tree mirrors the document, whitespace-only runs dropped.
    assert s == Schema(
        "s",
        (
            Chat("system", (Text("Be brief."),)),
            Text("Intro text.\n"),
            Module(
                "a",
                (
                    Text("A text "),
                    Parameter("p", 3, "x"),
                    Text(" after.\n"),
                    Module("b", (Text("B text"),)),
                    Union(
                        (
                            Module("u1", (Text("one"),)),
                            Module("u2", (Chat("user", (Text("two"),)),)),
                        ),
                        scaffold="u1",
                    ),
                ),
                cache=False,
            ),
            Chat("user", (Module("c", (Text("in a turn"),)),)),
        ),
    )
    assert s.children[2].line == 4


def test_every_prompt_construct():
    p = parse_prompt(
        """<prompt schema="s">
  <a p="1 2"><b/><u2/></a>
  New text.
  <user>Question?</user>
</prompt>"""
    )
    assert p == Prompt(
        "s",
        (
            ModuleRef("a", (("p", "1 2"),), (ModuleRef("b"), ModuleRef("u2"))),
            Text("New text.\n"),
            Chat("user", (Text("Question?"),)),
        ),
    )


def test_comments_and_processing_instructions_are_ignored():
    s = parse_schema('<?xml version="1.0"?><!-- c --><schema name="s"><?pi x?>a<!-- x -->b</schema>')
    # Expected: removing a comment joins the text around it.
    assert s.children == (Text("ab"),)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("   \n\t  ", ""),  # indentation between elements: dropped
        ("Hello world", "Hello world"),  # inline text kept as written
        ("Plan of ", "Plan of "),  # a space before an element survives
        (" days.", " days."),  # and after one
        ("\n    Line one.\n      Indented.\n    ", "Line one.\n  Indented.\n"),  # dedent block
        ("\n\n  a\n\n  b\n", "a\n\nb\n"),  # blank lines inside kept
        ("def f():\n    return 1\n", "def f():\n    return 1\n"),  # inline start: no dedent
        ("x  y", "x  y"),
    ],
)
def test_whitespace_rule(raw, expected):
    assert normalize_text(raw) == expected


def test_last_text_of_chat_turn_loses_its_newline():
    s = parse_schema("<schema name='s'><user>\n  Hi there.\n</user></schema>")
    assert s.children == (Chat("user", (Text("Hi there."),)),)


def test_src_loads_text_relative_to_schema(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "d.txt").write_text("Doc\n  body\n", encoding="utf-8")
    f = tmp_path / "s.pml"
    f.write_text('<schema name="s"><module name="d" src="docs/d.txt"/></schema>')
    s = parse_file(f)
    # Expected: the file content verbatim, no whitespace rule applied.
    assert s.children == (Module("d", (Text("Doc\n  body\n"),), src="docs/d.txt"),)
    assert s.file == str(f)


def test_src_example_file_loads(examples):
    s = parse_file(examples / "report.pml")
    assert "Harbor Point" in s.children[1].children[0].text


def test_parse_file_dispatches_on_root(examples):
    assert isinstance(parse_file(examples / "travel.pml"), Schema)
    assert isinstance(parse_file(examples / "travel_prompt.pml"), Prompt)


# ------------------------------------------------------------------------------------------ errors

BAD_SCHEMAS = [
    # (id, source, message fragment, line, element)
    ("malformed", '<schema name="s">\n<module name="a">\n</schema>', "malformed XML", 3, None),
    ("unclosed", '<schema name="s">\ntext', "malformed XML", 2, None),
    ("empty", "", "malformed XML", 1, None),
    ("unknown-element", '<schema name="s">\n<modul name="a"/>\n</schema>', "unknown element <modul>", 2, "modul"),
    ("root-not-schema", '<prompt schema="s"/>', "expected <schema>", 1, "prompt"),
    ("nested-schema", '<schema name="s">\n<schema name="t"/></schema>', "only allowed as the document root", 2, "schema"),
    ("parameter-at-root", '<schema name="s">\n<parameter name="p" length="2"/></schema>', "only allowed inside a <module>", 2, "parameter"),
    ("nested-chat", '<schema name="s"><user>\n<system>x</system></user></schema>', "chat tags do not nest", 2, "system"),
    ("namespaced", '<schema name="s" xmlns:x="urn:x">\n<x:module name="a"/></schema>', "namespaced", 2, "{urn:x}module"),
    ("missing-schema-name", "<schema>\n</schema>", "schema needs a name", 1, "schema"),
    ("missing-module-name", '<schema name="s">\n<module>x</module></schema>', "module needs a name", 2, "module"),
    ("empty-module-name", '<schema name="s">\n<module name="">x</module></schema>', "module needs a name", 2, "module"),
    ("invalid-name-digit", '<schema name="s">\n<module name="1st"/></schema>', "invalid module name '1st'", 2, "module"),
    ("invalid-name-space", '<schema name="s">\n<module name="a b"/></schema>', "invalid module name", 2, "module"),
    ("invalid-name-slash", '<schema name="s">\n<module name="a/b"/></schema>', "invalid module name", 2, "module"),
    ("reserved-name", '<schema name="s">\n<module name="user"/></schema>', "is reserved", 2, "module"),
    ("invalid-param-name", '<schema name="s"><module name="a">\n<parameter name="x y" length="1"/></module></schema>', "invalid parameter name", 2, "parameter"),
    ("duplicate-siblings", '<schema name="s">\n<module name="a"/>\n<module name="a"/></schema>', "duplicate module name 'a'", 3, "module"),
    ("duplicate-union-member", '<schema name="s"><module name="a"/>\n<union><module name="a"/></union></schema>', "duplicate module name 'a'", 2, "module"),
    ("duplicate-in-chat", '<schema name="s"><module name="a"/>\n<user><module name="a"/></user></schema>', "duplicate module name", 2, "module"),
    ("duplicate-nested", '<schema name="s"><module name="a"><module name="b"/>\n<module name="b"/></module></schema>', "duplicate module name 'b'", 2, "module"),
    ("duplicate-parameter", '<schema name="s"><module name="a"><parameter name="p" length="1"/>\n<parameter name="p" length="1"/></module></schema>', "duplicate parameter", 2, "parameter"),
    ("union-text", '<schema name="s"><union>\nhello<module name="a"/></union></schema>', "only <module> members", 1, "union"),
    ("union-tail-text", '<schema name="s"><union><module name="a"/>\nhi</union></schema>', "only <module> members", 1, "union"),
    ("union-parameter", '<schema name="s"><module name="m"><union>\n<parameter name="p" length="1"/></union></module></schema>', "not <parameter>", 2, "union"),
    ("union-nested-union", '<schema name="s"><union>\n<union/></union></schema>', "not <union>", 2, "union"),
    ("union-empty", '<schema name="s">\n<union/></schema>', "empty <union>", 2, "union"),
    ("union-bad-scaffold", '<schema name="s">\n<union scaffold="c"><module name="a"/></union></schema>', "scaffold 'c' is not a member", 2, "union"),
    ("param-no-length", '<schema name="s"><module name="a">\n<parameter name="p"/></module></schema>', "needs length=", 2, "parameter"),
    ("param-zero-length", '<schema name="s"><module name="a">\n<parameter name="p" length="0"/></module></schema>', "positive number", 2, "parameter"),
    ("param-negative-length", '<schema name="s"><module name="a">\n<parameter name="p" length="-3"/></module></schema>', "positive number", 2, "parameter"),
    ("param-text-length", '<schema name="s"><module name="a">\n<parameter name="p" length="four"/></module></schema>', "positive number", 2, "parameter"),
    ("param-float-length", '<schema name="s"><module name="a">\n<parameter name="p" length="2.5"/></module></schema>', "positive number", 2, "parameter"),
    ("param-content", '<schema name="s"><module name="a">\n<parameter name="p" length="2">x</parameter></module></schema>', "takes no content", 2, "parameter"),
    ("param-empty-scaffold", '<schema name="s"><module name="a">\n<parameter name="p" length="2" scaffold=" "/></module></schema>', "empty scaffold", 2, "parameter"),
    ("bad-cache", '<schema name="s">\n<module name="a" cache="yes"/></schema>', "cache must be", 2, "module"),
    ("unknown-attribute", '<schema name="s">\n<module name="a" size="3"/></schema>', "unknown attribute 'size'", 2, "module"),
    ("src-without-path", '<schema name="s">\n<module name="a" src="x.txt"/></schema>', "needs the schema's file location", 2, "module"),
    ("undefined-entity", '<schema name="s">\n&foo;</schema>', "malformed XML", 2, None),
]


@pytest.mark.parametrize("source, fragment, line, element", [b[1:] for b in BAD_SCHEMAS], ids=[b[0] for b in BAD_SCHEMAS])
def test_bad_schema(source, fragment, line, element):
    with pytest.raises(PMLError) as info:
        parse_schema(source, path="bad.pml") if "src=" not in source else parse_schema(source)
    e = info.value
    assert fragment in e.message
    assert e.line == line
    assert e.element == element
    if "src=" not in source:
        assert e.file == "bad.pml"
        assert str(e).startswith(f"bad.pml:{line}: error: ")


BAD_PROMPTS = [
    ("malformed", '<prompt schema="s">\n<a>', "malformed XML", 2, None),
    ("root-not-prompt", '<schema name="s"/>', "expected <prompt>", 1, "schema"),
    ("no-schema", "<prompt>\n</prompt>", "needs the schema", 1, "prompt"),
    ("module-tag", '<prompt schema="s">\n<module name="a"/></prompt>', "belongs in a schema", 2, "module"),
    ("parameter-tag", '<prompt schema="s"><a>\n<parameter name="p"/></a></prompt>', "belongs in a schema", 2, "parameter"),
    ("text-in-ref", '<prompt schema="s">\n<a>some text</a></prompt>', "text inside module reference <a>", 2, "a"),
    ("tail-in-ref", '<prompt schema="s"><a><b/>\ntext</a></prompt>', "text inside module reference <a>", 1, "a"),
    ("chat-in-ref", '<prompt schema="s"><a>\n<user>x</user></a></prompt>', "chat tag <user> inside a module reference", 2, "user"),
    ("ref-in-chat", '<prompt schema="s"><user>\n<a/></user></prompt>', "chat tags hold text only", 2, "a"),
    ("twice", '<prompt schema="s"><a/>\n<a/></prompt>', "referenced twice", 2, "a"),
    ("unknown-attr-prompt", '<prompt schema="s" model="x"/>', "unknown attribute 'model'", 1, "prompt"),
]


@pytest.mark.parametrize("source, fragment, line, element", [b[1:] for b in BAD_PROMPTS], ids=[b[0] for b in BAD_PROMPTS])
def test_bad_prompt(source, fragment, line, element):
    with pytest.raises(PMLError) as info:
        parse_prompt(source, path="p.pml")
    e = info.value
    assert fragment in e.message
    assert (e.line, e.element, e.file) == (line, element, "p.pml")


def _schema_file(tmp_path, body: str):
    f = tmp_path / "s.pml"
    f.write_text(f'<schema name="s">\n{body}\n</schema>', encoding="utf-8")
    return f


def _error(f) -> PMLError:
    with pytest.raises(PMLError) as info:
        parse_file(f)
    assert info.value.file == str(f)
    return info.value


def test_missing_src_file(tmp_path):
    e = _error(_schema_file(tmp_path, '<module name="a" src="docs/nope.txt"/>'))
    assert "src file 'docs/nope.txt' not found" in e.message
    assert (e.line, e.element) == (2, "module")


@pytest.mark.parametrize("src", ["../outside.txt", "docs/../../outside.txt", "/etc/hostname", ""])
def test_src_escaping_folder(tmp_path, src):
    sub = tmp_path / "sub"
    sub.mkdir()
    (tmp_path / "outside.txt").write_text("secret")
    e = _error(_schema_file(sub, f'<module name="a" src="{src}"/>'))
    assert "schema's folder" in e.message
    assert (e.line, e.element) == (2, "module")


def test_src_symlink_escaping_folder(tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    (tmp_path / "outside.txt").write_text("secret")
    os.symlink(tmp_path / "outside.txt", sub / "link.txt")
    e = _error(_schema_file(sub, '<module name="a" src="link.txt"/>'))
    assert "leaves the schema's folder" in e.message


def test_src_with_content(tmp_path):
    (tmp_path / "d.txt").write_text("x")
    e = _error(_schema_file(tmp_path, '<module name="a" src="d.txt">more</module>'))
    assert "use one or the other" in e.message and e.line == 2


def test_src_not_utf8(tmp_path):
    (tmp_path / "d.txt").write_bytes(b"\xff\xfe\x00bad")
    e = _error(_schema_file(tmp_path, '<module name="a" src="d.txt"/>'))
    assert "not UTF-8" in e.message


def test_missing_file(tmp_path):
    e = _error(tmp_path / "nope.pml")
    assert "cannot read file" in e.message


BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<schema name="s"><module name="a">&lol9;</module></schema>"""


@pytest.mark.parametrize("parse", [parse_schema, parse_prompt])
def test_billion_laughs_fails_fast(parse):
    t0 = time.perf_counter()
    with pytest.raises(PMLError) as info:
        parse(BILLION_LAUGHS, path="lol.pml")
    assert time.perf_counter() - t0 < 1.0
    e = info.value
    assert "DOCTYPE" in e.message and (e.line, e.element) == (2, "!DOCTYPE")


@pytest.mark.parametrize(
    "doctype",
    [
        '<!DOCTYPE schema SYSTEM "file:///etc/passwd">',
        '<!DOCTYPE schema [<!ENTITY x SYSTEM "file:///etc/passwd">]>',
        "<!DOCTYPE schema>",
    ],
)
def test_any_doctype_is_an_error(doctype):
    with pytest.raises(PMLError, match="DOCTYPE"):
        parse_schema(f'{doctype}\n<schema name="s">x</schema>')


def test_parsing_is_pure_data():
    # Parsing needs no tokenizer: the same text gives equal trees.
    src = '<schema name="s"><module name="a">x <parameter name="p" length="2"/></module></schema>'
    assert parse_schema(src) == parse_schema(src.encode())


# --------------------------------------------------------------------------- encodings and XML hints


def _schema_error(src: str) -> PMLError:
    with pytest.raises(PMLError) as info:
        parse_schema(src)
    return info.value


def test_str_with_an_encoding_declaration_is_read_as_text():
    # A str is already decoded: its declaration's encoding must not re-decode it (was "cafÃ©").
    s = parse_schema('<?xml version="1.0" encoding="ISO-8859-1"?>\n<schema name="s">café</schema>')
    assert s.children == (Text("café"),)


def test_bytes_keep_their_declared_encoding():
    data = '<?xml version="1.0" encoding="ISO-8859-1"?><schema name="s">café</schema>'.encode("latin-1")
    assert parse_schema(data).children == (Text("café"),)


@pytest.mark.parametrize(
    "body, cause, hint",
    [
        ("if 0 <= x: pass", "StartTag", "&lt;"),
        ("x < y", "StartTag", "<![CDATA[...]]>"),
        ("a & b", "EntityRef", "&amp;"),
        ("a &b c", "EntityRef", "&amp;"),
        ("a&nbsp;b", "nbsp", "use the character itself or &#160;"),
        ("a &bogus; b", "bogus", "&amp;"),
        ("a &#xZZ; b", "CharRef", "&#xN;"),
    ],
)
def test_malformed_xml_names_the_usual_cause(body, cause, hint):
    e = _schema_error(f'<schema name="s">\n{body}</schema>')
    assert e.line == 2 and "malformed XML" in e.message and cause in e.message
    assert hint in e.message


def test_raw_lt_in_an_attribute_gets_a_hint():
    e = _schema_error('<schema name="s"><module name="a"><parameter name="p" length="3" scaffold="a<b"/></module></schema>')
    assert "&lt;" in e.message
