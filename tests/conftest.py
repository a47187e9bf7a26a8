"""Shared fixtures: tiny random-weight models for CPU tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def tiny():
    """Factory: `tiny(arch="llama", seed=0, dtype=torch.float32)` -> LoadedModel (a fresh model each call)."""
    from prompt_cache.tiny import tiny_model

    def make(arch: str = "llama", seed: int = 0, dtype=None):
        import torch

        return tiny_model(arch, seed=seed, dtype=dtype or torch.float32)

    return make


@pytest.fixture
def tiny_archs():
    """All tiny architectures (`prompt_cache.tiny.TINY_ARCHS`)."""
    from prompt_cache.tiny import TINY_ARCHS

    return TINY_ARCHS


@pytest.fixture
def machine(monkeypatch):
    """Factory: `machine(cores, load)` makes the thread policy (`prompt_cache.threads`) see that
    many usable cores and that 1-minute load average, with no `$PML_THREADS`; torch's thread
    count is put back afterwards."""
    import torch

    from prompt_cache import threads

    def pretend(cores: int, load: float) -> None:
        monkeypatch.delenv(threads.ENV, raising=False)
        monkeypatch.setattr(threads, "usable_cores", lambda: cores)
        monkeypatch.setattr(threads.os, "getloadavg", lambda: (load, 0.0, 0.0))

    before = torch.get_num_threads()
    yield pretend
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def data():
    """The shared evaluation data folder (`../shared/data` or $PML_DATA); tests skip without it."""
    from experiments.data import data_dir

    try:
        return data_dir()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def paper_reference():
    """The paper's reference numbers file (`../shared/reference/paper_results.md`); skip without it."""
    from experiments.paper_reference import default_path

    path = default_path()
    if not path.is_file():
        pytest.skip(f"paper reference file not found: {path}")
    return path
