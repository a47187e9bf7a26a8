"""Bind a parsed prompt to a laid-out schema: which modules, which parameter values, what new text.

Selection: a reference ``<a>`` selects module ``a`` with its own text and parameters; a module
nested in ``a`` is selected only when referenced inside it (``<a><b/></a>`` selects ``a`` and
``a/b``). Every parameter of a selected module gets an entry in ``BoundPrompt.arguments``: the
prompt's value, else the parameter's scaffold ids, else it is an error. All prompt-level text and
chat turns, in document order, become ``suffix_ids``, placed from ``Layout.length`` on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pml.errors import PMLError
from pml.layout import Layout, Tokenizer, join_path
from pml.model import Chat, ModuleRef, Prompt, Text

__all__ = ["BoundPrompt", "bind_prompt"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BoundPrompt:
    """A prompt resolved against one layout; plain data for the assembler."""

    schema: str  # schema name
    modules: tuple[str, ...]  # selected module paths, in layout order
    arguments: dict[tuple[str, str], tuple[int, ...]] = field(default_factory=dict)
    # (module path, parameter name) -> value ids, at most the slot length; one per parameter of
    # each selected module (a scaffold's ids when the prompt gave no value)
    suffix_ids: tuple[int, ...] = ()  # new text, positions Layout.length onwards


def _names(paths: tuple[str, ...]) -> str:
    return ", ".join(p.rsplit("/", 1)[-1] for p in paths) or "none"


class _Binder:
    def __init__(self, prompt: Prompt, layout: Layout, tokenizer: Tokenizer) -> None:
        self.prompt = prompt
        self.layout = layout
        self.tok = tokenizer
        self.selected: set[str] = set()
        self.chosen: dict[int, str] = {}  # union id -> chosen member path
        self.arguments: dict[tuple[str, str], tuple[int, ...]] = {}

    def error(self, message: str, ref: ModuleRef) -> PMLError:
        return PMLError(message, self.prompt.file, ref.line, ref.name)

    def select(self, parent: str, ref: ModuleRef) -> None:
        lay = self.layout
        path = join_path(parent, ref.name)
        if path not in lay.modules:
            where = f"inside {parent!r}" if parent else "at the top level"
            raise self.error(
                f"unknown module {ref.name!r} {where} of schema {lay.schema_name!r} "
                f"(modules there: {_names(lay.children(parent))})",
                ref,
            )
        module = lay.modules[path]
        if module.union is not None:
            other = self.chosen.get(module.union)
            if other is not None:
                raise self.error(
                    f"{other.rsplit('/', 1)[-1]!r} and {ref.name!r} are members of the same union: choose one",
                    ref,
                )
            self.chosen[module.union] = path
        self.selected.add(path)
        slots = {s.name: s for s in lay.module_segments(path) if s.kind == "parameter"}
        for name, value in ref.arguments:
            slot = slots.get(name)
            if slot is None:
                raise self.error(
                    f"unknown parameter {name!r} of module {path!r} (parameters: {', '.join(slots) or 'none'})",
                    ref,
                )
            ids = tuple(self.tok.encode(value))
            if len(ids) > slot.length:
                raise self.error(
                    f"value of parameter {name!r} is {len(ids)} tokens with tokenizer {self.tok.name!r} "
                    f"but its slot holds {slot.length}: shorten it, or raise length= in the schema",
                    ref,
                )
            self.arguments[(path, name)] = ids
        for name, slot in slots.items():
            if (path, name) not in self.arguments:
                if not slot.token_ids:
                    raise self.error(
                        f"parameter {name!r} of module {path!r} has no value and no scaffold: "
                        f"add {name}=\"...\" to <{ref.name}>",
                        ref,
                    )
                self.arguments[(path, name)] = slot.token_ids
        for child in ref.children:
            self.select(path, child)

    def suffix(self) -> tuple[int, ...]:
        ids: list[int] = []
        chat = False
        for node in self.prompt.children:
            if isinstance(node, Text):
                ids += self.tok.encode(node.text)
            elif isinstance(node, Chat):
                chat = True
                prefix, suffix = self.tok.chat_affixes(node.role)
                ids += self.tok.encode(prefix)
                for t in node.children:
                    ids += self.tok.encode(t.text)  # type: ignore[union-attr]  # prompts: Text only
                ids += self.tok.encode(suffix)
        if chat:  # the model answers as the assistant
            ids += self.tok.encode(self.tok.chat_affixes("assistant")[0])
        return tuple(ids)


def bind_prompt(prompt: Prompt, layout: Layout, tokenizer: Tokenizer) -> BoundPrompt:
    """Resolve ``prompt`` against ``layout`` (rules in the module docstring); errors are PMLError."""
    if prompt.schema != layout.schema_name:
        raise PMLError(
            f"prompt uses schema {prompt.schema!r} but was given schema {layout.schema_name!r}: "
            "pass the schema it names or fix schema=\"...\"",
            prompt.file, prompt.line, "prompt",
        )
    b = _Binder(prompt, layout, tokenizer)
    for node in prompt.children:
        if isinstance(node, ModuleRef):
            b.select("", node)
    modules = tuple(p for p in layout.modules if p in b.selected)
    bound = BoundPrompt(layout.schema_name, modules, b.arguments, b.suffix())
    log.debug("bound prompt to %s: %d modules, %d suffix tokens", layout.schema_name, len(modules), len(bound.suffix_ids))
    return bound
