"""The thread policy: a default from free cores, an environment override, and checked input."""

import pytest
import torch

from prompt_cache import threads


def test_default_leaves_busy_cores_alone(monkeypatch):
    monkeypatch.delenv(threads.ENV, raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (1.7, 0.0, 0.0))
    assert threads.default_threads() == 3  # one core busy
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (9.0, 0.0, 0.0))
    assert threads.default_threads() == 1  # never zero


def test_environment_overrides_and_bad_values_are_errors(monkeypatch):
    monkeypatch.setenv(threads.ENV, "2")
    assert threads.default_threads() == 2
    for bad in ("0", "-1", "two"):
        with pytest.raises(ValueError, match="positive integer"):
            threads.parse_threads(bad)


def test_apply_sets_torch(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert threads.apply_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
