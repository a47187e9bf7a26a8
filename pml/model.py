"""Typed, immutable PML trees: what the parser returns and the layout and prompt binder read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union as _Union

__all__ = [
    "ROLES",
    "RESERVED_NAMES",
    "Text",
    "Parameter",
    "Chat",
    "Module",
    "Union",
    "Schema",
    "ModuleRef",
    "Prompt",
    "SchemaNode",
    "PromptNode",
]

ROLES = ("system", "user", "assistant")
# Element names the language itself uses. Prompts reference modules by element name, so a module
# called like one of these could not be told apart from the construct.
RESERVED_NAMES = frozenset({"schema", "prompt", "module", "union", "parameter", *ROLES})


@dataclass(frozen=True)
class Text:
    """A run of text, already whitespace-normalized (see ``pml.parser.normalize_text``)."""

    text: str
    line: int | None = field(default=None, compare=False)  # source line, for error messages


@dataclass(frozen=True)
class Parameter:
    """A slot of exactly ``length`` reserved positions, filled by a prompt's argument."""

    name: str
    length: int  # positions reserved, > 0
    scaffold: str | None = None  # text encoded in the slot when the prompt gives no value
    line: int | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Chat:
    """``<system>``, ``<user>`` or ``<assistant>``: content wrapped in the tokenizer's chat affixes."""

    role: str  # one of ROLES
    children: tuple[SchemaNode, ...] = ()  # in prompts: Text only
    line: int | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Module:
    """A named, independently cacheable span of the schema."""

    name: str
    children: tuple[SchemaNode, ...] = ()
    cache: bool = True  # False: positions are reserved but no attention states are stored
    src: str | None = None  # the file the text came from, as written in the schema
    line: int | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Union:
    """Mutually exclusive modules that all start at the same position."""

    members: tuple[Module, ...]
    scaffold: str | None = None  # name of the member encoded as the union's stand-in
    line: int | None = field(default=None, compare=False)


SchemaNode = _Union[Text, Parameter, Chat, Module, Union]


@dataclass(frozen=True)
class Schema:
    """A parsed ``<schema>``."""

    name: str
    children: tuple[SchemaNode, ...] = ()
    file: str | None = field(default=None, compare=False)  # where it was parsed from, if a file
    line: int | None = field(default=None, compare=False)


@dataclass(frozen=True)
class ModuleRef:
    """A module selected by a prompt: ``<name param="value">nested refs</name>``."""

    name: str
    arguments: tuple[tuple[str, str], ...] = ()  # (parameter name, value) in document order
    children: tuple[ModuleRef, ...] = ()
    line: int | None = field(default=None, compare=False)


PromptNode = _Union[Text, Chat, ModuleRef]


@dataclass(frozen=True)
class Prompt:
    """A parsed ``<prompt schema="...">``."""

    schema: str
    children: tuple[PromptNode, ...] = ()
    file: str | None = field(default=None, compare=False)
    line: int | None = field(default=None, compare=False)
