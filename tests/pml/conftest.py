"""Fixtures for the pml tests: fake tokenizers (tests/pml/pml_fakes.py) and the examples folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from pml_fakes import EXAMPLES, CharTokenizer, WordTokenizer


@pytest.fixture
def tok() -> WordTokenizer:
    return WordTokenizer()


@pytest.fixture
def char_tok() -> CharTokenizer:
    return CharTokenizer()


@pytest.fixture
def examples() -> Path:
    return EXAMPLES
