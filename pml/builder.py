"""Build PML schemas and prompts from Python (e.g. to turn a dataset into a schema).

Example::

    b = SchemaBuilder("qa")
    b.system("Answer from the documents.")
    docs = b.union(scaffold="doc0")
    for i, text in enumerate(texts):
        docs.module(f"doc{i}", text=text)
    plan = b.module("ask")
    plan.text("Question: ").parameter("q", length=32)
    schema = parse_schema(b.to_xml())

    p = PromptBuilder("qa").use("doc3").use("ask", q="Who wrote it?").user("Be brief.")

Text goes through the parser's whitespace rule on the way back (``pml.parser.normalize_text``):
text that starts on the tag's line, as builder text does, is kept as written.
"""

from __future__ import annotations

from lxml import etree

from pml.model import Prompt, Schema

__all__ = ["SchemaBuilder", "ModuleBuilder", "UnionBuilder", "ChatBuilder", "PromptBuilder"]


def _append_text(el: etree._Element, text: str) -> None:
    if len(el):
        last = el[-1]
        last.tail = (last.tail or "") + text
    else:
        el.text = (el.text or "") + text


class _Content:
    """Shared by the schema root, modules and chat turns: text, modules, unions."""

    _el: etree._Element
    _parent: _Content | None

    def text(self, text: str) -> _Content:
        """Append ``text`` (escaped on output); returns this builder."""
        _append_text(self._el, text)
        return self

    def module(self, name: str, text: str | None = None, *, cache: bool = True, src: str | None = None) -> ModuleBuilder:
        """Add ``<module name=...>`` (optionally with text or ``src``) and return its builder."""
        el = etree.SubElement(self._el, "module", name=name)
        if not cache:
            el.set("cache", "false")
        if src is not None:
            el.set("src", src)
        mb = ModuleBuilder(el, self)
        if text is not None:
            mb.text(text)
        return mb

    def union(self, scaffold: str | None = None) -> UnionBuilder:
        """Add a ``<union>`` and return its builder (add members with ``.module``)."""
        el = etree.SubElement(self._el, "union")
        if scaffold is not None:
            el.set("scaffold", scaffold)
        return UnionBuilder(el, self)

    def end(self) -> _Content:
        """The enclosing builder (the root returns itself)."""
        return self._parent if self._parent is not None else self


class _Chatty(_Content):
    def _chat(self, role: str, text: str | None) -> ChatBuilder:
        cb = ChatBuilder(etree.SubElement(self._el, role), self)
        if text is not None:
            cb.text(text)
        return cb

    def system(self, text: str | None = None) -> ChatBuilder:
        """Add a ``<system>`` turn (optionally with text) and return its builder."""
        return self._chat("system", text)

    def user(self, text: str | None = None) -> ChatBuilder:
        """Add a ``<user>`` turn and return its builder."""
        return self._chat("user", text)

    def assistant(self, text: str | None = None) -> ChatBuilder:
        """Add an ``<assistant>`` turn and return its builder."""
        return self._chat("assistant", text)


class _Params:
    _el: etree._Element

    def parameter(self, name: str, length: int, scaffold: str | None = None) -> _Params:
        """Add ``<parameter name length [scaffold]/>``; returns this builder."""
        el = etree.SubElement(self._el, "parameter", name=name, length=str(length))
        if scaffold is not None:
            el.set("scaffold", scaffold)
        return self


class SchemaBuilder(_Chatty):
    """Builds ``<schema name=...>``; ``to_xml()`` gives text that ``parse_schema`` accepts."""

    def __init__(self, name: str) -> None:
        self._el = etree.Element("schema", name=name)
        self._parent = None

    def to_xml(self) -> str:
        return etree.tostring(self._el, encoding="unicode")

    def build(self, *, path: str | None = None) -> Schema:
        """Parse the XML back (validates it); ``path`` anchors ``src=`` files."""
        from pml.parser import parse_schema

        return parse_schema(self.to_xml(), path=path)


class ModuleBuilder(_Chatty, _Params):
    """A ``<module>``: text, parameters, nested modules and unions, chat turns."""

    def __init__(self, el: etree._Element, parent: _Content) -> None:
        self._el = el
        self._parent = parent


class ChatBuilder(_Content, _Params):
    """A chat turn; ``parameter`` is only valid when the turn is inside a module."""

    def __init__(self, el: etree._Element, parent: _Content) -> None:
        self._el = el
        self._parent = parent


class UnionBuilder:
    """A ``<union>``: add members with ``module``."""

    def __init__(self, el: etree._Element, parent: _Content) -> None:
        self._el = el
        self._parent = parent

    def module(self, name: str, text: str | None = None, *, cache: bool = True, src: str | None = None) -> ModuleBuilder:
        return _Content.module(self, name, text, cache=cache, src=src)  # type: ignore[arg-type]

    def end(self) -> _Content:
        return self._parent


class PromptBuilder:
    """Builds ``<prompt schema=...>``: ``use("a/b", param=value)`` selects modules by path."""

    def __init__(self, schema: str) -> None:
        self._el = etree.Element("prompt", schema=schema)

    def use(self, path: str, **params: str) -> PromptBuilder:
        """Select module ``path`` (``"a/b/c"`` nests references), parameters on its last part."""
        el = self._el
        parts = path.strip("/").split("/")
        for name in parts:
            found = next((c for c in el if c.tag == name), None)
            el = found if found is not None else etree.SubElement(el, name)
        for key, value in params.items():
            el.set(key, value)
        return self

    def text(self, text: str) -> PromptBuilder:
        _append_text(self._el, text)
        return self

    def _chat(self, role: str, text: str) -> PromptBuilder:
        etree.SubElement(self._el, role).text = text
        return self

    def system(self, text: str) -> PromptBuilder:
        return self._chat("system", text)

    def user(self, text: str) -> PromptBuilder:
        return self._chat("user", text)

    def assistant(self, text: str) -> PromptBuilder:
        return self._chat("assistant", text)

    def to_xml(self) -> str:
        return etree.tostring(self._el, encoding="unicode")

    def build(self) -> Prompt:
        from pml.parser import parse_prompt

        return parse_prompt(self.to_xml())
