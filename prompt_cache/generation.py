"""Prefill, one decode step, and the decode loop, with explicit positions throughout.

`model.generate()` would continue at the cache *length*; an assembled cache has gaps in its
positions, so the next position is carried here explicitly (`DecodeState.next_position`).
Each phase is its own function so that callers can time or swap it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator

import torch

from attention_store import adapter


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 64  # hard cap on generated tokens
    temperature: float = 0.0  # 0 = greedy (argmax); > 0 samples
    top_p: float = 1.0  # nucleus sampling mass (only when sampling)
    seed: int | None = None  # sampling seed; None = nondeterministic
    stop: tuple[str, ...] = ()  # stop strings; the text is cut before the first one
    eos_ids: tuple[int, ...] | None = None  # None = the tokenizer's end-of-turn / EOS ids

    def __post_init__(self):
        # Checked here, at construction, so a bad value fails before any model work (not mid-decode
        # inside torch: a NaN temperature or an oversized seed otherwise surface as torch errors).
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:  # NaN fails the comparison too
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED):
            raise ValueError(f"seed must be an integer in [0, 2**64 - 1], got {self.seed!r}")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) for s in self.stop):
            raise ValueError(f"stop must be a tuple of strings, got {self.stop!r}")
        if self.eos_ids is not None and not (isinstance(self.eos_ids, tuple) and all(map(_is_int, self.eos_ids))):
            raise ValueError(f"eos_ids must be None or a tuple of token ids, got {self.eos_ids!r}")


MAX_SEED = 2**64 - 1  # the largest seed torch.Generator.manual_seed takes


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class DecodeState:
    """The growing cache during decoding. cache layers: [1, kv_heads, len(positions), head_dim]."""

    cache: object
    positions: torch.Tensor  # [cache_len] position id of every state in the cache
    next_position: int  # position id of the next token to feed
    generated: list[int] = field(default_factory=list)


def prefill(lm, cache, cache_positions: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor,
            next_position: int | None = None) -> tuple[torch.Tensor, DecodeState]:
    """Compute `ids` over `cache` (all cached states visible); logits `[vocab]` of the last token."""
    assert ids.numel() > 0, "prefill needs at least one new token (the prompt adds no text?)"
    logits = adapter.forward(lm.model, ids, positions, cache, cache_positions, last_only=True)[-1]
    all_positions = torch.cat([cache_positions, positions])
    nxt = int(positions.max()) + 1 if next_position is None else next_position
    return logits, DecodeState(cache, all_positions, nxt)


def decode_step(lm, state: DecodeState, token: int) -> torch.Tensor:
    """Feed one token at `state.next_position`; logits `[vocab]` of the next one."""
    pos = torch.tensor([state.next_position], dtype=torch.long)
    logits = adapter.forward(lm.model, torch.tensor([token], dtype=torch.long), pos, state.cache,
                             state.positions, last_only=True)[-1]
    state.positions = torch.cat([state.positions, pos])
    state.next_position += 1
    return logits


def score(lm, state: DecodeState, first_logits: torch.Tensor, continuation: list[int]) -> torch.Tensor:
    """Log-probabilities `[len(continuation), vocab]` along a forced continuation, in one forward.

    Row i predicts `continuation[i]`: row 0 is `first_logits` (the prefill's), the others come from
    one forward of `continuation[:-1]` at the next positions over the cache (teacher forcing). The
    cache grows by those tokens; `rewind` takes them back off.
    """
    rows = [first_logits[None]]
    if len(continuation) > 1:
        n = len(continuation) - 1
        pos = torch.arange(state.next_position, state.next_position + n)
        rows.append(adapter.forward(lm.model, torch.tensor(continuation[:-1], dtype=torch.long), pos,
                                    state.cache, state.positions))
        state.positions = torch.cat([state.positions, pos])
        state.next_position += n
    return torch.log_softmax(torch.cat(rows).float(), dim=-1)


def rewind(state: DecodeState, keep: int, next_position: int) -> None:
    """Keep the first `keep` cached states of every layer (and positions); continue at `next_position`."""
    assert 0 <= keep <= state.positions.numel(), f"cannot keep {keep} of {state.positions.numel()} states"
    adapter.truncate(state.cache, keep)
    state.positions = state.positions[:keep]
    state.next_position = next_position


def sample(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None) -> int:
    """Greedy when temperature is 0, else temperature + top-p sampling."""
    if cfg.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / cfg.temperature, dim=-1)
    if cfg.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        drop = sorted_p.cumsum(-1) - sorted_p >= cfg.top_p
        sorted_p[drop] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def decode(lm, state: DecodeState, first_logits: torch.Tensor, cfg: GenerationConfig) -> Iterator[int]:
    """Yield generated token ids until EOS, max_new_tokens (stop strings are the caller's: text level)."""
    eos = set(lm.tokenizer.eos_ids if cfg.eos_ids is None else cfg.eos_ids)
    generator = None
    if cfg.temperature > 0 and cfg.seed is not None:
        generator = torch.Generator().manual_seed(cfg.seed)
    logits = first_logits
    while len(state.generated) < cfg.max_new_tokens:
        token = sample(logits, cfg, generator)
        if token in eos:
            return
        state.generated.append(token)
        yield token
        if len(state.generated) < cfg.max_new_tokens:
            logits = decode_step(lm, state, token)


def stop_overlap(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is a proper beginning of some stop string."""
    return max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)


def first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Index in `text` where the first stop string begins, or None."""
    cuts = [text.find(s) for s in stops if s and s in text]
    return min(cuts) if cuts else None
