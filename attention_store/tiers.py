"""Storage tiers: content-addressed KV entries in memory (LRU, pinning) and on disk (safetensors)."""

from __future__ import annotations

import abc
import contextlib
import logging
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path

import torch

from attention_store.entry import EntryMeta, KVEntry, payload_checksum
from attention_store.fileio import atomic_write
from attention_store.keys import KEY_RE, EntryKey

log = logging.getLogger(__name__)

FILE_FORMAT = "pml-kv/1"
DEFAULT_MEMORY_BUDGET = 4 << 30  # bytes of KV kept in a memory tier unless told otherwise


class Tier(abc.ABC):
    """One storage tier. Entries are immutable once put; a key names its content."""

    name: str

    @abc.abstractmethod
    def get(self, key: EntryKey) -> KVEntry | None:
        """The entry stored under `key`, or None if absent (or unusable: the caller recomputes)."""

    @abc.abstractmethod
    def put(self, entry: KVEntry) -> None:
        """Store `entry` under `entry.meta.key`, replacing any entry with that key."""

    @abc.abstractmethod
    def delete(self, key: EntryKey) -> bool:
        """Remove the entry under `key`; True if there was one."""

    @abc.abstractmethod
    def entries(self) -> list[EntryMeta]:
        """Index rows of every stored entry (metadata only, no tensors loaded)."""

    @abc.abstractmethod
    def __contains__(self, key: object) -> bool:
        """Whether an entry is stored under `key` (without loading or verifying it)."""


class MemoryTier(Tier):
    """Entries kept as tensors on `device`, least recently used evicted first to stay within `budget_bytes`.

    Entries of pinned schemas are never evicted; if they alone exceed the budget they are kept and a
    warning is logged. An unpinned entry bigger than the whole budget is not kept.
    """

    name = "memory"

    def __init__(self, budget_bytes: int = DEFAULT_MEMORY_BUDGET, device: torch.device | str = "cpu"):
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.device = torch.device(device)
        self._entries: OrderedDict[EntryKey, KVEntry] = OrderedDict()  # oldest use first
        self._pinned: set[str] = set()
        self._lock = threading.Lock()
        self.evictions = 0  # entries evicted to stay within the budget, since creation (server metrics)

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def pin(self, schema: str) -> None:
        """Never evict entries of `schema`."""
        with self._lock:
            self._pinned.add(schema)

    def unpin(self, schema: str) -> None:
        """Let entries of `schema` be evicted again (evicting now if over budget)."""
        with self._lock:
            self._pinned.discard(schema)
            self._evict()

    def get(self, key: EntryKey) -> KVEntry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, entry: KVEntry) -> None:
        pinned = entry.meta.schema in self._pinned
        if entry.nbytes > self.budget_bytes and not pinned:
            log.info("memory tier: entry %s (%s/%s, %d bytes) is bigger than the whole budget (%d bytes); not kept",
                     entry.meta.key[:12], entry.meta.schema, entry.meta.module, entry.nbytes, self.budget_bytes)
            return
        entry = entry.to(self.device)
        with self._lock:
            self._entries[entry.meta.key] = entry
            self._entries.move_to_end(entry.meta.key)
            self._evict()

    def _evict(self) -> None:
        total = self.total_bytes
        for key in list(self._entries):
            if total <= self.budget_bytes:
                return
            entry = self._entries[key]
            if entry.meta.schema in self._pinned:
                continue
            del self._entries[key]
            total -= entry.nbytes
            self.evictions += 1
            log.debug("memory tier: evicted %s (%s/%s)", key[:12], entry.meta.schema, entry.meta.module)
        if total > self.budget_bytes:
            log.warning("memory tier: pinned entries alone take %d bytes, over the %d byte budget; keeping them",
                        total, self.budget_bytes)

    def delete(self, key: EntryKey) -> bool:
        with self._lock:
            return self._entries.pop(key, None) is not None

    def entries(self) -> list[EntryMeta]:
        with self._lock:
            return [e.meta for e in self._entries.values()]

    def keys_lru(self) -> list[EntryKey]:
        """Stored keys, least recently used first (the eviction order)."""
        with self._lock:
            return list(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)


class DiskTier(Tier):
    """One safetensors file per entry at `root/<key[:2]>/<key>.safetensors`.

    Tensors `k.{i}`, `v.{i}`, `token_ids`, `positions`, `replaceable`; the string metadata holds the
    EntryMeta as JSON and a sha256 of the tensor payload. Writes go to a temp file in the same dir,
    are fsynced, then `os.replace`d into place, so a reader sees either no file or a whole one, and
    concurrent writers of one key just race to replace it with identical content. Loads are
    memory-mapped and verified against the checksum (`verify_on_load=False` skips that full read).
    A damaged file is logged once, moved to `root/corrupt/`, and reported as a miss; never served.
    """

    name = "disk"

    def __init__(self, root: str | os.PathLike[str], verify_on_load: bool = True):
        self.root = Path(root)
        self.verify_on_load = verify_on_load
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: EntryKey) -> Path:
        """Where the entry for `key` lives."""
        if not KEY_RE.match(key):
            raise ValueError(f"not an entry key (64 lowercase hex digits): {key!r}")
        return self.root / key[:2] / f"{key}.safetensors"

    def put(self, entry: KVEntry) -> None:
        from safetensors.torch import save

        tensors = {name: t.detach().to("cpu").contiguous() for name, t in entry.tensors().items()}
        metadata = {"format": FILE_FORMAT, "meta": entry.meta.to_json(), "checksum": payload_checksum(tensors)}
        data = save(tensors, metadata=metadata)
        atomic_write(self.path(entry.meta.key), data)

    def get(self, key: EntryKey) -> KVEntry | None:
        return self._load(key, verify=self.verify_on_load)

    def _load(self, key: EntryKey, verify: bool) -> KVEntry | None:
        from safetensors import safe_open

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
            if metadata.get("format") != FILE_FORMAT:
                raise ValueError(f"format {metadata.get('format')!r}, expected {FILE_FORMAT!r}")
            meta = EntryMeta.from_json(metadata["meta"])
            if meta.key != key:
                raise ValueError(f"file holds entry {meta.key}, not {key}")
            if verify and payload_checksum(tensors) != metadata.get("checksum"):
                raise ValueError("payload checksum mismatch")
            n = sum(1 for name in tensors if name.startswith("k."))
            entry = KVEntry(meta, tuple(tensors[f"k.{i}"] for i in range(n)), tuple(tensors[f"v.{i}"] for i in range(n)),
                            tensors["token_ids"], tensors["positions"], tensors["replaceable"])
        except FileNotFoundError:  # deleted or quarantined by someone else meanwhile
            return None
        except Exception as exc:  # safetensors raises its own error types for bad headers / truncation
            self._quarantine(path, exc)
            return None
        return entry

    def _quarantine(self, path: Path, exc: BaseException) -> None:
        aside = self.root / "corrupt" / path.name
        log.warning("disk tier: %s is damaged (%s: %s); moved to %s, it will be recomputed",
                    path, type(exc).__name__, exc, aside)
        with contextlib.suppress(OSError):
            aside.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, aside)
            return
        with contextlib.suppress(OSError):
            path.unlink()

    def verify(self, key: EntryKey) -> bool:
        """Fully read and checksum the entry under `key`; a damaged one is moved aside. True if it is sound."""
        return self._load(key, verify=True) is not None

    def verify_all(self) -> dict[EntryKey, bool]:
        """`verify` every stored entry: key -> sound."""
        return {key: self.verify(key) for key in self._keys()}

    def _keys(self) -> list[EntryKey]:
        return sorted(EntryKey(p.stem) for p in self.root.glob("??/*.safetensors") if KEY_RE.match(p.stem))

    def entries(self) -> list[EntryMeta]:
        from safetensors import safe_open

        rows = []
        for key in self._keys():
            try:
                with safe_open(self.path(key), framework="pt") as f:
                    rows.append(EntryMeta.from_json((f.metadata() or {})["meta"]))
            except FileNotFoundError:
                continue
            except Exception as exc:
                self._quarantine(self.path(key), exc)
        return rows

    def delete(self, key: EntryKey) -> bool:
        try:
            self.path(key).unlink()
            return True
        except FileNotFoundError:
            return False

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and bool(KEY_RE.match(key)) and self.path(EntryKey(key)).is_file()

    def remove_stale_temp(self, older_than_s: float = 3600.0) -> int:
        """Delete temp files left by killed writers (older than `older_than_s`); returns how many."""
        removed, now = 0, time.time()
        for tmp in self.root.glob("??/.*.tmp"):
            with contextlib.suppress(OSError):
                if now - tmp.stat().st_mtime > older_than_s:
                    tmp.unlink()
                    removed += 1
        return removed
