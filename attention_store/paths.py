"""Where this project keeps its files: the cache folder (models, fingerprints, stores)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of everything this project caches: `$PML_CACHE_HOME`, else `~/.cache/pml`."""
    env = os.environ.get("PML_CACHE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pml"


def default_store_dir() -> Path:
    """`cache_dir()/store`: per-model store folders live under it."""
    return cache_dir() / "store"
