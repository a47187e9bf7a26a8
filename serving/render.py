"""Chat messages to token ids through the tokenizer's chat affixes, with cache breakpoints as token offsets.

Both tokenizers used here (`HFTokenizer`, from the chat template, and the tiny models'
`ByteTokenizer`) expose `chat_affixes(role)`, the same affixes PML's chat tags use, so an API chat
and a PML prompt with the same turns are the same tokens. Every piece (affix, text block) is
encoded on its own: a breakpoint then always falls on a token boundary, and a conversation that
grows by turns keeps the token ids (hence the cached blocks) of its earlier turns.
"""

from __future__ import annotations

from dataclasses import dataclass

ROLE_ALIASES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class RenderError(ValueError):
    """A message the server cannot render (unknown role, unsupported content)."""


@dataclass(frozen=True)
class Block:
    text: str
    breakpoint_ttl: float | None = None  # seconds; set on blocks that end a cache breakpoint
    breakpoint: bool = False


@dataclass(frozen=True)
class Message:
    role: str
    blocks: tuple[Block, ...]


@dataclass(frozen=True)
class Rendered:
    ids: list[int]
    breakpoints: tuple[tuple[int, float | None], ...]  # (token offset just after the block, ttl_s)


def render_chat(tokenizer, messages: list[Message], add_generation_prompt: bool = True) -> Rendered:
    """Token ids of `messages` as the model's chat format, then the assistant prefix."""
    ids = list(tokenizer.bos_ids)
    marks: list[tuple[int, float | None]] = []
    for m in messages:
        role = ROLE_ALIASES.get(m.role)
        if role is None:
            raise RenderError(f"unknown message role {m.role!r}: use one of {', '.join(ROLE_ALIASES)}")
        prefix, suffix = tokenizer.chat_affixes(role)
        ids += tokenizer.encode(prefix)
        for b in m.blocks:
            ids += tokenizer.encode(b.text)
            if b.breakpoint:
                marks.append((len(ids), b.breakpoint_ttl))
        ids += tokenizer.encode(suffix)
    if add_generation_prompt:
        ids += tokenizer.encode(tokenizer.chat_affixes("assistant")[0])
    return Rendered(ids, tuple(marks))


def render_text(tokenizer, prompt: str) -> list[int]:
    """A plain completion prompt: BOS (if the model uses one) and the text, no chat format."""
    return list(tokenizer.bos_ids) + tokenizer.encode(prompt)
