"""PromptCache: answer PML prompts from cached module states, or by full prefill as the baseline.

Example:
    >>> from prompt_cache.engine import PromptCache
    >>> pc = PromptCache.load("smollm2-135m")                      # doctest: +SKIP
    >>> pc.add_schema("examples/travel.pml")                       # doctest: +SKIP
    >>> r = pc.answer(open("examples/travel_prompt.pml").read())   # doctest: +SKIP
    >>> r.text, r.usage.cached_tokens, r.timing.ttft_ms            # doctest: +SKIP

The phases (assemble, prefill, decode) are separate library calls; `answer` times around them and
does no timing inside them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from attention_store import encoder
from attention_store.dtypes import DEFAULT_STORAGE_DTYPE, storage_dtype as parse_storage_dtype
from attention_store.store import AttentionStore, open_store
from attention_store.tiers import DEFAULT_MEMORY_BUDGET, MemoryTier
from prompt_cache import assembler, generation
from prompt_cache import speculative as _speculative  # hook: speculative decoding
from prompt_cache.semantic import engine_hook as _l1  # hook: semantic response cache (L1)
from prompt_cache.generation import GenerationConfig
from pml.errors import PMLError
from pml.layout import compute_layout
from pml.parser import parse_prompt, parse_schema
from pml.prompt import bind_prompt
from prompt_cache import DEFAULT_MODEL

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Usage:
    prompt_tokens: int  # tokens of the prompt as the model sees it
    cached_tokens: int  # of those, tokens whose states came from the store
    completion_tokens: int  # generated tokens


@dataclass(frozen=True)
class Timing:
    ttft_ms: float  # time to first token: cache_ms + prefill_ms + choosing the first token
    cache_ms: float  # store lookup and copy into one cache (plus encode_ms when modules were missing)
    prefill_ms: float  # forward pass over the fresh tokens
    decode_tokens_per_s: float  # generated tokens after the first, per second (0 if none)
    encode_ms: float = 0.0  # encoding modules missing from the store, on the fly (part of cache_ms)


@dataclass(frozen=True)
class Result:
    text: str
    token_ids: tuple[int, ...]
    usage: Usage
    timing: Timing
    finish_reason: str  # "eos", "stop" (a stop string) or "length"
    semantic_cache: str | None = None  # hook (L1): "hit", "miss", or None when no semantic cache is set
    speculative: dict | None = None  # hook: SpeculativeStats.to_json() when decoding was speculative

    def to_json(self) -> dict:
        return {"text": self.text, "usage": asdict(self.usage), "timing": asdict(self.timing),
                "finish_reason": self.finish_reason,
                "semantic_cache": self.semantic_cache, "speculative": self.speculative}  # hooks


@dataclass
class _Schema:
    schema: object
    layout: object
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
    """A model, its attention store and the schemas added to it."""

    def __init__(self, lm, store: AttentionStore | None = None, policy: str = encoder.DEFAULT_POLICY,
                 storage_dtype: str = DEFAULT_STORAGE_DTYPE, sink: bool = True,
                 semantic_cache=None, speculative: _speculative.SpeculativeConfig | None = None):
        if policy not in encoder.POLICIES:
            raise ValueError(f"unknown policy {policy!r}: choose one of {', '.join(encoder.POLICIES)}")
        self.lm = lm
        self.store = store if store is not None else AttentionStore(MemoryTier(DEFAULT_MEMORY_BUDGET), None)
        self.policy = policy
        self.sink = sink  # independent policy: modules also see the leading root text (see encoder.plan)
        self.storage_dtype = parse_storage_dtype(storage_dtype)
        self.schemas: dict[str, _Schema] = {}
        self.semantic_cache = semantic_cache  # hook: a semantic.SemanticCache consulted first by `answer`
        self.speculative = speculative  # hook: decode with a drafter (prompt_cache/speculative.py)

    @classmethod
    def load(cls, model: str = DEFAULT_MODEL, store_dir: str | Path | None = None, **kwargs) -> "PromptCache":
        """Load a model by registry name or directory, with a disk-backed store (default folder if None)."""
        from prompt_cache.models import load_model

        lm = load_model(model)
        return cls(lm, open_store(store_dir, lm), **kwargs)

    # -- schemas -------------------------------------------------------------------------------
    def add_schema(self, source: str | Path):
        """Parse (file path or XML text), lay out and plan a schema; returns its Layout."""
        schema = _parse(source, parse_schema)
        layout = compute_layout(schema, self.lm.tokenizer)
        self.schemas[schema.name] = _Schema(schema, layout, encoder.plan(layout, self.policy, self.sink))
        return layout

    def encode(self, schema: str, progress: Callable[[int, int], None] | None = None) -> EncodeReport:
        """Precompute every cacheable module of `schema` into the store (skipping stored ones)."""
        s = self._schema(schema)
        missing = self._missing(s, list(s.plan.units))
        entries = encoder.ensure_encoded(s.plan, self.lm, self.store, self.storage_dtype, progress=progress)
        return EncodeReport(
            modules=len(entries), tokens=sum(e.meta.tokens for e in entries.values()),
            bytes=sum(e.meta.nbytes for e in entries.values()), encoded=len(missing))

    def pin(self, schema: str) -> None:
        """Mark `schema` as hot: its entries stay in the memory tier whatever the LRU order."""
        self.store.pin(self._schema(schema).layout.schema_name)

    def unpin(self, schema: str) -> None:
        self.store.unpin(schema)

    # -- phases --------------------------------------------------------------------------------
    def bind(self, prompt: str | Path):
        """Parse a prompt and check it against its schema: (schema state, BoundPrompt)."""
        p = _parse(prompt, parse_prompt)
        if p.schema not in self.schemas:
            known = ", ".join(sorted(self.schemas)) or "none"
            raise PMLError(f"prompt uses schema {p.schema!r}, which was not added (added: {known})",
                           file=getattr(p, "file", None), line=getattr(p, "line", None), element="prompt")
        s = self.schemas[p.schema]
        bound = bind_prompt(p, s.layout, self.lm.tokenizer)
        if not bound.suffix_ids:
            # Generation needs the logits of a last token, which only a fresh forward produces.
            raise PMLError("the prompt adds no new text: add the question or instruction as text or a "
                           "<user> turn after the module references", file=getattr(p, "file", None),
                           line=getattr(p, "line", None), element="prompt")
        return s, bound

    def assemble(self, s: _Schema, bound) -> assembler.Assembled:
        """Store lookup (encoding what is missing) and copy into one cache."""
        units = assembler.used_units(s.plan, bound)
        entries = encoder.ensure_encoded(s.plan, self.lm, self.store, self.storage_dtype, units)
        return assembler.assemble(s.layout, s.plan, bound, entries, self._model_dtype(), self.lm.model.device)

    def baseline(self, s: _Schema, bound) -> assembler.Assembled:
        """The same prompt as one ordinary prefill: contiguous positions from 0, empty cache."""
        ids = assembler.baseline_tokens(s.layout, bound)
        return assembler.Assembled(encoder.adapter.new_cache(), torch.zeros(0, dtype=torch.long),
                                   torch.tensor(ids, dtype=torch.long), torch.arange(len(ids)), len(ids))

    # -- answering -----------------------------------------------------------------------------
    def answer(self, prompt: str | Path, use_cache: bool = True, config: GenerationConfig = GenerationConfig(),
               on_text: Callable[[str], None] | None = None) -> Result:
        """Generate for one prompt. `on_text` receives text pieces as they are decoded (streaming)."""
        s, bound = self.bind(prompt)
        l1 = _l1.request(self, prompt, s, bound, use_cache, config) if self.semantic_cache is not None else None  # hook
        if l1 is not None and (hit := l1.lookup(on_text)) is not None:  # hook: answered without the model
            return hit
        encode_ms = 0.0
        t0 = time.perf_counter()
        if use_cache:
            missing = self._missing(s, assembler.used_units(s.plan, bound))
            if missing:
                t = time.perf_counter()
                encoder.ensure_encoded(s.plan, self.lm, self.store, self.storage_dtype, missing)
                encode_ms = (time.perf_counter() - t) * 1e3
            ready = self.assemble(s, bound)
        else:
            ready = self.baseline(s, bound)
        t1 = time.perf_counter()
        logits, state = generation.prefill(self.lm, ready.cache, ready.cache_positions, ready.fresh_ids,
                                           ready.fresh_positions, ready.next_position)
        t2 = time.perf_counter()
        stream, spec = (_speculative.start(self.speculative, self, s, bound, use_cache, state, logits, config)
                        if self.speculative is not None else (None, None))  # hook: speculative decode loop
        tokens, text, reason, t_first = self._decode(state, logits, config, on_text, stream)
        t_end = time.perf_counter()
        decode_s = t_end - t_first
        timing = Timing(
            ttft_ms=(t_first - t0) * 1e3, cache_ms=(t1 - t0) * 1e3, prefill_ms=(t2 - t1) * 1e3,
            decode_tokens_per_s=(len(tokens) - 1) / decode_s if len(tokens) > 1 and decode_s > 0 else 0.0,
            encode_ms=encode_ms)
        usage = Usage(prompt_tokens=ready.cached_tokens + ready.fresh_ids.numel(),
                      cached_tokens=ready.cached_tokens, completion_tokens=len(tokens))
        result = Result(text, tuple(tokens), usage, timing, reason,
                        speculative=spec.to_json() if spec is not None else None)  # hook
        return l1.remember(result) if l1 is not None else result  # hook: L1 stores the answer

    def answer_batch(self, prompts: Iterable[str | Path], use_cache: bool = True,
                     config: GenerationConfig = GenerationConfig()) -> list[Result]:
        """Answer prompts of one or more added schemas one after another, sharing the store."""
        return [self.answer(p, use_cache, config) for p in prompts]

    def logprobs(self, prompt: str | Path, continuation: list[int], use_cache: bool = True) -> torch.Tensor:
        """Log-probabilities `[len(continuation), vocab]` of the next token along a forced continuation.

        Row i is the distribution that predicts `continuation[i]`. Used for fidelity measures (KL
        between cached and baseline distributions along the baseline's own answer).
        """
        s, bound = self.bind(prompt)
        ready = self.assemble(s, bound) if use_cache else self.baseline(s, bound)
        logits, state = generation.prefill(self.lm, ready.cache, ready.cache_positions, ready.fresh_ids,
                                           ready.fresh_positions, ready.next_position)
        rows = [logits]
        for token in continuation[:-1]:
            rows.append(generation.decode_step(self.lm, state, token))
        return torch.log_softmax(torch.stack(rows).float(), dim=-1)

    # -- helpers -------------------------------------------------------------------------------
    def _decode(self, state, logits, config, on_text, stream=None):  # hook: `stream`
        tok = self.lm.tokenizer
        tokens: list[int] = []
        text, sent, reason, t_first = "", "", "length", None
        for token in stream if stream is not None else generation.decode(self.lm, state, logits, config):  # hook
            if t_first is None:
                t_first = time.perf_counter()
            tokens.append(token)
            new_text = tok.decode(tokens)
            cut = _first_stop(new_text, config.stop)
            if cut is not None:
                new_text, reason = new_text[:cut], "stop"
            if on_text is not None:
                # Hold back a tail that could still grow into a stop string, so streamed text never
                # includes what the stop string will cut.
                ready = new_text if reason == "stop" else new_text[:len(new_text) - _stop_overlap(new_text, config.stop)]
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
            t_first = time.perf_counter()
        return tokens, text, reason, t_first

    def _missing(self, s: _Schema, units: list[str]) -> list[str]:
        # A membership test, not a load: the load (and checksum) happens once, when states are used.
        return [u for u in units if encoder.unit_key(s.plan, u, self.lm, self.storage_dtype) not in self.store]

    def _schema(self, name: str) -> _Schema:
        if name not in self.schemas:
            raise PMLError(f"schema {name!r} was not added (added: {', '.join(sorted(self.schemas)) or 'none'})")
        return self.schemas[name]

    def _model_dtype(self) -> torch.dtype:
        return next(self.lm.model.parameters()).dtype


def _stop_overlap(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is a proper beginning of some stop string."""
    return max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    cuts = [text.find(s) for s in stops if s and s in text]
    return min(cuts) if cuts else None


def _parse(source, parse):
    """XML text, or a path to a file holding it."""
    if isinstance(source, Path) or (isinstance(source, str) and not source.lstrip().startswith("<")):
        path = Path(source)
        if not path.is_file():
            raise PMLError("no such file", file=str(path))
        return parse(path.read_bytes(), path=str(path))
    return parse(source)
