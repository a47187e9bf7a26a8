"""The model worker: one thread owns the model; requests are queued to it and answered with usage and timing.

A CPU runs one forward at a time well, so every model call (prefix lookup, prefill, decode, PML
answers) runs on a single worker thread; HTTP handlers only queue work and await it. Shared tables
(schemas, tenants, totals) are guarded by a lock, because handlers read them from the event loop.

PML requests that wait for the model at the same time (same tenant, same generation settings) are
answered together in one packed batch (`prompt_cache.batch`): one forward per decode step for all
of them, which is several times the tokens/s of answering them in turn on a CPU whose decode is
bound by reading the weights. Nothing waits on purpose: a lone request starts at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from attention_store.store import AttentionStore
from attention_store.tiers import DiskTier, MemoryTier
from pml.errors import PMLError
from pml.parser import parse_schema
from prompt_cache import batch, generation, limits
from prompt_cache.engine import PromptCache
from prompt_cache.generation import GenerationConfig
from prompt_cache.prefix import PrefixCache, PrefixConfig
from prompt_cache.semantic.cache import ContextKey, SemanticCache, context_key
from prompt_cache.threads import SERVER_FRONT_END_CORES, apply_threads
from prompt_cache.timing import Clock
from serving import DEFAULT_MAX_BATCH

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completion:
    """What one request produced, with provider-neutral usage and timing."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose states were served from the cache
    written_tokens: int  # prompt tokens whose states were stored by this request (cache creation)
    completion_tokens: int
    ttft_ms: float  # from the worker starting the request to the first token
    stop_sequence: str | None = None  # the stop string that ended generation, if one did
    reported_cached: int = 0  # cached_tokens as OpenAI-style usage reports them (rounded to the granularity)
    semantic: str | None = None  # "hit" (answered by the semantic cache, no model work) or "miss"; None: off


@dataclass
class Totals:
    """Server-wide running totals (cost accounting); read under `Worker.lock`."""

    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    written_tokens: int = 0
    completion_tokens: int = 0
    semantic_hits: int = 0  # requests answered by the semantic cache without the model
    batches: int = 0  # packed batches of 2+ PML requests answered together
    batched_requests: int = 0  # PML requests answered in such a batch
    by_endpoint: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class SchemaRecord:
    name: str
    text: str
    sha256: str  # content hash of the PML text


class TextStream:
    """Turns decoded tokens into text pieces, cutting at the first stop string and never emitting
    text that a stop string could still remove."""

    def __init__(self, tokenizer, stops: tuple[str, ...]):
        self.tok, self.stops = tokenizer, tuple(s for s in stops if s)
        self.tokens: list[int] = []
        self.text, self.sent, self.stopped, self.stop_hit = "", "", False, None

    def push(self, token: int) -> str:
        """Add one token; the new text that is safe to emit ("" if none)."""
        self.tokens.append(token)
        text = self.tok.decode(self.tokens, skip_special_tokens=True)
        cuts = sorted((text.find(s), s) for s in self.stops if s in text)
        if cuts:
            text, self.stopped, self.stop_hit = text[:cuts[0][0]], True, cuts[0][1]
        self.text = text
        hold = 0 if self.stopped else max((n for s in self.stops for n in range(1, len(s)) if text.endswith(s[:n])),
                                          default=0)
        ready = text[:len(text) - hold]
        # Multi-byte characters decode to U+FFFD until complete: hold those back too.
        while ready.endswith("\ufffd"):
            ready = ready[:-1]
        if ready.startswith(self.sent) and len(ready) > len(self.sent):
            piece, self.sent = ready[len(self.sent):], ready
            return piece
        return ""

    def flush(self) -> str:
        if self.text.startswith(self.sent) and len(self.text) > len(self.sent):
            piece, self.sent = self.text[len(self.sent):], self.text
            return piece
        return ""


class Worker:
    """The warm model, its prefix cache, PML schemas per tenant, and the single thread that runs them."""

    def __init__(self, lm, store: AttentionStore, prefix_config: PrefixConfig = PrefixConfig(),
                 use_cache: bool = True, clock: Callable[[], float] = time.monotonic, threads: int | None = None,
                 semantic: SemanticCache | None = None, max_batch: int = DEFAULT_MAX_BATCH):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        self.lm = lm
        self.max_batch = max_batch  # PML requests packed into one batch at most (1: no batching)
        self.store = store
        self.use_cache = use_cache
        self.clock = clock  # TTLs (injectable in tests)
        self.timer = Clock(lm.model.device)  # TTFT (synchronizes the device)
        self.semantic = semantic  # the L1 response cache, consulted before any model work (opt-in)
        self.prefix = PrefixCache(lm, store, prefix_config, clock=clock, write_behind=True)
        self.lock = threading.Lock()
        self.schemas: dict[str, SchemaRecord] = {}
        self.pinned: set[str] = set()
        self.totals = Totals()
        self._tenants: dict[str, PromptCache] = {"": PromptCache(lm, store)}
        self._waiting: list[PmlRequest] = []  # queued PML requests not yet answered (under `lock`)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="pml-model",
                                                           initializer=_set_threads, initargs=(threads,))
        self._pool.submit(int).result()  # start the model thread now: its thread count is set (and logged) at start

    async def run(self, fn, *args):
        """Run `fn(*args)` on the model thread; awaitable from the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.prefix.flush()

    # -- schemas -------------------------------------------------------------------------------
    def add_schema(self, text: str, pin: bool = False) -> SchemaRecord:
        """Register PML schema text (never a path: no file a client names is ever opened)."""
        _require_xml(text, "schema")
        schema = parse_schema(text)  # no path: `src=` is refused by the parser
        record = SchemaRecord(schema.name, text, hashlib.sha256(text.encode()).hexdigest())
        with self.lock:
            self.schemas[schema.name] = record
            if pin:
                self.pinned.add(schema.name)
            tenants = list(self._tenants.values())
        for pc in tenants:  # laid out lazily by `tenant` for tenants created later
            pc.add_schema(text)
            if pin:
                pc.pin(schema.name)
        return record

    def delete_schema(self, name: str) -> bool:
        with self.lock:
            record = self.schemas.pop(name, None)
            self.pinned.discard(name)
            tenants = list(self._tenants.values())
        for pc in tenants:
            pc.remove_schema(name)
            pc.unpin(name)
        return record is not None

    def tenant(self, salt: str) -> PromptCache:
        """The PromptCache of one tenant. PML module keys carry no salt, so each salted tenant gets
        its own store (a memory tier, and a disk folder named by a hash of the salt), isolating
        module states as the salt isolates prefix blocks."""
        with self.lock:
            pc = self._tenants.get(salt)
            if pc is not None:
                return pc
            tag = hashlib.sha256(salt.encode()).hexdigest()[:16]
            memory = MemoryTier(self.store.memory.budget_bytes if self.store.memory else 1 << 30,
                                self.lm.model.device)
            disk = DiskTier(Path(self.store.disk.root) / "tenants" / tag) if self.store.disk is not None else None
            pc = PromptCache(self.lm, AttentionStore(memory, disk))
            for record in self.schemas.values():
                pc.add_schema(record.text)
                if record.name in self.pinned:
                    pc.pin(record.name)
            self._tenants[salt] = pc
            return pc

    # -- requests (run on the model thread) ----------------------------------------------------
    def complete(self, ids: list[int], config: GenerationConfig, salt: str = "", read_limit: int | None = None,
                 writes: tuple[tuple[int, float | None], ...] | None = None,
                 on_text: Callable[[str], None] | None = None, endpoint: str = "completions",
                 remember: Callable[[Completion], None] | None = None) -> Completion:
        """Generate after token ids, serving the longest cached prefix (up to `read_limit` tokens;
        0 = no read) and storing `writes` ((upto, ttl_s) pairs; None = every full block, no TTL).
        `remember` receives the finished Completion (the semantic cache stores it)."""
        t0 = self.timer.now()
        if self.use_cache and read_limit != 0:
            hit = self.prefix.lookup(ids, salt, limit=read_limit)
        else:
            hit = self.prefix.lookup([], salt)  # the empty prefix: an empty cache
        rest = torch.tensor(ids[hit.tokens:], dtype=torch.long)
        logits, state = generation.prefill(self.lm, hit.cache, hit.positions, rest,
                                           torch.arange(hit.tokens, len(ids)))
        stream = TextStream(self.lm.tokenizer, config.stop)
        t_first = None
        for token in generation.decode(self.lm, state, logits, config):
            if t_first is None:
                t_first = self.timer.now()
            piece = stream.push(token)
            if piece and on_text is not None:
                on_text(piece)
            if stream.stopped:
                break
        t_first = t_first or self.timer.now()
        tail = stream.flush()
        if tail and on_text is not None:
            on_text(tail)
        written = 0
        if self.use_cache:
            for upto, ttl in ((len(ids), None),) if writes is None else writes:
                written += self.prefix.insert(ids, state.cache, salt, upto, ttl)
        length = len(stream.tokens) >= config.max_new_tokens and not stream.stopped
        done = Completion(stream.text, tuple(stream.tokens), "length" if length else "stop", len(ids), hit.tokens,
                          written, len(stream.tokens), (t_first - t0) * 1e3, stream.stop_hit,
                          self.prefix.config.reported(hit.tokens))
        return self._finish(done, endpoint, remember)

    def answer_pml(self, prompt: str, config: GenerationConfig, salt: str = "",
                   on_text: Callable[[str], None] | None = None, endpoint: str = "chat",
                   remember: Callable[[Completion], None] | None = None) -> Completion:
        """Answer a PML prompt against a registered schema (modular reuse), alone."""
        _require_xml(prompt, "prompt")
        pc = self.tenant(salt)
        t0 = self.timer.now()
        r = pc.answer(prompt, use_cache=self.use_cache, config=config, on_text=on_text)
        return self._finish(_pml_completion(r, r.timing.ttft_ms or self.timer.ms_since(t0)), endpoint, remember)

    async def answer_pml_queued(self, prompt: str, config: GenerationConfig, salt: str = "",
                                on_text: Callable[[str], None] | None = None, endpoint: str = "chat",
                                remember: Callable[[Completion], None] | None = None) -> Completion:
        """`answer_pml` on the model thread, packed with the PML requests of the same tenant and
        generation settings that are waiting for it at the same time (continuous arrival: a request
        that finds the model busy waits, and whoever runs next takes every compatible waiting request
        along, up to `max_batch`). A lone request is answered at once, exactly as `answer_pml`."""
        request = PmlRequest(prompt, config, salt, on_text, endpoint, remember)
        with self.lock:
            self._waiting.append(request)
        return await self.run(self._serve_pml, request)

    def _serve_pml(self, request: PmlRequest) -> Completion:
        with self.lock:
            if request in self._waiting:  # not yet answered in an earlier request's batch
                group = [request] + [q for q in self._waiting
                                     if q is not request and (q.salt, q.config) == (request.salt, request.config)]
                group = group[:self.max_batch]
                self._waiting = [q for q in self._waiting if not any(q is g for g in group)]
            else:
                group = []
        if group:
            self._answer_group(group)
        if request.error is not None:
            raise request.error
        return request.result

    def _answer_group(self, group: list[PmlRequest]) -> None:
        """Answer queued requests of one tenant and config: packed when there are several and the
        engine can pack them (`prompt_cache.batch.unbatchable`), else one by one. Each request gets
        its own result or its own error; one bad prompt never fails the others."""
        pc = self.tenant(group[0].salt)
        why = batch.unbatchable(pc) or (None if self.use_cache else "the cache is off")
        if len(group) > 1 and why is not None:
            log.info("answering %d waiting PML requests one by one: %s", len(group), why)
        if len(group) == 1 or why is not None:
            for q in group:
                try:
                    q.result = self.answer_pml(q.prompt, q.config, q.salt, q.on_text, q.endpoint, q.remember)
                except Exception as e:  # noqa: BLE001 - handed to the request's own awaiter
                    q.error = e
            return
        ok = []
        for q in group:  # bind first, so that one malformed prompt fails alone
            try:
                _require_xml(q.prompt, "prompt")
                s, bound = pc.bind(q.prompt)
                limits.check_generation(s.layout, bound, q.config.max_new_tokens, self.lm)
                ok.append(q)
            except Exception as e:  # noqa: BLE001 - handed to the request's own awaiter
                q.error = e
        streams = [TextStream(self.lm.tokenizer, q.config.stop) if q.on_text is not None else None for q in ok]

        def on_token(i: int, token: int) -> None:
            if streams[i] is not None and not streams[i].stopped and (piece := streams[i].push(token)):
                ok[i].on_text(piece)

        if not ok:
            return
        try:
            results = pc.answer_batch([q.prompt for q in ok], config=ok[0].config, on_token=on_token)
        except Exception as e:  # noqa: BLE001 - e.g. a module too long to encode: each request fails with it
            for q in ok:
                q.error = e
            return
        for q, stream, r in zip(ok, streams, results):
            if stream is not None and (tail := stream.flush()):
                q.on_text(tail)
            q.result = self._finish(_pml_completion(r, r.timing.ttft_ms), q.endpoint, q.remember)
        if len(ok) > 1:
            with self.lock:
                self.totals.batches += 1
                self.totals.batched_requests += len(ok)

    # -- the semantic cache (L1) ---------------------------------------------------------------
    def semantic_begin(self, endpoint: str, question: str, context: dict, config: GenerationConfig,
                       salt: str) -> tuple[Completion | None, SemanticRequest]:
        """Look `question` up among earlier answers in the same context (and tenant): a stored
        Completion marked "hit" (no model work), or None, and the request to `remember` a miss by.

        The context key names everything besides the question that changes the answer: model and
        tokenizer, endpoint, the rest of the conversation or prompt (`context`), every generation
        setting, whether the cache is on. The tenant (salt) partitions the cache's index.
        """
        t0 = self.timer.now()
        key = context_key(model=self.lm.fingerprint, tokenizer=self.lm.tokenizer.fingerprint, endpoint=endpoint,
                          context=context, generation=dataclasses.asdict(config), use_cache=self.use_cache,
                          embedder=self.semantic.embedder.name)
        vector = self.semantic.embed(question)
        req = SemanticRequest(question, key, salt, vector)
        hit = self.semantic.lookup(question, key, salt, vector=vector)
        if hit is None:
            return None, req
        stored: Completion = hit.answer
        log.debug("semantic cache hit (similarity %.3f)", hit.similarity)
        # No prompt token was computed: all of them count as served from a cache, none written.
        return dataclasses.replace(stored, cached_tokens=stored.prompt_tokens, reported_cached=stored.prompt_tokens,
                                   written_tokens=0, ttft_ms=self.timer.ms_since(t0), semantic="hit"), req

    def semantic_remember(self, req: SemanticRequest, done: Completion) -> None:
        self.semantic.store(req.question, done, req.key, req.salt, vector=req.vector)

    def replay(self, done: Completion, on_text: Callable[[str], None] | None = None,
               endpoint: str = "chat") -> Completion:
        """Send a semantic-cache hit as if generated (one piece when streaming), and count it."""
        if on_text is not None and done.text:
            on_text(done.text)
        with self.lock:
            self.totals.semantic_hits += 1
        self._count(done, endpoint)
        return done

    def _finish(self, done: Completion, endpoint: str, remember) -> Completion:
        if remember is not None:
            done = dataclasses.replace(done, semantic="miss")
            remember(done)
        self._count(done, endpoint)
        return done

    def _count(self, c: Completion, endpoint: str) -> None:
        with self.lock:
            t = self.totals
            t.requests += 1
            t.prompt_tokens += c.prompt_tokens
            t.cached_tokens += c.cached_tokens
            t.written_tokens += c.written_tokens
            t.completion_tokens += c.completion_tokens
            t.by_endpoint[endpoint] = t.by_endpoint.get(endpoint, 0) + 1

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held per tier (all tenants)."""
        with self.lock:
            stores = [pc.store for pc in self._tenants.values()]
        stores = list({id(s): s for s in [self.store, *stores]}.values())
        out = {"memory": 0, "disk": 0}
        for s in stores:
            if s.memory is not None:
                out["memory"] += s.memory.total_bytes
            if s.disk is not None:
                out["disk"] += sum(m.nbytes for m in s.disk.entries())
        return out


@dataclass(eq=False)
class PmlRequest:
    """A PML request waiting for the model thread; it may be answered in another request's batch."""

    prompt: str
    config: GenerationConfig
    salt: str
    on_text: Callable[[str], None] | None
    endpoint: str
    remember: Callable[[Completion], None] | None
    result: Completion | None = None
    error: BaseException | None = None


def _pml_completion(r, ttft_ms: float) -> Completion:
    """A Completion from an engine Result (modular reuse: cached tokens reported exactly, none written)."""
    return Completion(r.text, r.token_ids, "length" if r.finish_reason == "length" else "stop",
                      r.usage.prompt_tokens, r.usage.cached_tokens, 0, r.usage.completion_tokens, ttft_ms,
                      reported_cached=r.usage.cached_tokens)


@dataclass(frozen=True)
class SemanticRequest:
    """One request's semantic-cache lookup, kept to store its answer after a miss."""

    question: str
    key: ContextKey
    salt: str
    vector: object  # the question's embedding (np.ndarray), computed once


def _require_xml(text: str, what: str) -> None:
    # The library never reads files, but a client sending a path gets a clear error here rather
    # than an XML parse error.
    if not isinstance(text, str) or not text.lstrip().startswith("<"):
        raise PMLError(f"the {what} must be PML text starting with '<' (file paths are not accepted)")


def _set_threads(n: int | None) -> None:
    log.info("model thread: %d torch threads", apply_threads(n, reserve=SERVER_FRONT_END_CORES))
