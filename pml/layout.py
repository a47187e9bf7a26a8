"""Token layout of a schema: every text piece tokenized separately, positions assigned to modules.

Rules: the tokenizer's BOS ids are a root text segment at position 0; positions then advance by
each piece's token count in document order; every member of a union starts at the union's start
and the union advances by its longest member; a parameter reserves exactly ``length`` positions;
a chat tag adds its prefix and suffix as text segments around its content.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from pml.errors import PMLError
from pml.model import ROLES, Chat, Module, Parameter, Schema, SchemaNode, Text, Union

__all__ = ["Tokenizer", "PlainChat", "Segment", "ModuleLayout", "Layout", "compute_layout", "join_path"]

log = logging.getLogger(__name__)

SegmentKind = Literal["text", "parameter", "module"]


@runtime_checkable
class Tokenizer(Protocol):
    """What PML needs from a tokenizer.

    ``encode`` returns ids with no special tokens and never truncates; ``bos_ids`` go at position 0
    of every schema (may be empty); ``chat_affixes(role)`` gives the ``(prefix, suffix)`` text
    around a ``system``/``user``/``assistant`` turn; ``name`` identifies the tokenizer.
    """

    name: str
    bos_ids: tuple[int, ...]

    def encode(self, text: str) -> list[int]: ...

    def chat_affixes(self, role: str) -> tuple[str, str]: ...


class PlainChat:
    """Chat affixes for tokenizers without a chat template: ``"System: "``, ``"User: "``,
    ``"Assistant: "`` before the content and ``"\\n"`` after it.

    Mix it into a tokenizer class (``class MyTok(PlainChat): ...``) or call
    ``PlainChat.affixes(role)``.
    """

    @staticmethod
    def affixes(role: str) -> tuple[str, str]:
        if role not in ROLES:
            raise ValueError(f"unknown chat role {role!r}: expected one of {', '.join(ROLES)}")
        return f"{role.capitalize()}: ", "\n"

    def chat_affixes(self, role: str) -> tuple[str, str]:
        return PlainChat.affixes(role)


def join_path(parent: str, name: str) -> str:
    """Module path ``parent/name`` (``name`` alone at the root)."""
    return f"{parent}/{name}" if parent else name


@dataclass(frozen=True)
class Segment:
    """A span ``[start, end)`` of positions owned by the module at ``path`` (``""``: schema root).

    ``kind="text"``: ``token_ids`` has exactly ``end - start`` ids. ``kind="parameter"``:
    ``token_ids`` are the scaffold ids (at most ``end - start``, empty without a scaffold) and
    ``name`` is the parameter name. ``kind="module"``: covers the module ``path`` (named ``name``)
    as a whole, ``token_ids`` is empty.
    """

    path: str
    kind: SegmentKind
    start: int
    end: int
    token_ids: tuple[int, ...] = ()
    name: str | None = None

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class ModuleLayout:
    """Positions ``[start, end)`` of one module and its union membership."""

    path: str
    start: int
    end: int
    cache: bool
    union: int | None = None  # shared by the members of one union; None outside unions
    scaffold: bool = False  # whether this member is its union's scaffold


@dataclass(frozen=True)
class Layout:
    """A schema laid out in token positions; plain data, computed once per (schema, tokenizer)."""

    schema_name: str
    segments: tuple[Segment, ...]
    modules: Mapping[str, ModuleLayout]  # path -> layout, in document order
    length: int  # highest reserved position + 1; new prompt text starts here

    def module_segments(self, path: str) -> tuple[Segment, ...]:
        """The text and parameter segments ``path`` owns directly (not its nested modules')."""
        if path and path not in self.modules:
            raise KeyError(f"no module {path!r} in schema {self.schema_name!r}")
        return tuple(s for s in self.segments if s.path == path and s.kind != "module")

    def ancestors(self, path: str) -> tuple[str, ...]:
        """Paths of the modules enclosing ``path``, outermost first (``"a/b/c"`` -> ``("a", "a/b")``)."""
        parts = path.split("/")
        return tuple("/".join(parts[:i]) for i in range(1, len(parts)))

    def children(self, path: str) -> tuple[str, ...]:
        """Paths of the modules directly inside ``path`` (``""``: top-level modules)."""
        return tuple(p for p in self.modules if self.ancestors(p)[-1:] == ((path,) if path else ()))

    def union_members(self, union: int) -> tuple[str, ...]:
        """Paths of the members of union ``union``, in document order."""
        return tuple(p for p, m in self.modules.items() if m.union == union)


class _Builder:
    def __init__(self, schema: Schema, tokenizer: Tokenizer) -> None:
        self.schema = schema
        self.tok = tokenizer
        self.pos = 0
        self.segments: list[Segment] = []
        self.modules: dict[str, ModuleLayout] = {}
        self.unions = 0

    def encode(self, text: str) -> tuple[int, ...]:
        return tuple(self.tok.encode(text))

    def text(self, path: str, text: str) -> None:
        ids = self.encode(text)
        if ids:
            self.segments.append(Segment(path, "text", self.pos, self.pos + len(ids), ids))
            self.pos += len(ids)

    def nodes(self, path: str, nodes: tuple[SchemaNode, ...]) -> None:
        for node in nodes:
            if isinstance(node, Text):
                self.text(path, node.text)
            elif isinstance(node, Parameter):
                self.parameter(path, node)
            elif isinstance(node, Chat):
                prefix, suffix = self.tok.chat_affixes(node.role)
                self.text(path, prefix)
                self.nodes(path, node.children)
                self.text(path, suffix)
            elif isinstance(node, Module):
                self.module(path, node)
            elif isinstance(node, Union):
                self.union(path, node)
            else:  # a hand-built tree with a foreign node
                raise PMLError(f"unexpected node {type(node).__name__} in schema", self.schema.file)

    def parameter(self, path: str, p: Parameter) -> None:
        ids = self.encode(p.scaffold) if p.scaffold is not None else ()
        if p.scaffold is not None and not ids:
            raise PMLError(
                f"scaffold of parameter {p.name!r} encodes to no tokens: give visible text or remove it",
                self.schema.file, p.line, "parameter",
            )
        if len(ids) > p.length:
            raise PMLError(
                f"scaffold of parameter {p.name!r} is {len(ids)} tokens with tokenizer "
                f"{self.tok.name!r} but the slot holds {p.length}: raise length to at least {len(ids)} "
                "or shorten the scaffold",
                self.schema.file, p.line, "parameter",
            )
        self.segments.append(Segment(path, "parameter", self.pos, self.pos + p.length, ids, p.name))
        self.pos += p.length

    def module(self, parent: str, m: Module, union: int | None = None, scaffold: bool = False) -> None:
        path = join_path(parent, m.name)
        start = self.pos
        index = len(self.segments)
        self.segments.append(Segment(path, "module", start, start, (), m.name))  # end fixed below
        self.modules[path] = ModuleLayout(path, start, start, m.cache, union, scaffold)
        self.nodes(path, m.children)
        self.segments[index] = Segment(path, "module", start, self.pos, (), m.name)
        self.modules[path] = ModuleLayout(path, start, self.pos, m.cache, union, scaffold)

    def union(self, parent: str, u: Union) -> None:
        uid = self.unions
        self.unions += 1
        start = end = self.pos
        for member in u.members:
            self.pos = start  # every member starts where the union starts
            self.module(parent, member, uid, member.name == u.scaffold)
            end = max(end, self.pos)
        self.pos = end  # the union occupies its longest member


def compute_layout(schema: Schema, tokenizer: Tokenizer) -> Layout:
    """Lay ``schema`` out in positions with ``tokenizer`` (rules in the module docstring)."""
    b = _Builder(schema, tokenizer)
    bos = tuple(tokenizer.bos_ids)
    if bos:
        b.segments.append(Segment("", "text", 0, len(bos), bos))
        b.pos = len(bos)
    b.nodes("", schema.children)
    log.debug("layout %s: %d segments, %d modules, %d positions", schema.name, len(b.segments), len(b.modules), b.pos)
    return Layout(schema.name, tuple(b.segments), dict(b.modules), b.pos)
