"""The attention store: a memory tier in front of a disk tier, and the per-model store folder.

Example:
    >>> store = AttentionStore.from_dir("/tmp/pml-store", memory_budget_bytes=1 << 30)
    >>> store.put(entry)
    >>> hit, tier = store.get(entry.meta.key)      # tier is "memory" or "disk"; (None, None) on a miss
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from attention_store.entry import EntryMeta, KVEntry
from attention_store.fileio import atomic_write
from attention_store.keys import EntryKey
from attention_store.paths import default_store_dir
from attention_store.tiers import DEFAULT_MEMORY_BUDGET, DiskTier, MemoryTier, Tier


class StoreRow(NamedTuple):
    """One entry of `AttentionStore.entries()`: its metadata and the tiers that hold it."""

    meta: EntryMeta
    tiers: tuple[str, ...]


class AttentionStore:
    """A memory tier in front of a disk tier (either may be None). Disk hits are promoted into memory."""

    def __init__(self, memory: MemoryTier | None, disk: DiskTier | None):
        self.memory = memory
        self.disk = disk
        self.tiers: tuple[Tier, ...] = tuple(t for t in (memory, disk) if t is not None)

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str] | None = None, memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
                 device: torch.device | str = "cpu", verify_on_load: bool = True,
                 layer_devices: Sequence[torch.device | str] | None = None) -> AttentionStore:
        """A store over disk dir `path` (default `cache_dir()/store`) with a memory tier of the given budget.

        `layer_devices`: keep layer i's states on `layer_devices[i]`, the budget then counting per device
        (see `MemoryTier`).
        """
        root = Path(path) if path is not None else default_store_dir()
        return cls(MemoryTier(memory_budget_bytes, device, layer_devices), DiskTier(root, verify_on_load))

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


class StoreMismatch(ValueError):
    """A store folder holds states of another model or tokenizer."""


OWNER_FILE = "owner.json"


def open_store(path: str | Path | None, lm, memory_budget_bytes: int | None = None,
               layer_devices: Sequence[torch.device | str] | None = None) -> AttentionStore:
    """A disk-backed store for `lm`: `path`, or a folder per model under the default store folder.

    A store folder belongs to one model: `owner.json` names its weights and tokenizer fingerprints,
    and opening it with another model is a `StoreMismatch` (entry keys would never be served across
    models anyway, since they include both fingerprints; this turns a silent full recompute into a
    clear error). The check writes nothing when it fails.

    `layer_devices` (from `prompt_cache.models.layer_devices`, for a model split across devices)
    keeps each layer's states on its layer's device, with `memory_budget_bytes` per device; without
    it the memory tier sits on the model's first device and assembly moves each layer.
    """
    root = Path(path) if path is not None else default_store_dir() / re.sub(r"[^\w.-]+", "_", lm.name)
    owner = {"model": lm.name, "model_fingerprint": lm.fingerprint,
             "tokenizer_fingerprint": lm.tokenizer.fingerprint}
    marker = root / OWNER_FILE
    if marker.is_file():
        try:
            found = json.loads(marker.read_text())
        except (OSError, ValueError) as e:
            raise StoreMismatch(f"{marker} is unreadable ({e}); remove it to adopt the store") from None
        if (found.get("model_fingerprint"), found.get("tokenizer_fingerprint")) != (
                owner["model_fingerprint"], owner["tokenizer_fingerprint"]):
            raise StoreMismatch(
                f"store {root} holds states of model {found.get('model')!r} (weights "
                f"{str(found.get('model_fingerprint'))[:12]}), not of {lm.name!r} (weights "
                f"{lm.fingerprint[:12]}); use another --store folder, or empty this one with "
                f"`pml store rm --all --store {root}` and delete {marker}")
    else:
        atomic_write(marker, json.dumps(owner, indent=1))
    budget = DEFAULT_MEMORY_BUDGET if memory_budget_bytes is None else memory_budget_bytes
    # The memory tier lives where the model does (GPU memory for a GPU model), so assembly is a copy
    # on that device.
    return AttentionStore.from_dir(root, memory_budget_bytes=budget, device=lm.model.device,
                                   layer_devices=layer_devices)
