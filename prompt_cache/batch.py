"""Batched answering: several prompts over one schema, one forward per step for all of them.

A packed batch, not a padded one. The cache holds the union of the states the prompts reuse, each
stored unit's states once, at their reserved positions; nothing is copied per prompt. The fresh
tokens of every prompt run in one forward as one packed sequence, each prompt's rows seeing
exactly the cached states its own assembly would hold plus its own fresh tokens causally (an
`allowed` mask, as everywhere in this project). Then every step feeds one token per unfinished
prompt in one forward, each attending to its own cached states, fresh tokens and generated
tokens, at its own explicit next position. The LM head runs only at the rows whose logits are
needed (the last fresh token of each prompt, then every fed token).

What a prompt sees is what `PromptCache.answer` gives it, so greedy outputs are the same (the
tests compare token ids and logits); floating-point sums over a longer, masked key list can
differ in the last bits. Where packing would change what a prompt sees, `answer_batch` answers
those prompts one by one and logs why: recovery policies (`blend`, `link`: their recompute is per
prompt), speculative decoding, a semantic cache.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from attention_store import adapter, encoder
from prompt_cache import assembler, generation
from prompt_cache.generation import GenerationConfig
from prompt_cache.results import Result, Timing, Usage

log = logging.getLogger(__name__)


@dataclass
class _Row:
    """One prompt of the batch."""

    keep: torch.Tensor  # bool [union cached tokens]: the cached states this prompt's assembly holds
    fresh_ids: list[int]
    fresh_positions: list[int]
    next_position: int
    tokens: list[int]
    done: bool = False
    generator: torch.Generator | None = None
    t_done: float = 0.0


def unbatchable(pc) -> str | None:
    """Why `pc` cannot pack prompts together (None: it can)."""
    if pc.policy.needs_assembly:
        return f"policy {pc.policy.spec} recomputes per prompt"
    if pc.speculative is not None:
        return "speculative decoding verifies drafts per prompt"
    if pc.semantic_cache is not None:
        return "a semantic cache answers prompts one by one"
    return None


def answer_packed(pc, schema_state, bounds: list, config: GenerationConfig,
                  on_token: Callable[[int, int], None] | None = None) -> list:
    """Answer bound prompts of one schema together; `Result`s in order (see the module docstring).
    `on_token(i, token)` sees each token of prompt i as it is generated (for streaming)."""
    s, clock, lm = schema_state, pc.clock, pc.lm
    t0 = clock.now()
    # The union of the units the prompts reuse, each looked up (or encoded) once.
    units = list(dict.fromkeys(u for b in bounds for u in assembler.used_units(s.plan, b)))
    entries, missing = encoder.lookup(s.plan, lm, pc.store, pc.storage_dtype, units)
    encode_ms = 0.0
    if missing:
        t = clock.now()
        entries.update(pc.encode_missing(s, missing))
        encode_ms = clock.ms_since(t)
    # Per unit, the states any prompt keeps; per prompt, which of those it sees.
    kept = {u: torch.stack([assembler.kept_tokens(s.layout, u, entries[u], b) if u in assembler.used_units(s.plan, b)
                            else torch.zeros(entries[u].positions.numel(), dtype=torch.bool) for b in bounds])
            for u in units}  # [prompts, entry tokens]
    runs = [(u, lo, hi) for u in units for lo, hi in assembler.runs(kept[u].any(0))]
    pieces = [(entries[u], lo, hi) for u, lo, hi in runs]
    keep = (torch.cat([kept[u][:, lo:hi] for u, lo, hi in runs], dim=1) if runs
            else torch.zeros(len(bounds), 0, dtype=torch.bool))
    rows = []
    for i, b in enumerate(bounds):
        ids, pos = assembler.fresh_tokens(s.layout, b)
        rows.append(_Row(keep[i], ids, pos, s.layout.length + len(b.suffix_ids), []))
    fresh_total = sum(len(r.fresh_ids) for r in rows)
    room = fresh_total + len(rows) * config.max_new_tokens
    dtype = pc._model_dtype()
    cache, cache_positions = assembler.buffered(pieces, room, dtype, pc.layer_devices)
    n_cached = cache_positions.numel()
    t1 = clock.now()
    # Prefill: every prompt's fresh tokens, packed.
    owner = torch.cat([torch.full((len(r.fresh_ids),), i) for i, r in enumerate(rows)])
    ids = torch.tensor([t for r in rows for t in r.fresh_ids], dtype=torch.long)
    pos = torch.tensor([p for r in rows for p in r.fresh_positions], dtype=torch.long)
    own = owner[:, None] == owner[None, :]
    allowed = torch.cat([torch.stack([rows[i].keep for i in owner.tolist()]),
                         own & torch.ones(len(ids), len(ids), dtype=torch.bool).tril()], dim=1)
    last = torch.tensor([int((owner == i).nonzero().max()) for i in range(len(rows))])
    logits = adapter.forward(lm.model, ids, pos, cache, cache_positions, allowed=allowed, logits_at=last)
    t2 = clock.now()
    key_pos, key_owner = torch.cat([cache_positions, pos]), torch.cat([torch.full((n_cached,), -1), owner])
    # Decode, all live prompts in one forward per step.
    eos = set(lm.tokenizer.eos_ids if config.eos_ids is None else config.eos_ids)
    for r in rows:
        if config.temperature > 0 and config.seed is not None:
            r.generator = torch.Generator().manual_seed(config.seed)  # as `generation.decode` seeds each answer
    live = list(range(len(rows)))
    t_first = None
    while live:
        fed = []
        for j, i in enumerate(live):
            r = rows[i]
            if len(r.tokens) >= config.max_new_tokens:
                r.done = True
                continue
            token = generation.sample(logits[j], config, r.generator)
            if token in eos:
                r.done = True
                continue
            r.tokens.append(token)
            if on_token is not None:
                on_token(i, token)
            text = lm.tokenizer.decode(r.tokens)
            if generation.first_stop(text, config.stop) is not None or len(r.tokens) >= config.max_new_tokens:
                r.done = True  # nothing more is needed from this prompt
            else:
                fed.append(i)
        if t_first is None:
            t_first = clock.now()
        now = clock.now()
        for i in live:
            if rows[i].done and not rows[i].t_done:
                rows[i].t_done = now
        live = fed
        if not live:
            break
        step_ids = torch.tensor([rows[i].tokens[-1] for i in live], dtype=torch.long)
        step_pos = torch.tensor([rows[i].next_position for i in live], dtype=torch.long)
        step_owner = torch.tensor(live)
        seen = torch.stack([torch.cat([rows[i].keep, key_owner[n_cached:] == i]) for i in live])
        allowed = torch.cat([seen, torch.eye(len(live), dtype=torch.bool)], dim=1)
        logits = adapter.forward(lm.model, step_ids, step_pos, cache, key_pos, allowed=allowed)
        key_pos, key_owner = torch.cat([key_pos, step_pos]), torch.cat([key_owner, step_owner])
        for i in live:
            rows[i].next_position += 1
    results = []
    for r, b in zip(rows, bounds):
        tokens, text, reason, _ = pc._decode(None, None, config, None, stream=iter(r.tokens))
        decode_s = (r.t_done or t_first) - t_first
        timing = Timing(ttft_ms=(t_first - t0) * 1e3, cache_ms=(t1 - t0) * 1e3, prefill_ms=(t2 - t1) * 1e3,
                        decode_tokens_per_s=(len(tokens) - 1) / decode_s if len(tokens) > 1 and decode_s > 0 else 0.0,
                        encode_ms=encode_ms)
        cached = int(r.keep.sum())
        usage = Usage(prompt_tokens=cached + len(r.fresh_ids), cached_tokens=cached, completion_tokens=len(tokens))
        results.append(Result(text, tuple(tokens), usage, timing, reason))
    return results
