"""Fake tokenizers implementing pml.layout.Tokenizer, shared by the pml tests (no model needed)."""

from __future__ import annotations

import re
from pathlib import Path

from pml.layout import PlainChat

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


class WordTokenizer(PlainChat):
    """One token per word with its leading whitespace (like BPE's ' word'); ids from a growing vocab."""

    name = "fake-words"
    bos_ids = (1,)

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}
        self.inverse: dict[int, str] = {}

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in re.findall(r"\s*\S+|\s+", text):
            if piece not in self.vocab:
                self.vocab[piece] = len(self.vocab) + 2
                self.inverse[self.vocab[piece]] = piece
            ids.append(self.vocab[piece])
        return ids

    def decode(self, ids) -> str:
        return "".join(self.inverse[i] for i in ids if i in self.inverse)


class CharTokenizer(PlainChat):
    """One token per character (id = code point), no BOS: positions are character counts."""

    name = "fake-chars"
    bos_ids = ()

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids) -> str:
        return "".join(map(chr, ids))
