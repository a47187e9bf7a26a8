"""Store administration: find store folders, list, verify and remove entries, list quarantined files.

Backs `pml store ls|rm|verify`; every operation stays inside the store folders it is given (no
symlink is followed out of them) and refuses folders that are not stores.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from attention_store.errors import StoreError
from attention_store.owner import OWNER_FILE
from attention_store.paths import default_store_dir
from attention_store.store import StoreRow, check_store_dir
from attention_store.tiers import DiskTier

KEY_PREFIX_RE = re.compile(r"^[0-9a-f]{1,64}$")


@dataclass(frozen=True)
class CorruptFile:
    """A damaged entry file set aside in a store's `corrupt/` folder."""

    store: Path
    path: Path
    nbytes: int
    mtime: float  # when it was set aside (seconds since the epoch)


def find_stores(path: str | Path | None = None) -> list[Path]:
    """The store folders to administer: `path` itself, or every per-model store under the default folder.

    A StoreError if `path` is missing or not a store (a filesystem root, the home folder, a
    non-empty folder without `owner.json` holding things a store never holds).
    """
    root = Path(path).expanduser() if path is not None else default_store_dir()
    if not root.is_dir():
        raise StoreError(f"no store at {root}")
    if path is not None or (root / OWNER_FILE).is_file():
        return [check_store_dir(root, writable=False)]
    # The default folder: one store per model below it (or a store written there directly).
    found = sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and (p / OWNER_FILE).is_file())
    return found or [check_store_dir(root, writable=False)]


def _disks(roots: Sequence[Path]) -> list[DiskTier]:
    return [DiskTier(r) for r in roots]  # no owner: administration never stores entries


def list_entries(roots: Sequence[Path]) -> list[tuple[Path, StoreRow]]:
    """(store folder, row) for every readable entry; unreadable files are moved aside while listing."""
    return [(d.root, StoreRow(meta, ("disk",))) for d in _disks(roots) for meta in d.entries()]


def list_corrupt(roots: Sequence[Path]) -> list[CorruptFile]:
    """Files set aside as damaged, newest first within each store."""
    return [CorruptFile(d.root, p, size, mtime) for d in _disks(roots) for p, size, mtime in d.corrupt_files()]


def verify(roots: Sequence[Path]) -> dict[str, bool]:
    """Checksum every entry file: key (or misfiled file name) -> sound. Damaged files are moved aside."""
    return {k: ok for d in _disks(roots) for k, ok in d.verify_all().items()}


def remove(roots: Sequence[Path], prefixes: Sequence[str] = (), schema: str | None = None,
           everything: bool = False) -> int:
    """Delete entries: those whose key starts with one of `prefixes`, those recorded for `schema`, or all.

    `everything` deletes every entry file (misfiled ones included), `corrupt/` and temp files. An
    empty or non-hex prefix is a StoreError, never "match everything".
    """
    bad = [p for p in prefixes if not KEY_PREFIX_RE.match(p)]
    if bad:
        raise StoreError(f"not a key prefix: {bad[0]!r} (keys are lowercase hex digits, as `pml store ls` shows "
                         "them; use --all to remove every entry)")
    if not (prefixes or schema or everything):
        raise StoreError("name entries to remove (KEY prefixes), --schema NAME or --all")
    removed = 0
    for disk in _disks(roots):
        if everything:
            removed += disk.remove_all()
            continue
        for meta in disk.entries():
            if (schema is not None and meta.schema == schema) or any(meta.key.startswith(p) for p in prefixes):
                removed += disk.delete(meta.key)
    return removed
