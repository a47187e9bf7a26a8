"""The semantic cache: pre-process, embed, search the request's own partition, evaluate, expire, evict.

A GPTCache-style pipeline of replaceable parts (`preprocess`, an `Embedder`, a `VectorIndex`
factory, a similarity evaluation), rewritten small rather than built on the `gptcache` package
(docs/DESIGN.md says why). What is specific here:

- Partitions. Every entry belongs to one (tenant, context key) partition, and each partition has
  its own vector index: a lookup searches only its partition's index, so an answer can never be
  served across tenants or contexts (not a filter applied after a shared search).
- The context key names everything besides the question that changes the answer: for a PML
  prompt, the model, the schema layout, the selected modules and parameter values, the other
  prompt text, and the generation settings (`engine_hook` builds it); a server builds it from the
  system prompt, history and settings with `context_key`.
- TTL on an injectable clock, and a bound on the number of entries (least recently used first).

Example:
    >>> from prompt_cache.semantic.embedder import HashingEmbedder
    >>> sc = SemanticCache(HashingEmbedder(), SemanticCacheConfig(threshold=0.9))
    >>> ctx = context_key(system="You answer questions about Paris.")
    >>> sc.store("What is the capital of France?", "Paris", ctx, tenant="acme")
    >>> sc.lookup("what is the capital of France", ctx, tenant="acme").answer
    'Paris'
    >>> sc.lookup("what is the capital of France", ctx, tenant="other") is None
    True
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, NewType

import numpy as np

from prompt_cache.semantic.embedder import Embedder
from prompt_cache.semantic.index import VectorIndex, new_index

ContextKey = NewType("ContextKey", str)  # sha256 hex of everything but the question

# Cosine similarity (all-MiniLM-L6-v2) at or above which a question hits; chosen from the
# measurements in docs/RESULTS.md#semantic-cache-thresholds (`pml bench semantic`).
DEFAULT_THRESHOLD = 0.95


def context_key(**parts: Any) -> ContextKey:
    """A content hash of keyword parts (JSON-serialisable values; others by `str`)."""
    blob = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False)
    return ContextKey(hashlib.sha256(blob.encode()).hexdigest())


def normalize_question(text: str) -> str:
    """Collapse whitespace; case and punctuation are left to the embedder (they can change meaning)."""
    return re.sub(r"\s+", " ", text).strip()


@dataclass(frozen=True)
class SemanticCacheConfig:
    threshold: float = DEFAULT_THRESHOLD  # cosine similarity at or above which a stored question hits
    ttl_s: float | None = 24 * 3600.0  # entries older than this are never served (None: no expiry)
    max_entries: int = 100_000  # over all partitions; the least recently used is evicted first
    top_k: int = 4  # nearest stored questions the evaluation looks at

    def __post_init__(self):
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {self.threshold}")
        if self.ttl_s is not None and self.ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0 or None, got {self.ttl_s}")
        if self.max_entries < 1 or self.top_k < 1:
            raise ValueError("max_entries and top_k must be >= 1")


class CosineThreshold:
    """GPTCache's search-distance evaluation: accept the best candidate at or above `threshold`."""

    def __init__(self, threshold: float):
        self.threshold = threshold

    def accept(self, question: str, candidate: str, similarity: float) -> bool:
        return similarity >= self.threshold


@dataclass(frozen=True)
class Hit:
    answer: Any  # what was stored
    question: str  # the stored question that matched
    similarity: float
    age_s: float


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    stores: int = 0
    expired: int = 0  # entries dropped because their TTL passed
    evicted: int = 0  # entries dropped by the size bound

    @property
    def hit_rate(self) -> float:
        return self.hits / (self.hits + self.misses) if self.hits + self.misses else 0.0


@dataclass
class _Entry:
    partition: tuple[str, str]
    question: str
    answer: Any
    created: float


@dataclass
class _Partition:
    index: VectorIndex
    ids: set[int] = field(default_factory=set)


class SemanticCache:
    """Thread-safe; `lookup` and `store` take the question, its context key and a tenant."""

    def __init__(self, embedder: Embedder, config: SemanticCacheConfig = SemanticCacheConfig(),
                 index_factory: Callable[[int], VectorIndex] = new_index,
                 preprocess: Callable[[str], str] = normalize_question, evaluation=None,
                 clock: Callable[[], float] = time.monotonic):
        self.embedder, self.config = embedder, config
        self.index_factory, self.preprocess, self.clock = index_factory, preprocess, clock
        self.evaluation = evaluation if evaluation is not None else CosineThreshold(config.threshold)
        self.stats = CacheStats()
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # LRU order: oldest use first
        self._partitions: dict[tuple[str, str], _Partition] = {}
        self._next_id = 0
        self._lock = threading.Lock()

    def embed(self, question: str) -> np.ndarray:
        """The query vector `[dim]` of a question (pass it to lookup and store to embed once)."""
        return self.embedder.embed([self.preprocess(question)])[0]

    def lookup(self, question: str, context: ContextKey, tenant: str = "",
               vector: np.ndarray | None = None) -> Hit | None:
        """The stored answer to the nearest accepted question in (tenant, context), or None (counted)."""
        vector = self.embed(question) if vector is None else vector
        question = self.preprocess(question)
        with self._lock:
            part = self._partitions.get((tenant, context))
            now = self.clock()
            for eid, score in part.index.search(vector, self.config.top_k) if part is not None else []:
                entry = self._entries[eid]
                assert entry.partition == (tenant, context), "a partition's index holds another's entry"
                if self._expired(entry, now):
                    self._drop(eid)
                    self.stats.expired += 1
                    continue
                if self.evaluation.accept(question, entry.question, score):
                    self._entries.move_to_end(eid)
                    self.stats.hits += 1
                    return Hit(entry.answer, entry.question, score, now - entry.created)
            self.stats.misses += 1
            return None

    def store(self, question: str, answer: Any, context: ContextKey, tenant: str = "",
              vector: np.ndarray | None = None) -> None:
        """Remember `answer` for `question` in (tenant, context); evicts the least recently used if full."""
        vector = self.embed(question) if vector is None else vector
        with self._lock:
            key = (tenant, context)
            part = self._partitions.get(key)
            if part is None:
                part = self._partitions[key] = _Partition(self.index_factory(vector.shape[0]))
            eid, self._next_id = self._next_id, self._next_id + 1
            part.index.add(np.array([eid], np.int64), vector[None])
            part.ids.add(eid)
            self._entries[eid] = _Entry(key, self.preprocess(question), answer, self.clock())
            self.stats.stores += 1
            while len(self._entries) > self.config.max_entries:
                self._drop(next(iter(self._entries)))
                self.stats.evicted += 1

    def purge_expired(self) -> int:
        """Drop every expired entry now (lookups drop the ones they meet anyway); returns how many."""
        with self._lock:
            now = self.clock()
            old = [eid for eid, e in self._entries.items() if self._expired(e, now)]
            for eid in old:
                self._drop(eid)
            self.stats.expired += len(old)
            return len(old)

    def __len__(self) -> int:
        return len(self._entries)

    def _expired(self, entry: _Entry, now: float) -> bool:
        return self.config.ttl_s is not None and now - entry.created >= self.config.ttl_s

    def _drop(self, eid: int) -> None:
        entry = self._entries.pop(eid)
        part = self._partitions[entry.partition]
        part.index.remove(np.array([eid], np.int64))
        part.ids.discard(eid)
        if not part.ids:
            del self._partitions[entry.partition]
