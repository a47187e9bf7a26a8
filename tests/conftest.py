"""Shared fixtures: tiny random-weight models for CPU tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def tiny():
    """Factory: `tiny(arch="llama", seed=0, dtype=torch.float32)` -> LoadedModel (a fresh model each call)."""
    from attention_store.tiny import tiny_model

    def make(arch: str = "llama", seed: int = 0, dtype=None):
        import torch

        return tiny_model(arch, seed=seed, dtype=dtype or torch.float32)

    return make


@pytest.fixture
def tiny_archs():
    """All tiny architectures (`attention_store.tiny.TINY_ARCHS`)."""
    from attention_store.tiny import TINY_ARCHS

    return TINY_ARCHS
