"""Storage tiers of the attention store: content-addressed KV entries in memory (LRU) and on disk (safetensors).

KV layout, per layer: keys and values are `[1, kv_heads, tokens, head_dim]` (batch 1), as in
transformers; `kv_heads = num_key_value_heads` and `head_dim` come from the model config.

An entry is addressed by `entry_key(...)`, a sha256 over everything that changes its bytes (model
and tokenizer fingerprints, dtype, token ids, position ids, what the tokens attended to, policy), so
a stale entry can never be served for a changed input: it simply has another key.

Example:
    >>> store = AttentionStore.from_dir("/tmp/pml-store", memory_budget_bytes=1 << 30)
    >>> store.put(entry)
    >>> hit, tier = store.get(entry.meta.key)      # tier is "memory" or "disk"; (None, None) on a miss
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, NewType

import numpy as np
import torch

from attention_store.fileio import atomic_write
from attention_store.models import cache_dir

log = logging.getLogger(__name__)

EntryKey = NewType("EntryKey", str)
KEY_FORMAT = "pml-kv-key/1"  # part of every key: bump it to orphan all stored entries
FILE_FORMAT = "pml-kv/1"
DEFAULT_MEMORY_BUDGET = 2 << 30  # bytes
_KEY_RE = re.compile(r"^[0-9a-f]{64}$")


# --------------------------------------------------------------------------- keys


def _canonical(value: Any) -> Any:
    """A JSON-able form of `value` that two equal inputs always share."""
    if isinstance(value, torch.dtype):
        return dtype_name(value)
    if isinstance(value, (torch.Tensor, np.ndarray)) or (
        isinstance(value, (list, tuple)) and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)
    ):
        # Integer sequences (token ids, positions) go in as a hash of their int64 bytes: compact,
        # and independent of list/tuple/tensor/array type.
        arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"entry_key: expected an integer sequence, got dtype {arr.dtype}")
        arr = np.ascontiguousarray(arr.reshape(-1), dtype=np.int64)
        return {"int64": hashlib.sha256(arr.tobytes()).hexdigest(), "n": int(arr.size)}
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"entry_key: cannot encode {type(value).__name__}; pass str, numbers, dtypes, "
                    "integer sequences, or lists/dicts of those")


def entry_key(**fields: Any) -> EntryKey:
    """sha256 hex of a canonical (sorted-keys JSON) encoding of every field.

    The encoder passes everything that changes the stored bytes: `model_fingerprint`,
    `tokenizer_fingerprint`, `dtype`, `token_ids`, `position_ids`, `context` (a digest of what the
    tokens attended to) and `policy`.
    """
    if not fields:
        raise ValueError("entry_key needs at least one field")
    doc = {"format": KEY_FORMAT, "fields": _canonical(fields)}
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return EntryKey(hashlib.sha256(text.encode()).hexdigest())


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.float16` -> `"float16"`."""
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------- entries


@dataclasses.dataclass(frozen=True)
class EntryMeta:
    """The index row of one stored entry: plain data, no tensors."""

    key: EntryKey
    schema: str  # schema name
    module: str  # module path inside the schema (`a/b/c`)
    model: str  # model display name
    model_fingerprint: str
    policy: str  # encoding policy (e.g. how modules attend to each other)
    dtype: str  # storage dtype, e.g. "float16"
    tokens: int  # T
    nbytes: int  # bytes of keys + values

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EntryMeta:
        d = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        if set(d) != names:
            raise ValueError(f"entry metadata fields {sorted(d)} != {sorted(names)}")
        d["key"] = EntryKey(d["key"])
        return cls(**d)


@dataclasses.dataclass
class KVEntry:
    """The attention states of one module: per layer keys/values `[1, kv_heads, T, head_dim]`.

    `token_ids`, `positions` and `replaceable` are `[T]`; `replaceable` marks the parameter
    scaffold tokens the assembler overwrites with argument states.
    """

    meta: EntryMeta
    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    token_ids: torch.Tensor  # LongTensor [T]
    positions: torch.Tensor  # LongTensor [T]
    replaceable: torch.Tensor  # BoolTensor [T]

    def __post_init__(self) -> None:
        self.keys, self.values = tuple(self.keys), tuple(self.values)
        if not self.keys or len(self.keys) != len(self.values):
            raise ValueError(f"KVEntry needs one keys and one values tensor per layer; got "
                             f"{len(self.keys)} keys, {len(self.values)} values")
        shape, dtype = self.keys[0].shape, self.keys[0].dtype
        if len(shape) != 4 or shape[0] != 1:
            raise ValueError(f"KVEntry keys must be [1, kv_heads, T, head_dim]; got {tuple(shape)}")
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k.shape != shape or v.shape != shape or k.dtype != dtype or v.dtype != dtype:
                raise ValueError(f"KVEntry layer {i}: keys {tuple(k.shape)} {k.dtype}, values {tuple(v.shape)} "
                                 f"{v.dtype}; every layer must be {tuple(shape)} {dtype}")
        t = shape[2]
        for name, tensor, want in (("token_ids", self.token_ids, torch.long), ("positions", self.positions, torch.long),
                                   ("replaceable", self.replaceable, torch.bool)):
            if tensor.shape != (t,) or tensor.dtype != want:
                raise ValueError(f"KVEntry {name} must be {want} [{t}]; got {tensor.dtype} {tuple(tensor.shape)}")
        if self.meta.tokens != t or self.meta.dtype != dtype_name(dtype) or self.meta.nbytes != self.nbytes:
            raise ValueError(f"KVEntry meta (tokens={self.meta.tokens}, dtype={self.meta.dtype}, nbytes={self.meta.nbytes}) "
                             f"does not match its tensors (T={t}, {dtype_name(dtype)}, {self.nbytes} bytes)")

    @classmethod
    def create(cls, *, key: EntryKey, schema: str, module: str, model: str, model_fingerprint: str, policy: str,
               keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], token_ids: torch.Tensor,
               positions: torch.Tensor, replaceable: torch.Tensor) -> KVEntry:
        """Build an entry, filling `meta.dtype`, `meta.tokens` and `meta.nbytes` from the tensors."""
        keys, values = tuple(keys), tuple(values)
        meta = EntryMeta(key=key, schema=schema, module=module, model=model, model_fingerprint=model_fingerprint,
                         policy=policy, dtype=dtype_name(keys[0].dtype), tokens=int(keys[0].shape[2]),
                         nbytes=sum(t.numel() * t.element_size() for t in (*keys, *values)))
        return cls(meta, keys, values, token_ids, positions, replaceable)

    @property
    def nbytes(self) -> int:
        """Bytes of keys + values: 2 x layers x kv_heads x T x head_dim x dtype size."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    def to(self, device: torch.device | str) -> KVEntry:
        """This entry with its tensors on `device` (self if already there)."""
        device = torch.device(device)
        if self.keys[0].device == device:
            return self
        move = lambda ts: tuple(t.to(device) for t in ts)  # noqa: E731
        return KVEntry(self.meta, move(self.keys), move(self.values), self.token_ids.to(device),
                       self.positions.to(device), self.replaceable.to(device))

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor map as stored on disk: `k.{i}`, `v.{i}`, `token_ids`, `positions`, `replaceable`."""
        out = {f"k.{i}": k for i, k in enumerate(self.keys)}
        out.update({f"v.{i}": v for i, v in enumerate(self.values)})
        out.update(token_ids=self.token_ids, positions=self.positions, replaceable=self.replaceable)
        return out


def _payload_checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- tiers


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
        if not _KEY_RE.match(key):
            raise ValueError(f"not an entry key (64 lowercase hex digits): {key!r}")
        return self.root / key[:2] / f"{key}.safetensors"

    def put(self, entry: KVEntry) -> None:
        from safetensors.torch import save

        tensors = {name: t.detach().to("cpu").contiguous() for name, t in entry.tensors().items()}
        metadata = {"format": FILE_FORMAT, "meta": entry.meta.to_json(), "checksum": _payload_checksum(tensors)}
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
            if verify and _payload_checksum(tensors) != metadata.get("checksum"):
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
        return sorted(EntryKey(p.stem) for p in self.root.glob("??/*.safetensors") if _KEY_RE.match(p.stem))

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
        return isinstance(key, str) and bool(_KEY_RE.match(key)) and self.path(EntryKey(key)).is_file()

    def remove_stale_temp(self, older_than_s: float = 3600.0) -> int:
        """Delete temp files left by killed writers (older than `older_than_s`); returns how many."""
        removed, now = 0, time.time()
        for tmp in self.root.glob("??/.*.tmp"):
            with contextlib.suppress(OSError):
                if now - tmp.stat().st_mtime > older_than_s:
                    tmp.unlink()
                    removed += 1
        return removed


# --------------------------------------------------------------------------- the store


class StoreRow(NamedTuple):
    """One entry of `AttentionStore.entries()`: its metadata and the tiers that hold it."""

    meta: EntryMeta
    tiers: tuple[str, ...]


def default_store_dir() -> Path:
    """`cache_dir()/store`."""
    return cache_dir() / "store"


class AttentionStore:
    """A memory tier in front of a disk tier (either may be None). Disk hits are promoted into memory."""

    def __init__(self, memory: MemoryTier | None, disk: DiskTier | None):
        self.memory = memory
        self.disk = disk
        self.tiers: tuple[Tier, ...] = tuple(t for t in (memory, disk) if t is not None)

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str] | None = None, memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
                 device: torch.device | str = "cpu", verify_on_load: bool = True) -> AttentionStore:
        """A store over disk dir `path` (default `cache_dir()/store`) with a memory tier of the given budget."""
        root = Path(path) if path is not None else default_store_dir()
        return cls(MemoryTier(memory_budget_bytes, device), DiskTier(root, verify_on_load))

    def get(self, key: EntryKey) -> tuple[KVEntry, str] | tuple[None, None]:
        """`(entry, tier name)` from the first tier that has `key`, or `(None, None)`."""
        for tier in self.tiers:
            entry = tier.get(key)
            if entry is not None:
                if tier is self.disk and self.memory is not None:
                    self.memory.put(entry)
                    entry = self.memory.get(key) or entry  # the copy on the memory tier's device
                return entry, tier.name
        return None, None

    def put(self, entry: KVEntry) -> None:
        """Store `entry` in every tier."""
        for tier in self.tiers:
            tier.put(entry)

    def delete(self, key: EntryKey) -> bool:
        """Remove `key` from every tier; True if any held it."""
        return any([tier.delete(key) for tier in self.tiers])

    def __contains__(self, key: object) -> bool:
        return any(key in tier for tier in self.tiers)

    def entries(self) -> list[StoreRow]:
        """Every stored entry once, with the names of the tiers holding it."""
        rows: dict[EntryKey, StoreRow] = {}
        for tier in self.tiers:
            for meta in tier.entries():
                prev = rows.get(meta.key)
                rows[meta.key] = StoreRow(meta, (*prev.tiers, tier.name) if prev else (tier.name,))
        return list(rows.values())

    def pin(self, schema: str) -> None:
        """Keep entries of `schema` in memory (no-op without a memory tier)."""
        if self.memory is not None:
            self.memory.pin(schema)

    def unpin(self, schema: str) -> None:
        if self.memory is not None:
            self.memory.unpin(schema)
