"""Greedy-exact speculative decoding: a drafter proposes k tokens, the model verifies them in one forward.

The verification forward feeds the last emitted token plus the k drafted ones at explicit positions
(`next_position`, +1, ...), never at the cache length (assembled caches have gaps). Row i of its
logits is the model's greedy choice after draft[:i]; the longest prefix of the draft that agrees is
accepted, plus the model's own next token, and the states of the rejected tail are sliced off the
cache (and the positions list). Every emitted token is therefore the model's argmax given the
emitted tokens before it: the output equals plain greedy decoding (`generation.decode`) token for
token, up to floating-point differences between a k+1-token forward and k+1 one-token forwards.

Drafters:
- `LookupDrafter` (prompt lookup): the tokens that followed the most recent earlier occurrence of
  the sequence's last n-gram, searched in the prompt's own ids (cached modules included) and in
  what was generated so far;
- `ModelDrafter`: a smaller model with the same tokenizer, its module states cached by its own
  `PromptCache` over the same schema, decoding greedily k tokens ahead.

Sampling (temperature > 0) is refused: only the greedy acceptance rule is implemented here.

Example:
    >>> cfg = SpeculativeConfig(k=4)                          # prompt lookup, 4 tokens a forward
    >>> pc = PromptCache(lm, speculative=cfg)                  # doctest: +SKIP
    >>> pc.answer(prompt_xml).speculative      # drafter, k, proposed, accepted, forwards  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

import torch

from attention_store import adapter
from prompt_cache import assembler, generation
from prompt_cache.generation import DecodeState, GenerationConfig

log = logging.getLogger(__name__)

DRAFTERS = ("lookup", "model")


@dataclass(frozen=True)
class SpeculativeConfig:
    k: int = 4  # tokens drafted per verification forward
    drafter: str = "lookup"  # "lookup" (n-gram match in the prompt and output) or "model"
    max_ngram: int = 3  # lookup: the longest suffix n-gram matched (shorter ones are tried after)
    draft: object | None = None  # model: the draft's PromptCache (same tokenizer, same schemas added)

    def __post_init__(self):
        if not 1 <= self.k <= 64:
            raise ValueError(f"speculative k must be in 1..64, got {self.k}")
        if self.drafter not in DRAFTERS:
            raise ValueError(f"unknown drafter {self.drafter!r}: choose one of {', '.join(DRAFTERS)}")
        if self.max_ngram < 1:
            raise ValueError(f"max_ngram must be >= 1, got {self.max_ngram}")
        if (self.drafter == "model") != (self.draft is not None):
            raise ValueError("the model drafter needs `draft` (a PromptCache), and only it takes one")


@dataclass
class SpeculativeStats:
    drafter: str
    k: int
    proposed: int = 0  # drafted tokens sent to verification
    accepted: int = 0  # of those, tokens the model agreed with
    forwards: int = 0  # model forwards during decoding (verifications, and plain steps with no draft)
    draft_forwards: int = 0  # forwards of the draft model (0 for lookup)

    def to_json(self) -> dict:
        return {"drafter": self.drafter, "k": self.k, "proposed": self.proposed, "accepted": self.accepted,
                "forwards": self.forwards, "draft_forwards": self.draft_forwards,
                "acceptance_rate": self.accepted / self.proposed if self.proposed else 0.0}


class Drafter(Protocol):
    def propose(self, sequence: Sequence[int], k: int) -> list[int]:
        """Up to `k` tokens likely to follow `sequence` (the generated tokens so far; may be fewer or none)."""


class LookupDrafter:
    """Prompt lookup: continue the latest earlier occurrence of the last n tokens (n = max_ngram..1)."""

    def __init__(self, prompt_ids: Sequence[int], max_ngram: int = 3):
        self.prompt = list(prompt_ids)
        self.max_ngram = max_ngram

    def propose(self, sequence: Sequence[int], k: int) -> list[int]:
        hay = self.prompt + list(sequence)
        for n in range(min(self.max_ngram, len(hay) - 1), 0, -1):
            tail = hay[-n:]
            # Latest match first: recent text is the likeliest to be continued the same way.
            for start in range(len(hay) - n - 1, -1, -1):
                if hay[start:start + n] == tail:
                    return hay[start + n:start + n + k]
        return []


class ModelDrafter:
    """Greedy drafts from a small model over its own cached prompt; its cache follows the output."""

    def __init__(self, lm, state: DecodeState, first_logits: torch.Tensor, stats: SpeculativeStats):
        self.lm, self.state, self.stats = lm, state, stats
        self.prompt_len = state.positions.numel()  # states of the prompt (never rolled back)
        self.prompt_next = state.next_position
        self.fed: list[int] = []  # generated tokens whose states are in the draft cache, in order
        self.logits = first_logits  # the draft's logits after `fed`

    def propose(self, sequence: Sequence[int], k: int) -> list[int]:
        common = _common_prefix(self.fed, sequence)
        if common < len(self.fed):  # drop states of drafts the model rejected
            generation.rewind(self.state, self.prompt_len + common, self.prompt_next + common)
            self.fed = self.fed[:common]
        todo = list(sequence[common:])
        # The sequence grows by at least one token per verification, so after a rollback something is
        # always left to feed (else `self.logits` would be stale).
        assert todo or common == len(self.fed), "draft cache ahead of the sequence"
        if todo:  # the tokens the draft has not seen yet, in one forward
            pos = torch.arange(self.state.next_position, self.state.next_position + len(todo))
            self.logits = adapter.forward(self.lm.model, torch.tensor(todo), pos, self.state.cache,
                                          self.state.positions, last_only=True)[-1]
            self.state.positions = torch.cat([self.state.positions, pos])
            self.state.next_position += len(todo)
            self.fed += todo
            self.stats.draft_forwards += 1
        draft: list[int] = []
        logits = self.logits
        while True:
            draft.append(int(logits.argmax()))
            if len(draft) == k:
                return draft  # the last draft is not fed: verification may reject it anyway
            logits = generation.decode_step(self.lm, self.state, draft[-1])
            self.fed.append(draft[-1])
            self.stats.draft_forwards += 1


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def verify(lm, state: DecodeState, token: int, draft: list[int]) -> tuple[list[int], int]:
    """Feed `token` + `draft` in one forward; (accepted draft prefix, the model's next token).

    Afterwards the cache holds `token` and the accepted drafts, and `state.next_position` is the
    position of the returned next token.
    """
    start, keep = state.next_position, state.positions.numel()
    ids = torch.tensor([token, *draft], dtype=torch.long)
    pos = torch.arange(start, start + ids.numel())  # explicit, never the cache length
    logits = adapter.forward(lm.model, ids, pos, state.cache, state.positions)  # (1 + len(draft), vocab)
    choice = logits.argmax(dim=-1).tolist()
    n = _common_prefix(draft, choice)
    state.positions = torch.cat([state.positions, pos])
    generation.rewind(state, keep + 1 + n, start + 1 + n)
    return draft[:n], choice[n]


def decode(lm, state: DecodeState, first_logits: torch.Tensor, cfg: GenerationConfig, drafter: Drafter,
           k: int, stats: SpeculativeStats) -> Iterator[int]:
    """Yield what `generation.decode` yields under greedy decoding, verifying up to `k` drafts a forward."""
    if cfg.temperature != 0:
        raise ValueError("speculative decoding here is greedy-exact only: use temperature 0, or turn "
                         "speculative decoding off to sample")
    eos = set(lm.tokenizer.eos_ids if cfg.eos_ids is None else cfg.eos_ids)
    token = int(first_logits.argmax())
    while True:
        if token in eos or len(state.generated) >= cfg.max_new_tokens:
            return
        state.generated.append(token)
        yield token
        room = cfg.max_new_tokens - len(state.generated)
        if room == 0:
            return  # plain decoding does not feed its last token either
        # A verification yields at most len(draft) + 1 tokens: draft no more than can be used.
        draft = drafter.propose(state.generated, min(k, room - 1)) if room > 1 else []
        accepted, token = verify(lm, state, token, draft)
        stats.forwards += 1
        stats.proposed += len(draft)
        stats.accepted += len(accepted)
        for t in accepted:
            if t in eos:
                return
            state.generated.append(t)
            yield t


def start(spec: SpeculativeConfig, pc, s, bound, use_cache: bool, state: DecodeState, logits: torch.Tensor,
          cfg: GenerationConfig) -> tuple[Iterator[int], SpeculativeStats]:
    """The decode stream for one answer of `pc` (the engine's hook), and the stats it fills in."""
    if cfg.temperature != 0:  # eagerly, before any draft model work
        raise ValueError("speculative decoding here is greedy-exact only: use temperature 0, or turn "
                         "speculative decoding off to sample")
    stats = SpeculativeStats(spec.drafter, spec.k)
    if spec.drafter == "lookup":
        # The baseline's id sequence is exactly the token ids of every cached module and fresh
        # token, in prompt order (the ids the stored entries were encoded from).
        drafter: Drafter = LookupDrafter(assembler.baseline_tokens(s.layout, bound), spec.max_ngram)
    else:
        drafter = _model_drafter(spec.draft, pc, s, bound, use_cache, stats)
    return decode(pc.lm, state, logits, cfg, drafter, spec.k, stats), stats


def _model_drafter(draft, pc, s, bound, use_cache: bool, stats: SpeculativeStats) -> ModelDrafter:
    if draft.lm.tokenizer.fingerprint != pc.lm.tokenizer.fingerprint:
        raise ValueError(f"draft model {draft.lm.name!r} does not share the tokenizer of {pc.lm.name!r}")
    name = s.layout.schema_name
    if name not in draft.schemas:
        raise ValueError(f"the draft PromptCache has no schema {name!r}: add the same PML schema to it")
    ds = draft.schemas[name]
    ready = draft.assemble(ds, bound) if use_cache else draft.baseline(ds, bound)
    logits, state = generation.prefill(draft.lm, ready.cache, ready.cache_positions, ready.fresh_ids,
                                       ready.fresh_positions, ready.next_position)
    stats.draft_forwards += 1
    return ModelDrafter(draft.lm, state, logits, stats)
