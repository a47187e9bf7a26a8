"""The attention store: a memory tier in front of a disk tier, and the per-model store folder.

Example:
    >>> store = AttentionStore.from_dir("/tmp/pml-store", memory_budget_bytes=1 << 30)
    >>> store.put(entry)
    >>> hit, tier = store.get(entry.meta.key)      # tier is "memory" or "disk"; (None, None) on a miss
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from attention_store.direct import EntryFile
from attention_store.entry import EntryMeta, KVEntry
from attention_store.errors import StoreError, StoreMismatch
from attention_store.keys import EntryKey
from attention_store.owner import OWNER_FILE, check_owner, read_owner
from attention_store.paths import default_store_dir
from attention_store.tiers import CORRUPT_DIR, DEFAULT_MEMORY_BUDGET, DiskTier, MemoryTier, Tier

__all__ = ["AttentionStore", "StoreRow", "StoreError", "StoreMismatch", "OWNER_FILE", "open_store", "check_store_dir"]

log = logging.getLogger(__name__)


class StoreRow(NamedTuple):
    """One entry of `AttentionStore.entries()`: its metadata and the tiers that hold it."""

    meta: EntryMeta
    tiers: tuple[str, ...]


class AttentionStore:
    """A memory tier in front of a disk tier (either may be None). Disk hits are promoted into memory
    unless `promote_disk_hits` is False (a process that answers one prompt: a copy in memory would
    never be read again, and `get(..., defer=True)` can then read the file straight into the
    caller's buffers)."""

    def __init__(self, memory: MemoryTier | None, disk: DiskTier | None, promote_disk_hits: bool = True):
        self.memory = memory
        self.disk = disk
        self.promote_disk_hits = promote_disk_hits
        self.tiers: tuple[Tier, ...] = tuple(t for t in (memory, disk) if t is not None)

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str] | None = None, memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
                 device: torch.device | str = "cpu", verify_on_load: bool = True,
                 layer_devices: Sequence[torch.device | str] | None = None,
               promote_disk_hits: bool = True) -> AttentionStore:
        """A store over disk dir `path` (default `cache_dir()/store`) with a memory tier of the given budget.

        `layer_devices`: keep layer i's states on `layer_devices[i]`, the budget then counting per device
        (see `MemoryTier`).
        """
        root = Path(path) if path is not None else default_store_dir()
        return cls(MemoryTier(memory_budget_bytes, device, layer_devices), DiskTier(root, verify_on_load))

    def get(self, key: EntryKey, expect: tuple[Sequence[int] | torch.Tensor, Sequence[int] | torch.Tensor] | None = None,
            defer: bool = False) -> tuple[KVEntry | EntryFile, str] | tuple[None, None]:
        """`(entry, tier name)` from the first tier that has `key`, or `(None, None)`.

        With `expect=(token_ids, positions)`, an entry holding other tokens or positions (a
        self-consistent file with another entry's states) is damage: it is quarantined, and the
        lookup goes on to the next tier and ends in a miss, so the caller recomputes it.
        `defer=True` (a caller that copies the states into its own buffers once): where a disk hit
        would not be promoted, it comes back as an opened `EntryFile`, not yet read.
        """
        for tier in self.tiers:
            if defer and tier is self.disk and (self.memory is None or not self.promote_disk_hits):
                entry = self.disk.open(key)
            else:
                entry = tier.get(key)
            if entry is not None and expect is not None and not entry.matches(*expect):
                self.quarantine(key, "its token ids or positions are not the ones its key names")
                return None, None
            if entry is not None:
                if isinstance(entry, EntryFile):
                    return entry, tier.name
                if tier is self.disk and self.memory is not None and self.promote_disk_hits:
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

    def quarantine(self, key: EntryKey, reason: str) -> None:
        """Drop `key` from memory and move its file aside: it is damaged and will be recomputed."""
        if self.memory is not None:
            self.memory.delete(key)
        if self.disk is not None:
            self.disk.quarantine(key, reason)

    def pin_keys(self, keys: Iterable[EntryKey], holder: str = "") -> None:
        """Keep the entries under `keys` in memory on behalf of `holder` (no-op without a memory tier).

        By content key, not by the schema recorded in an entry: an entry two schemas share stays
        pinned while either holds it.
        """
        if self.memory is not None:
            self.memory.pin_keys(keys, holder)

    def unpin_keys(self, holder: str = "") -> None:
        """Release what `holder` pinned."""
        if self.memory is not None:
            self.memory.unpin_keys(holder)


def check_store_dir(path: str | os.PathLike[str], writable: bool = True) -> Path:
    """`path` if it can be a store folder; a StoreError saying why not otherwise.

    Refused: a filesystem root, the home folder itself, a file, a non-empty folder that is not a
    store (no `owner.json` and things a store never holds), and with `writable` a folder that
    cannot be written (or created). Nothing is created here.
    """
    root = Path(path).expanduser()
    resolved = root.resolve()
    if resolved == Path(resolved.anchor):
        raise StoreError(f"refusing {root} as a store folder: it is a filesystem root; name a folder of its own")
    if resolved == Path.home().resolve():
        raise StoreError(f"refusing {root} as a store folder: it is your home folder; name a folder of its own")
    if root.exists() and not root.is_dir():
        raise StoreError(f"refusing {root} as a store folder: it is not a folder")
    if root.is_dir():
        foreign = sorted(p.name for p in root.iterdir() if not _store_like(p))
        if foreign and not (root / OWNER_FILE).exists():
            raise StoreError(f"refusing {root} as a store folder: it is not empty and not a store (it holds "
                             f"{', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); name an empty or new folder")
    existing = next(p for p in (resolved, *resolved.parents) if p.exists())
    if writable and not os.access(existing, os.W_OK | os.X_OK):
        raise StoreError(f"cannot write to store {root}: {existing} is not writable; use a writable --store folder")
    return root


def _store_like(p: Path) -> bool:
    """Whether `p` is something a store folder holds: owner file, entry shards, corrupt/, temp files."""
    name = p.name
    return (name in (OWNER_FILE, CORRUPT_DIR) or (name.startswith(".") and name.endswith(".tmp"))
            or (len(name) == 2 and all(c in "0123456789abcdef" for c in name) and p.is_dir()))


def store_dir_for(path: str | os.PathLike[str] | None, model_name: str) -> Path:
    """`path`, or the per-model folder under the default store folder."""
    return Path(path).expanduser() if path is not None else default_store_dir() / re.sub(r"[^\w.-]+", "_", model_name)


def open_store(path: str | Path | None, lm, memory_budget_bytes: int | None = None,
               layer_devices: Sequence[torch.device | str] | None = None,
               promote_disk_hits: bool = True) -> AttentionStore:
    """A disk-backed store for `lm`: `path`, or a folder per model under the default store folder.

    A store folder belongs to one model: `owner.json` names its weights and tokenizer fingerprints,
    and opening it with another model is a `StoreMismatch` (entry keys would never be served across
    models anyway, since they include both fingerprints; this turns a silent full recompute into a
    clear error). Opening writes nothing: the folder and `owner.json` are created by the first
    entry stored, and created exclusively, so of two models storing into a fresh folder at once the
    second gets the StoreMismatch. Temp files of writers killed before this run are removed.

    `layer_devices` (from `prompt_cache.models.layer_devices`, for a model split across devices)
    keeps each layer's states on its layer's device, with `memory_budget_bytes` per device; without
    it the memory tier sits on the model's first device and assembly moves each layer.
    `promote_disk_hits=False`: see `AttentionStore` (`pml run` answers one prompt per process).
    """
    root = check_store_dir(store_dir_for(path, lm.name))
    owner = {"model": lm.name, "model_fingerprint": lm.fingerprint,
             "tokenizer_fingerprint": lm.tokenizer.fingerprint}
    check_owner(root, read_owner(root), owner)
    budget = DEFAULT_MEMORY_BUDGET if memory_budget_bytes is None else memory_budget_bytes
    # The memory tier lives where the model does (GPU memory for a GPU model), so assembly is a copy
    # on that device.
    disk = DiskTier(root, owner=owner)
    disk.remove_stale_temp()
    return AttentionStore(MemoryTier(budget, lm.model.device, layer_devices), disk, promote_disk_hits)
