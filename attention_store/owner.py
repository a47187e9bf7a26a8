"""The owner file of a store folder: which model's states it holds, claimed once, atomically."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from attention_store.errors import StoreError, StoreMismatch
from attention_store.fileio import publish

OWNER_FILE = "owner.json"
OWNER_FIELDS = ("model", "model_fingerprint", "tokenizer_fingerprint")


def read_owner(root: Path) -> dict | None:
    """The owner recorded in `root`, None if there is none yet; a StoreError if the file is unusable."""
    marker = root / OWNER_FILE
    if not marker.exists() and not marker.is_symlink():
        return None
    if marker.is_symlink() or not marker.is_file():
        raise StoreMismatch(f"{marker} is not a regular file; remove it to adopt the store")
    try:
        found = json.loads(marker.read_text())
    except (OSError, ValueError) as e:
        raise StoreMismatch(f"{marker} is unreadable ({e}); remove it to adopt the store") from None
    if not isinstance(found, dict) or not all(isinstance(found.get(f), str) for f in OWNER_FIELDS):
        raise StoreMismatch(f"{marker} is unreadable (expected a JSON object with {', '.join(OWNER_FIELDS)}); "
                            "remove it to adopt the store")
    return found


def check_owner(root: Path, found: Mapping | None, owner: Mapping) -> None:
    """StoreMismatch unless `found` (what `root` records) is None or names the same weights and tokenizer."""
    if found is None:
        return
    if (found["model_fingerprint"], found["tokenizer_fingerprint"]) != (
            owner["model_fingerprint"], owner["tokenizer_fingerprint"]):
        raise StoreMismatch(
            f"store {root} holds states of model {found.get('model')!r} (weights "
            f"{str(found.get('model_fingerprint'))[:12]}), not of {owner['model']!r} (weights "
            f"{str(owner['model_fingerprint'])[:12]}); use another --store folder, or empty this one with "
            f"`pml store rm --all --store {root}` and delete {root / OWNER_FILE}")


def claim_owner(root: Path, owner: Mapping) -> bool:
    """Record `owner` in `root` unless an owner is recorded; True if this call recorded it.

    Create-exclusive (see `fileio.publish`): of two models claiming a fresh folder at once, one wins
    and the other gets a StoreMismatch, so a folder never holds the states of two models.
    """
    try:
        created = publish(root / OWNER_FILE, json.dumps(dict(owner), indent=1))
    except OSError as e:
        raise StoreError(f"cannot write to store {root}: {e.strerror or e}") from None
    if not created:
        check_owner(root, read_owner(root), owner)
    return created
