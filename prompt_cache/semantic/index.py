"""Exact inner-product vector indexes with removal: faiss (IndexIDMap2 over IndexFlatIP) or numpy.

The semantic cache keeps one index per (tenant, context) partition, so a search only ever sees
its own partition's vectors. Search is exact, not approximate: a partition holds the questions
asked about one context (hundreds to thousands), where a flat scan takes well under a millisecond,
and an approximate graph (HNSW) would add misses, and cannot delete expired entries in faiss.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class VectorIndex(Protocol):
    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add `vectors` `[n, dim]` (float32, unit norm) under int64 `ids` `[n]`."""

    def remove(self, ids: np.ndarray) -> None:
        """Remove these ids (unknown ids are ignored)."""

    def search(self, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        """Up to `k` (id, inner product) pairs, best first, for one query `[dim]`."""

    def __len__(self) -> int: ...


class FlatIndex:
    """numpy brute force: the reference implementation, and the fallback without faiss."""

    def __init__(self, dim: int):
        self.dim = dim
        self.ids = np.zeros(0, np.int64)
        self.vectors = np.zeros((0, dim), np.float32)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        assert vectors.shape == (len(ids), self.dim), f"vectors {vectors.shape} != ({len(ids)}, {self.dim})"
        self.ids = np.concatenate([self.ids, np.asarray(ids, np.int64)])
        self.vectors = np.concatenate([self.vectors, vectors.astype(np.float32)])

    def remove(self, ids: np.ndarray) -> None:
        keep = ~np.isin(self.ids, np.asarray(ids, np.int64))
        self.ids, self.vectors = self.ids[keep], self.vectors[keep]

    def search(self, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        if not len(self.ids):
            return []
        scores = self.vectors @ vector.astype(np.float32)  # (n,)
        top = np.argsort(-scores, kind="stable")[:k]
        return [(int(self.ids[i]), float(scores[i])) for i in top]

    def __len__(self) -> int:
        return len(self.ids)


class FaissIndex:
    """faiss `IndexIDMap2(IndexFlatIP)`: exact inner product, BLAS-backed, supports removal.

    `omp_threads` (default 1) sets faiss's OpenMP thread count, which is process-wide: one query
    over a small partition gains nothing from threads, and on a busy 2-core machine the OpenMP
    spin-waits made create + add + search + remove of a 10-vector index far slower (8.2 ms against
    0.42 ms a cycle, in one scratch timing on this shared machine, not a benchmark kept in the
    repository: a rough figure). None leaves the setting alone.
    """

    def __init__(self, dim: int, omp_threads: int | None = 1):
        import faiss

        if omp_threads is not None:
            faiss.omp_set_num_threads(omp_threads)
        self.dim = dim
        self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        assert vectors.shape == (len(ids), self.dim), f"vectors {vectors.shape} != ({len(ids)}, {self.dim})"
        self.index.add_with_ids(np.ascontiguousarray(vectors, np.float32), np.asarray(ids, np.int64))

    def remove(self, ids: np.ndarray) -> None:
        self.index.remove_ids(np.asarray(ids, np.int64))

    def search(self, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        if self.index.ntotal == 0:
            return []
        scores, ids = self.index.search(np.ascontiguousarray(vector[None], np.float32), k)  # (1, k) each
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]

    def __len__(self) -> int:
        return int(self.index.ntotal)


def new_index(dim: int, kind: str = "auto") -> VectorIndex:
    """`faiss`, `flat` (numpy), or `auto`: faiss when it is installed."""
    if kind == "auto":
        import importlib.util

        kind = "faiss" if importlib.util.find_spec("faiss") is not None else "flat"
    if kind == "faiss":
        return FaissIndex(dim)
    if kind == "flat":
        return FlatIndex(dim)
    raise ValueError(f"unknown index kind {kind!r}: choose faiss, flat or auto")
