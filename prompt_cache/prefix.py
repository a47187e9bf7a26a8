"""Automatic prefix caching: token blocks keyed by chained content hashes, kept in the attention store.

A prompt's token ids are cut into blocks of `block_size` tokens. Block i's key is an `entry_key`
over its token ids, its start position, the key of block i-1 (the parent), and everything that
changes the stored bytes (model and tokenizer fingerprints, storage dtype) plus the tenant's salt at
the root. Chaining (as vLLM's `hash_block_tokens` does) makes a block's key name the whole prefix
that produced its states, so looking up "the longest cached prefix" is walking the chain until the
first miss; no tree is needed. Each block is one `KVEntry` (schema `PREFIX_SCHEMA`) in the same
store tiers as PML modules, so the memory tier's LRU budget and the disk tier apply to both.

Prefix states are computed with ordinary causal attention at contiguous positions 0..n-1, so a
served prefix gives the same logits as the full prefill (up to float summation order): exact reuse,
unlike PML's modular reuse. Example:

    >>> pc = PrefixCache(lm, store, PrefixConfig(min_prefix=0))                 # doctest: +SKIP
    >>> hit = pc.lookup(ids)                      # the longest served prefix, maybe empty  # doctest: +SKIP
    >>> logits, state = generation.prefill(lm, hit.cache, hit.positions, rest_ids, rest_positions)  # doctest: +SKIP
    >>> pc.insert(ids, state.cache)               # store the prompt's full blocks          # doctest: +SKIP
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from attention_store import adapter
from attention_store.entry import KVEntry
from attention_store.keys import EntryKey, entry_key
from attention_store.store import AttentionStore

log = logging.getLogger(__name__)

PREFIX_SCHEMA = "prefix"  # EntryMeta.schema of block entries (`pml store ls` shows them under it)
PREFIX_POLICY = "causal-prefix"  # EntryMeta.policy: contiguous positions, ordinary causal attention


@dataclass(frozen=True)
class PrefixConfig:
    block_size: int = 16  # tokens per block: the unit of storage and lookup (vLLM's default); at most
    # block_size - 1 tokens of a cached prefix are recomputed, which sets the TTFT of a repeated prompt
    min_prefix: int = 1024  # shortest prefix served or stored, as OpenAI and Anthropic (0 for research)
    granularity: int = 128  # cached tokens are *reported* in multiples of this (OpenAI: 128); serving is per block

    def __post_init__(self):
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.min_prefix < 0:
            raise ValueError(f"min_prefix must be >= 0, got {self.min_prefix}")
        if self.granularity < 1:
            raise ValueError(f"granularity must be >= 1, got {self.granularity}")

    def reported(self, cached_tokens: int) -> int:
        """Cached tokens as an OpenAI-style usage reports them: rounded down to the granularity."""
        return cached_tokens - cached_tokens % self.granularity


@dataclass
class PrefixStats:
    """Running totals, read by the server's metrics."""

    lookups: int = 0
    hit_tokens: int = 0  # tokens served from the cache
    blocks_written: int = 0
    expirations: int = 0  # blocks dropped because their TTL ran out


@dataclass
class PrefixHit:
    """The served prefix: a cache holding its states, and their positions `[tokens]`."""

    tokens: int
    cache: object  # DynamicCache, per layer [1, kv_heads, tokens, head_dim] (empty when tokens == 0)
    positions: torch.Tensor  # [tokens] = arange(tokens)
    keys: list[EntryKey] = field(default_factory=list)


class PrefixCache:
    """Longest-prefix lookup and block insertion over an `AttentionStore`, with per-entry TTLs.

    TTLs: an entry written with `ttl_s` expires `ttl_s` seconds after its last write or hit (a hit
    refreshes it, as Anthropic's cache does); written without one (`None`), it stays until the memory
    tier's LRU evicts it. When writers disagree, the longer life wins. The TTL index lives in this
    object: blocks found on disk that it has never seen (another process wrote them) count as
    written without a TTL. `clock` is injectable so tests can move time.
    """

    def __init__(self, lm, store: AttentionStore, config: PrefixConfig = PrefixConfig(),
                 storage_dtype: torch.dtype | None = None, clock: Callable[[], float] = time.monotonic,
                 write_behind: bool = False):
        self.lm = lm
        self.store = store
        self.config = config
        # Default: the model's own dtype, so a served prefix is bit-for-bit what a prefill computes.
        self.dtype = storage_dtype or next(lm.model.parameters()).dtype
        self.clock = clock
        self.stats = PrefixStats()
        self._ttl: dict[EntryKey, tuple[float | None, float]] = {}  # key -> (ttl_s or None, expires at)
        self._lock = threading.RLock()  # reentrant: an expiry found during insert drops under the lock
        # write_behind: disk writes (serialize, fsync, rename: most of an insert's time) go to one
        # background thread, so the next request does not wait for them; the memory tier has the
        # block at once. `flush()` waits for pending writes.
        self._writer = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pml-prefix-disk")
                        if write_behind and store.disk is not None and store.memory is not None else None)
        self._pending: list[concurrent.futures.Future] = []

    # -- keys ----------------------------------------------------------------------------------
    def block_keys(self, ids: Sequence[int], salt: str = "") -> list[EntryKey]:
        """One key per full block of `ids`, each chained on the previous one."""
        b = self.config.block_size
        keys: list[EntryKey] = []
        parent = ""
        for start in range(0, len(ids) - len(ids) % b, b):
            # The salt enters at the root only; chaining carries it into every later block.
            parent = entry_key(kind="prefix-block", parent=parent, salt=salt if not parent else "",
                               token_ids=list(ids[start:start + b]), start=start,
                               model_fingerprint=self.lm.fingerprint,
                               tokenizer_fingerprint=self.lm.tokenizer.fingerprint,
                               dtype=self.dtype)
            keys.append(parent)
        return keys

    def servable(self, n_tokens: int) -> int:
        """How many of `n_tokens` matched tokens may be served: whole blocks, 0 below the minimum."""
        n = n_tokens - n_tokens % self.config.block_size
        return n if n >= max(self.config.min_prefix, 1) else 0

    # -- lookup --------------------------------------------------------------------------------
    def match(self, ids: Sequence[int], salt: str = "") -> list[EntryKey]:
        """Keys of the longest chain of stored, unexpired blocks at the start of `ids` (touching nothing)."""
        found = []
        now = self.clock()
        for key in self.block_keys(ids, salt):
            if self._expired(key, now) or key not in self.store:
                break
            found.append(key)
        return found

    def lookup(self, ids: Sequence[int], salt: str = "", limit: int | None = None) -> PrefixHit:
        """The longest servable cached prefix of `ids`, at most `limit` tokens (default `len(ids) - 1`:
        the last prompt token is always computed, since generation needs its logits)."""
        limit = len(ids) - 1 if limit is None else min(limit, len(ids) - 1)
        self.expire()  # sweep every dead block, not only those on this prompt's chain
        keys = self.match(list(ids[:max(limit, 0)]), salt)
        n = self.servable(len(keys) * self.config.block_size)
        keys = keys[:n // self.config.block_size]
        entries = []
        for key in keys:
            entry, _ = self.store.get(key)
            if entry is None:  # evicted or damaged between match and load: serve what we have
                break
            entries.append(entry)
        n = self.servable(len(entries) * self.config.block_size)
        entries = entries[:n // self.config.block_size]
        with self._lock:
            self.stats.lookups += 1
            self.stats.hit_tokens += n
            now = self.clock()
            for e in entries:  # a hit refreshes the TTL
                ttl = self._ttl.get(e.meta.key)
                if ttl is not None and ttl[0] is not None:
                    self._ttl[e.meta.key] = (ttl[0], now + ttl[0])
        if not entries:
            return PrefixHit(0, adapter.new_cache(), torch.zeros(0, dtype=torch.long))
        model_dtype = next(self.lm.model.parameters()).dtype
        device = self.lm.model.device
        layers = entries[0].num_layers
        # One copy per layer: the blocks' states concatenated along the sequence axis.
        keys_ = tuple(torch.cat([e.keys[i] for e in entries], dim=2).to(device, model_dtype) for i in range(layers))
        values = tuple(torch.cat([e.values[i] for e in entries], dim=2).to(device, model_dtype) for i in range(layers))
        return PrefixHit(n, adapter.new_cache(keys_, values), torch.arange(n), [e.meta.key for e in entries])

    # -- insert --------------------------------------------------------------------------------
    def insert(self, ids: Sequence[int], cache, salt: str = "", upto: int | None = None,
               ttl_s: float | None = None) -> int:
        """Store the full blocks of `ids[:upto]` whose states are in `cache` (positions 0..len-1, as a
        prefill from an empty or prefix-served cache leaves them); returns tokens newly written.

        Blocks already stored are not rewritten, only their TTL is extended. A prefix shorter than
        `min_prefix` is not stored: it could never be served.
        """
        upto = len(ids) if upto is None else min(upto, len(ids))
        if upto < max(self.config.min_prefix, 1):
            return 0
        keys, values = adapter.cache_kv(cache)
        assert keys[0].shape[2] >= upto, f"cache holds {keys[0].shape[2]} states, fewer than the {upto} to store"
        b = self.config.block_size
        written = 0
        now = self.clock()
        for i, key in enumerate(self.block_keys(list(ids[:upto]), salt)):
            with self._lock:
                old = self._ttl.get(key)
                life = None if old is not None and old[0] is None else _longer(ttl_s, old[0] if old else 0.0)
                if key in self.store and not self._expired(key, now):
                    if old is not None:
                        self._ttl[key] = (life, now + life if life is not None else math.inf)
                    continue
            s = slice(i * b, (i + 1) * b)
            entry = KVEntry.create(
                key=key, schema=PREFIX_SCHEMA, module=f"block/{i}", model=self.lm.name,
                model_fingerprint=self.lm.fingerprint, policy=PREFIX_POLICY,
                keys=[k[:, :, s].to("cpu", self.dtype).clone() for k in keys],
                values=[v[:, :, s].to("cpu", self.dtype).clone() for v in values],
                token_ids=torch.tensor(ids[s], dtype=torch.long), positions=torch.arange(s.start, s.stop),
                replaceable=torch.zeros(b, dtype=torch.bool))
            self._put(entry)
            with self._lock:
                self._ttl[key] = (ttl_s, now + ttl_s if ttl_s is not None else math.inf)
                self.stats.blocks_written += 1
            written += b
        return written

    def _put(self, entry: KVEntry) -> None:
        if self._writer is None:
            self.store.put(entry)
            return
        self.store.memory.put(entry)
        with self._lock:
            self._pending = [f for f in self._pending if not f.done()]
            self._pending.append(self._writer.submit(self.store.disk.put, entry))

    def flush(self) -> None:
        """Wait until every block handed to the disk tier is written (write_behind only)."""
        with self._lock:
            pending, self._pending = self._pending, []
        for f in pending:
            f.result()

    # -- expiry --------------------------------------------------------------------------------
    def expire(self) -> int:
        """Delete every block whose TTL ran out; returns how many."""
        now = self.clock()
        with self._lock:
            dead = [k for k, (_, at) in self._ttl.items() if at <= now]
        for key in dead:
            self._drop(key)
        return len(dead)

    def _expired(self, key: EntryKey, now: float) -> bool:
        with self._lock:
            ttl = self._ttl.get(key)
        if ttl is None or ttl[1] > now:
            return False
        self._drop(key)
        return True

    def _drop(self, key: EntryKey) -> None:
        self.store.delete(key)
        with self._lock:
            if self._ttl.pop(key, None) is not None:
                self.stats.expirations += 1
        log.debug("prefix cache: block %s expired", key[:12])


def _longer(a: float | None, b: float) -> float | None:
    """The longer of two lives; None (no expiry) is the longest."""
    return None if a is None else max(a, b)
