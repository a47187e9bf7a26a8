"""Vector indexes: faiss and the numpy reference agree; removal takes an id out of every search."""

import numpy as np
import pytest

from prompt_cache.semantic.index import FaissIndex, FlatIndex, new_index


def unit(rng, n, dim):
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_faiss_matches_flat_with_removals():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(0)
    vecs, ids = unit(rng, 300, 32), np.arange(100, 400)
    a, b = FlatIndex(32), FaissIndex(32)
    for ix in (a, b):
        ix.add(ids, vecs)
        ix.remove(ids[::3])
    assert len(a) == len(b) == 200
    for q in unit(rng, 20, 32):
        ra, rb = a.search(q, 5), b.search(q, 5)
        assert [i for i, _ in ra] == [i for i, _ in rb]
        assert np.allclose([s for _, s in ra], [s for _, s in rb], atol=1e-5)
        assert not {i for i, _ in ra} & set(ids[::3].tolist())


@pytest.mark.parametrize("kind", ["flat", "faiss"])
def test_a_stored_vector_finds_itself_first(kind):
    if kind == "faiss":
        pytest.importorskip("faiss")
    rng = np.random.default_rng(1)
    vecs = unit(rng, 50, 16)
    ix = new_index(16, kind)
    assert ix.search(vecs[0], 3) == []  # empty index
    ix.add(np.arange(50), vecs)
    best, score = ix.search(vecs[7], 3)[0]
    assert best == 7 and score == pytest.approx(1.0, abs=1e-5)


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown index kind"):
        new_index(4, "annoy")
