"""PromptCache: answer PML prompts from cached module states, or by full prefill as the baseline.

Example:
    >>> from prompt_cache.engine import PromptCache
    >>> pc = PromptCache.load("smollm2-135m")                      # doctest: +SKIP
    >>> pc.add_schema(parse_file("examples/travel.pml"))          # doctest: +SKIP
    >>> r = pc.answer(open("examples/travel_prompt.pml").read())   # doctest: +SKIP
    >>> r.text, r.usage.cached_tokens, r.timing.ttft_ms            # doctest: +SKIP

The phases (bind, lookup, encode_missing, assemble, recover, prefill, decode) are separate calls; `answer`
runs them once each, in that order, and times around them with `prompt_cache.timing.Clock`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from attention_store import adapter, encoder
from attention_store.direct import DamagedEntry
from attention_store.dtypes import DEFAULT_STORAGE_DTYPE
from attention_store.dtypes import storage_dtype as parse_storage_dtype
from attention_store.entry import KVEntry
from attention_store.policies import DEFAULT_POLICY, EncodingPolicy, get_policy
from attention_store.store import AttentionStore, open_store
from attention_store.tiers import DEFAULT_MEMORY_BUDGET, MemoryTier
from pml.errors import PMLError
from pml.layout import Layout, compute_layout
from pml.model import Prompt, Schema
from pml.parser import parse_prompt, parse_schema
from pml.prompt import BoundPrompt, bind_prompt
from prompt_cache import DEFAULT_MODEL, assembler, generation, limits, recovery
from prompt_cache import batch
from prompt_cache import speculative as _speculative
from prompt_cache.results import Result, Timing, Usage  # noqa: F401 (part of this module's API)
from prompt_cache.generation import GenerationConfig
from prompt_cache.loaded import LoadedModel
from prompt_cache.models import layer_devices
from prompt_cache.semantic import engine_hook as _l1
from prompt_cache.timing import Clock

log = logging.getLogger(__name__)

@dataclass
class SchemaState:
    """A schema added to a PromptCache: parsed, laid out for the tokenizer, planned for the policy."""

    schema: Schema
    layout: Layout
    plan: encoder.EncodePlan


@dataclass(frozen=True)
class EncodeReport:
    modules: int  # entries (module own-text units, root text included) in the schema
    tokens: int  # tokens stored
    bytes: int  # bytes stored (keys + values)
    encoded: int  # entries computed now (the others were already in the store)

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.tokens if self.tokens else 0.0


class PromptCache:
    """A model, its attention store and the schemas added to it.

    Inputs are PML text or parsed objects (`pml.parser.parse_file` reads a file, resolving `src=`
    paths against its folder); this class never opens a file. `semantic_cache` (a
    `prompt_cache.semantic.SemanticCache`) is consulted before any model work; `speculative` (a
    `prompt_cache.speculative.SpeculativeConfig`) decodes with a drafter, greedy-exact.
    """

    def __init__(self, lm: LoadedModel, store: AttentionStore | None = None,
                 policy: str | EncodingPolicy = DEFAULT_POLICY, storage_dtype: str = DEFAULT_STORAGE_DTYPE,
                 semantic_cache=None, speculative: _speculative.SpeculativeConfig | None = None):
        self.lm = lm
        self.store = store if store is not None else AttentionStore(MemoryTier(DEFAULT_MEMORY_BUDGET), None)
        self.policy = get_policy(policy)
        self.storage_dtype = parse_storage_dtype(storage_dtype)
        self.schemas: dict[str, SchemaState] = {}
        # Where each layer attends (several devices under a device map); assembly puts layer i's K/V there.
        self.layer_devices = layer_devices(lm.model)
        self.clock = Clock(lm.model.device)
        self.semantic_cache = semantic_cache  # consulted first by `answer`
        self.speculative = speculative  # decode with a drafter (prompt_cache/speculative.py)

    @classmethod
    def load(cls, model: str = DEFAULT_MODEL, store_dir: str | Path | None = None, **kwargs) -> "PromptCache":
        """Load a model by registry name or directory, with a disk-backed store (default folder if None)."""
        from prompt_cache.models import load_model

        lm = load_model(model)
        return cls(lm, open_store(store_dir, lm), **kwargs)

    # -- schemas -------------------------------------------------------------------------------
    def add_schema(self, source: str | bytes | Schema) -> Layout:
        """Lay out and plan a schema (PML text or a parsed `Schema`); returns its Layout."""
        schema = source if isinstance(source, Schema) else _parse_text(source, parse_schema)
        layout = compute_layout(schema, self.lm.tokenizer)
        limits.check_schema(layout, self.lm)  # before planning or any model work
        self.schemas[schema.name] = SchemaState(schema, layout, encoder.plan(layout, self.policy))
        return layout

    def remove_schema(self, name: str) -> bool:
        """Forget schema `name` (its stored states stay in the store); True if it was added."""
        return self.schemas.pop(name, None) is not None

    def encode(self, schema: str, progress: encoder.Progress | None = None) -> EncodeReport:
        """Precompute every cacheable module of `schema` into the store (skipping stored ones)."""
        s = self._schema(schema)
        found, missing = encoder.lookup(s.plan, self.lm, self.store, self.storage_dtype)
        found.update(encoder.encode_missing(s.plan, self.lm, self.store, self.storage_dtype, missing, progress))
        return EncodeReport(
            modules=len(found), tokens=sum(e.meta.tokens for e in found.values()),
            bytes=sum(e.meta.nbytes for e in found.values()), encoded=len(missing))

    def pin(self, schema: str) -> None:
        """Mark `schema` as hot: its entries stay in the memory tier whatever the LRU order."""
        s = self._schema(schema)
        self.store.pin_keys([encoder.unit_key(s.plan, u, self.lm, self.storage_dtype) for u in s.plan.units], holder=schema)

    def unpin(self, schema: str) -> None:
        self.store.unpin_keys(holder=schema)

    # -- phases, in pipeline order -------------------------------------------------------------
    def bind(self, prompt: str | bytes | Prompt) -> tuple[SchemaState, BoundPrompt]:
        """Check a prompt (PML text or a parsed `Prompt`) against its schema: (schema state, BoundPrompt)."""
        p = prompt if isinstance(prompt, Prompt) else _parse_text(prompt, parse_prompt)
        if p.schema not in self.schemas:
            known = ", ".join(sorted(self.schemas)) or "none"
            raise PMLError(f"prompt uses schema {p.schema!r}, which was not added (added: {known})",
                           file=getattr(p, "file", None), line=getattr(p, "line", None), element="prompt")
        s = self.schemas[p.schema]
        bound = bind_prompt(p, s.layout, self.lm.tokenizer)
        limits.check_prompt(s.layout, bound, self.lm)
        if not bound.suffix_ids:
            # Generation needs the logits of a last token, which only a fresh forward produces.
            raise PMLError("the prompt adds no new text: add the question or instruction as text or a "
                           "<user> turn after the module references", file=getattr(p, "file", None),
                           line=getattr(p, "line", None), element="prompt")
        return s, bound

    def lookup(self, s: SchemaState, bound: BoundPrompt) -> tuple[dict[str, KVEntry], list[str]]:
        """Stored entries of the units this prompt reuses, and the units missing from the store.
        Disk hits a store does not promote come back opened, not read (`attention_store.direct`):
        `assemble` reads them straight into the cache."""
        return encoder.lookup(s.plan, self.lm, self.store, self.storage_dtype, assembler.used_units(s.plan, bound),
                              defer=True)

    def encode_missing(self, s: SchemaState, missing: list[str]) -> dict[str, KVEntry]:
        """Encode units missing from the store (and store them)."""
        return encoder.encode_missing(s.plan, self.lm, self.store, self.storage_dtype, missing)

    def assemble(self, s: SchemaState, bound: BoundPrompt, entries: dict[str, KVEntry] | None = None,
                 room: int | None = None) -> assembler.Assembled:
        """Copy the prompt's stored states into one cache (looking them up, and encoding what is
        missing, unless `entries` are given)."""
        if entries is None:
            entries, missing = self.lookup(s, bound)
            entries.update(self.encode_missing(s, missing))
        for _ in range(len(entries) + 1):
            try:
                return assembler.assemble(s.layout, s.plan, bound, entries, self._model_dtype(), self.layer_devices, room)
            except DamagedEntry as e:  # found while reading it into the cache; the file is set aside
                log.warning("%s", e)
                entries, missing = self.lookup(s, bound)
                entries.update(self.encode_missing(s, missing))
        raise RuntimeError("assembly kept finding damaged entries, although each one found is set aside")

    def baseline(self, s: SchemaState, bound: BoundPrompt, room: int | None = None) -> assembler.Assembled:
        """The same prompt as one ordinary prefill: contiguous positions from 0, empty cache (with
        `room` for generated tokens preallocated, as `assemble` does)."""
        ids = assembler.baseline_tokens(s.layout, bound)
        return assembler.Assembled(adapter.new_cache(reserve=room), torch.zeros(0, dtype=torch.long),
                                   torch.tensor(ids, dtype=torch.long), torch.arange(len(ids)), len(ids))

    def recover(self, ready: assembler.Assembled) -> assembler.Assembled:
        """A recovery policy's recompute of some cached tokens (`blend:R`, `link:K`); others: `ready`."""
        return recovery.recompute(self.lm, ready, self.policy) if self.policy.needs_assembly else ready

    def prefill(self, ready: assembler.Assembled) -> tuple[torch.Tensor, generation.DecodeState]:
        """Compute the fresh tokens over the assembled cache: last-token logits and the decode state."""
        return generation.prefill(self.lm, ready.cache, ready.cache_positions, ready.fresh_ids,
                                  ready.fresh_positions, ready.next_position)

    # -- answering -----------------------------------------------------------------------------
    def answer(self, prompt: str | bytes | Prompt, use_cache: bool = True,
               config: GenerationConfig = GenerationConfig(),
               on_text: Callable[[str], None] | None = None) -> Result:
        """Generate for one prompt, in one pass: bind, look up, encode what is missing, assemble,
        prefill, decode. `on_text` receives text pieces as they are decoded (streaming)."""
        return self._answer(prompt, use_cache, config, on_text)[0]

    def answer_scored(self, prompt: str | bytes | Prompt, continuation: list[int] | None = None,
                      use_cache: bool = True, config: GenerationConfig = GenerationConfig(),
                      limit: int | None = None) -> tuple[Result, torch.Tensor | None]:
        """`answer`, and `logprobs` along `continuation` (None: the answer's own tokens; at most
        `limit` tokens), from one assembly, recovery and prefill.

        The scoring runs after decoding (outside the answer's timing), over the prompt's cache
        rewound to its prefill length. Returns (result, log-probabilities or None when nothing is
        scored). The semantic cache is not consulted: scores need the model.
        """
        return self._answer(prompt, use_cache, config, None, continuation, limit, scored=True)

    def _answer(self, prompt, use_cache: bool, config: GenerationConfig, on_text,
                continuation: list[int] | None = None, limit: int | None = None, scored: bool = False):
        s, bound = self.bind(prompt)
        limits.check_generation(s.layout, bound, config.max_new_tokens, self.lm)
        l1 = None
        if self.semantic_cache is not None and not scored:
            l1 = _l1.request(self, prompt, s, bound, use_cache, config)
        if l1 is not None and (hit := l1.lookup(on_text)) is not None:  # answered without the model
            return hit, None
        clock = self.clock
        encode_ms = 0.0
        t0 = clock.now()
        if use_cache:
            entries, missing = self.lookup(s, bound)
            if missing:
                t = clock.now()
                entries.update(self.encode_missing(s, missing))
                encode_ms = clock.ms_since(t)
            ready = self.assemble(s, bound, entries, room=config.max_new_tokens)
            t = clock.now()
            ready = self.recover(ready)
            recompute_ms = clock.ms_since(t) if self.policy.needs_assembly else 0.0
        else:
            ready, recompute_ms = self.baseline(s, bound, room=config.max_new_tokens), 0.0
        t1 = clock.now()
        logits, state = self.prefill(ready)
        t2 = clock.now()
        prompt_len, prompt_next = state.positions.numel(), state.next_position
        stream, spec = (_speculative.start(self.speculative, self, s, bound, use_cache, state, logits, config)
                        if self.speculative is not None else (None, None))
        tokens, text, reason, t_first = self._decode(state, logits, config, on_text, stream)
        t_end = clock.now()
        decode_s = t_end - t_first
        timing = Timing(
            ttft_ms=(t_first - t0) * 1e3, cache_ms=(t1 - t0) * 1e3, prefill_ms=(t2 - t1) * 1e3,
            decode_tokens_per_s=(len(tokens) - 1) / decode_s if len(tokens) > 1 and decode_s > 0 else 0.0,
            encode_ms=encode_ms, recompute_ms=recompute_ms)
        recomputed = 0 if ready.recomputed is None else ready.recomputed.numel()
        usage = Usage(prompt_tokens=ready.cached_tokens + ready.fresh_ids.numel(),
                      cached_tokens=ready.cached_tokens - recomputed, completion_tokens=len(tokens),
                      recomputed_tokens=recomputed)
        result = Result(text, tuple(tokens), usage, timing, reason,
                        speculative=spec.to_json() if spec is not None else None)
        lp = None
        forced = list(tokens if continuation is None else continuation)[:limit]
        if scored and forced:
            generation.rewind(state, prompt_len, prompt_next)
            lp = generation.score(self.lm, state, logits, forced)
        return (l1.remember(result) if l1 is not None else result), lp  # the semantic cache keeps the answer

    def answer_batch(self, prompts: Iterable[str | bytes | Prompt], use_cache: bool = True,
                     config: GenerationConfig = GenerationConfig(),
                     on_token: Callable[[int, int], None] | None = None) -> list[Result]:
        """Answer prompts of one or more added schemas: prompts of one schema together, in one packed
        batch (`prompt_cache.batch`: one forward per step for all of them, module states shared,
        not copied per prompt); results in the prompts' order.

        In a batch, `timing.ttft_ms` is the time until every prompt of the batch has its first token
        (one prefill for all) and `decode_tokens_per_s` each prompt's own rate over the shared steps.
        `on_token(i, token)` sees each token of prompt i as it is generated (streaming).
        Answered one by one instead, with the reason logged: the full-prefill baseline
        (`use_cache=False`), and engines whose answers are per prompt (`batch.unbatchable`).
        """
        prompts = list(prompts)
        why = "the full-prefill baseline is per prompt" if not use_cache else batch.unbatchable(self)
        if why is not None:
            if len(prompts) > 1:
                log.info("answer_batch: answering %d prompts one by one: %s", len(prompts), why)
            results = []
            for i, p in enumerate(prompts):
                results.append(self.answer(p, use_cache, config))
                for token in results[-1].token_ids if on_token is not None else ():
                    on_token(i, token)  # one by one, each answer's tokens arrive when it is done
            return results
        bound = [self.bind(p) for p in prompts]
        for s, b in bound:
            limits.check_generation(s.layout, b, config.max_new_tokens, self.lm)
        results: list[Result | None] = [None] * len(prompts)
        for name in dict.fromkeys(s.layout.schema_name for s, _ in bound):
            idx = [i for i, (s, _) in enumerate(bound) if s.layout.schema_name == name]
            tell = None if on_token is None else (lambda j, token, idx=idx: on_token(idx[j], token))
            got = batch.answer_packed(self, bound[idx[0]][0], [bound[i][1] for i in idx], config, tell)
            for i, r in zip(idx, got):
                results[i] = r
        return results

    def logprobs(self, prompt: str | bytes | Prompt, continuation: list[int], use_cache: bool = True) -> torch.Tensor:
        """Log-probabilities `[len(continuation), vocab]` of the next token along a forced continuation.

        Row i is the distribution that predicts `continuation[i]`. Used for fidelity measures (KL
        between cached and baseline distributions along the baseline's own answer).
        """
        s, bound = self.bind(prompt)
        logits, state = self.prefill(self.recover(self.assemble(s, bound)) if use_cache else self.baseline(s, bound))
        return generation.score(self.lm, state, logits, list(continuation))

    # -- helpers -------------------------------------------------------------------------------
    def _decode(self, state, logits, config, on_text, stream=None):
        tok = self.lm.tokenizer
        tokens: list[int] = []
        text, sent, reason, t_first = "", "", "length", None
        for token in stream if stream is not None else generation.decode(self.lm, state, logits, config):
            if t_first is None:
                t_first = self.clock.now()
            tokens.append(token)
            new_text = tok.decode(tokens)
            cut = generation.first_stop(new_text, config.stop)
            if cut is not None:
                new_text, reason = new_text[:cut], "stop"
            if on_text is not None:
                # Hold back a tail that could still grow into a stop string, so streamed text never
                # includes what the stop string will cut.
                ready = new_text if reason == "stop" else new_text[:len(new_text) - generation.stop_overlap(new_text, config.stop)]
                if ready.startswith(sent) and len(ready) > len(sent):
                    on_text(ready[len(sent):])
                    sent = ready
            text = new_text
            if reason == "stop":
                break
        else:
            if len(tokens) < config.max_new_tokens:
                reason = "eos"
        if on_text is not None and text.startswith(sent) and len(text) > len(sent):
            on_text(text[len(sent):])  # the held-back tail, once no stop string followed
        if t_first is None:  # nothing generated: the first "token" was EOS or max_new_tokens == 0
            t_first = self.clock.now()
        return tokens, text, reason, t_first

    def _schema(self, name: str) -> SchemaState:
        if name not in self.schemas:
            raise PMLError(f"schema {name!r} was not added (added: {', '.join(sorted(self.schemas)) or 'none'})")
        return self.schemas[name]

    def _model_dtype(self) -> torch.dtype:
        return next(self.lm.model.parameters()).dtype


def _parse_text(source, parse):
    """PML text (str or bytes). Paths are not read here: a server must never open a file a client names."""
    if not isinstance(source, (str, bytes)):
        raise TypeError(f"expected PML text or a parsed object, got {type(source).__name__} "
                        "(read files with pml.parser.parse_file)")
    return parse(source)
