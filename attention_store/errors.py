"""Store errors that reach users: each message says what went wrong and what to do."""

from __future__ import annotations


class StoreError(Exception):
    """A store folder that cannot be used as asked (wrong folder, unwritable, full, a symlink out of it)."""


class StoreMismatch(StoreError, ValueError):
    """A store folder holds states of another model or tokenizer."""
