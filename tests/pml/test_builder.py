"""pml.builder: programmatic schemas and prompts round-trip through the parser."""

from __future__ import annotations

from pml.builder import PromptBuilder, SchemaBuilder
from pml.layout import compute_layout
from pml.model import Chat, Module, ModuleRef, Parameter, Prompt, Schema, Text, Union
from pml.parser import parse_prompt, parse_schema
from pml.prompt import bind_prompt


def test_schema_round_trip():
    b = SchemaBuilder("qa")
    b.system("Answer from the documents <& quote \"exactly\">.")
    docs = b.union(scaffold="doc0")
    for i, text in enumerate(["first doc", "second\n  indented doc\n"]):
        docs.module(f"doc{i}", text=text)
    ask = b.module("ask", cache=False)
    ask.text("Question: ").parameter("q", length=8, scaffold="what?").text(" Thanks.")
    inner = ask.module("inner", text="x")
    assert inner.end() is ask
    ask.user("in a turn ").parameter("r", 2)
    s = parse_schema(b.to_xml())
    # Expected: exactly the tree the calls describe; special characters survive escaping and
    # inline-started text keeps its indentation.
    assert s == Schema(
        "qa",
        (
            Chat("system", (Text('Answer from the documents <& quote "exactly">.'),)),
            Union((Module("doc0", (Text("first doc"),)), Module("doc1", (Text("second\n  indented doc\n"),))), "doc0"),
            Module(
                "ask",
                (
                    Text("Question: "),
                    Parameter("q", 8, "what?"),
                    Text(" Thanks."),
                    Module("inner", (Text("x"),)),
                    Chat("user", (Text("in a turn "), Parameter("r", 2))),
                ),
                cache=False,
            ),
        ),
    )
    assert b.build() == s


def test_src_module(tmp_path):
    (tmp_path / "d.txt").write_text("doc")
    b = SchemaBuilder("s")
    b.module("d", src="d.txt")
    s = b.build(path=tmp_path / "s.pml")
    assert s.children == (Module("d", (Text("doc"),), src="d.txt"),)


def test_prompt_round_trip(tok):
    p = (
        PromptBuilder("qa")
        .use("a/b/c", x="1 & 2")
        .use("a/d")
        .use("a", y="v")
        .text("New text.")
        .user("Why?")
    )
    parsed = parse_prompt(p.to_xml())
    # Expected: shared path prefixes merge into one nested reference.
    assert parsed == Prompt(
        "qa",
        (
            ModuleRef("a", (("y", "v"),), (ModuleRef("b", (), (ModuleRef("c", (("x", "1 & 2"),)),)), ModuleRef("d"))),
            Text("New text."),
            Chat("user", (Text("Why?"),)),
        ),
    )
    assert p.build() == parsed


def test_built_schema_and_prompt_bind(tok):
    b = SchemaBuilder("s")
    m = b.module("m", text="Hello ")
    m.parameter("name", 3)
    schema = b.build()
    layout = compute_layout(schema, tok)
    bound = bind_prompt(PromptBuilder("s").use("m", name="Ada").user("Hi").build(), layout, tok)
    assert bound.modules == ("m",) and tok.decode(bound.arguments[("m", "name")]) == "Ada"
