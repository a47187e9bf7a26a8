"""GenerationConfig refuses values that would otherwise fail (or silently misbehave) inside torch."""

import math

import pytest

from prompt_cache.generation import MAX_SEED, GenerationConfig


@pytest.mark.parametrize("field, value", [
    ("max_new_tokens", -1), ("max_new_tokens", 2.5), ("max_new_tokens", True),
    ("temperature", -1.0), ("temperature", math.nan), ("temperature", math.inf), ("temperature", "0.5"),
    ("top_p", 0.0), ("top_p", 2.0), ("top_p", math.nan),
    ("seed", -1), ("seed", MAX_SEED + 1), ("seed", 1.5),
    ("stop", ["a"]), ("stop", (1,)), ("eos_ids", [2]),
])
def test_bad_values_are_refused_at_construction(field, value):
    with pytest.raises(ValueError, match=field):
        GenerationConfig(**{field: value})


def test_edge_values_are_accepted_and_sample():
    import torch

    from prompt_cache.generation import sample

    cfg = GenerationConfig(max_new_tokens=0, temperature=0.7, top_p=1.0, seed=MAX_SEED, stop=("",), eos_ids=())
    gen = torch.Generator().manual_seed(cfg.seed)  # the largest seed torch takes
    assert 0 <= sample(torch.randn(10), cfg, gen) < 10
