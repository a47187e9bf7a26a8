"""Helpers shared by several experiments: real text cut to exact token counts, repeat statistics, scratch stores."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path


def document_pool(data: Path, tokenizer, n_tokens: int, source: str = "longbench/multi_news.jsonl") -> list[int]:
    """Token ids of real text, at least `n_tokens` long: multi_news contexts, one after another."""
    path = data / source
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass --data DIR (or set PML_DATA) to the shared data folder")
    ids: list[int] = []
    with path.open() as f:
        for line in f:
            # LongBench multi_news writes newlines as the literal word NEWLINE_CHAR.
            text = json.loads(line)["context"].replace("NEWLINE_CHAR", "\n")
            ids += tokenizer.encode(text.strip() + "\n\n")
            if len(ids) >= n_tokens + 64:
                return ids
    raise ValueError(f"{path} holds only {len(ids)} tokens, fewer than the {n_tokens} asked for")


def exact_text(tokenizer, ids: list[int], n: int) -> tuple[str, int]:
    """Text that tokenizes to exactly `n` ids, read from the front of `ids`; also how many ids it used.

    Decoding a cut and re-encoding it can merge or split tokens at the edges (and PML drops
    leading blank lines and trailing newlines), so the cut is moved until the text, as PML will read
    it, is `n` tokens again.
    """
    from pml.parser import normalize_text

    def length(skip: int, m: int) -> tuple[str, int]:
        text = normalize_text(tokenizer.decode(ids[skip:skip + m]))
        return text, len(tokenizer.encode(text))

    # A cut inside a merged token can make every cut one token off; starting a token or two later
    # (real text either way) gets past it.
    for skip in range(8):
        m = n
        for _ in range(8):  # usually exact at once, or after one step
            text, got = length(skip, m)
            if got == n:
                return text, skip + m
            m += n - got
        for m in sorted(range(max(1, n - 16), n + 64), key=lambda m: abs(m - n)):  # split characters, whitespace runs
            text, got = length(skip, m)
            if got == n:
                return text, skip + m
    raise ValueError(f"could not cut the text to exactly {n} tokens (tokenizer {tokenizer.name})")


def split_exact(tokenizer, pool: list[int], sizes: list[int]) -> list[str]:
    """Consecutive pieces of the pool, piece i tokenizing to exactly `sizes[i]` ids."""
    texts, at = [], 0
    for size in sizes:
        text, used = exact_text(tokenizer, pool[at:], size)
        texts.append(text)
        at += used
    return texts


def piece_sizes(length: int, modules: int) -> list[int]:
    """`length` tokens split into `modules` nearly equal parts."""
    q, r = divmod(length, modules)
    return [q + (i < r) for i in range(modules)]


def module_tokens(layout) -> int:
    """Tokens in the schema's modules (the cached document), from the layout."""
    return sum(m.end - m.start for m in layout.modules.values())


def summarize(values: list[float]) -> dict[str, float]:
    """Median, min and max of repeats."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def rotated(seq, r: int) -> list:
    r %= len(seq)
    return list(seq[r:]) + list(seq[:r])


def reset_store_dir(path: Path) -> Path:
    """An empty store folder (the experiment's own scratch: removed again at the end)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path
