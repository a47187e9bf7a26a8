"""torch-facing calls into the kernel library: shapes, strides and dtypes checked here, not in C.

Every function needs `attention_store.kernels.active()` (the caller checks) and fp32 CPU tensors.
"""

from __future__ import annotations

import torch

from attention_store import kernels


FLASH_DIM = 32  # flash_attention's head dims are multiples of this (its output tile)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def matvec(fmt: str, blocks: torch.Tensor, x: torch.Tensor, out_features: int,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ W.T (+ bias)` for x `[..., in_features]` with W packed as `fmt` blocks (`[out, in / 32, bytes]`)."""
    in_features = x.shape[-1]
    assert blocks.shape == (out_features, in_features // kernels.BLOCK_WEIGHTS, kernels.BLOCK_BYTES[fmt]), (
        f"{fmt} blocks {tuple(blocks.shape)} do not match a {out_features} x {in_features} matrix")
    assert x.dtype == torch.float32 and x.device.type == "cpu"
    x2 = x.reshape(-1, in_features).contiguous()
    y = torch.empty(x2.shape[0], out_features, dtype=torch.float32)
    fn = kernels.library().pml_q4_1_matvec if fmt == "q4_1" else kernels.library().pml_q8_0_matvec
    fn(blocks.data_ptr(), x2.data_ptr(), _ptr(bias), y.data_ptr(), out_features, in_features, x2.shape[0],
       torch.get_num_threads())
    return y.reshape(*x.shape[:-1], out_features)


def dequantize(fmt: str, blocks: torch.Tensor) -> torch.Tensor:
    """The fp32 matrix `[out, in]` that `blocks` (`[out, in / 32, bytes]`) hold."""
    assert blocks.dtype == torch.uint8 and blocks.is_contiguous() and blocks.shape[-1] == kernels.BLOCK_BYTES[fmt]
    out = torch.empty(blocks.shape[0], blocks.shape[1] * kernels.BLOCK_WEIGHTS, dtype=torch.float32)
    fn = kernels.library().pml_q4_1_dequantize if fmt == "q4_1" else kernels.library().pml_q8_0_dequantize
    fn(blocks.data_ptr(), out.data_ptr(), blocks.shape[0] * blocks.shape[1])
    return out


def decode_attention(rows: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    """softmax(rows K^T * scale + mask) V per key/value head, one pass over K and V for all rows
    of a head (few rows: decode steps).

    rows `[B, KV, G, D]` (the G query heads of a group as rows), key/value `[B, KV, T, D]` with the
    last dimension contiguous (views of a preallocated cache are fine), mask additive
    `[B or 1, KV or 1, M, T]` with M = G, or M dividing G: row g then uses mask row g % M (the
    rows of one query head's mask, repeated over the heads of its group without a copy), or None.
    Returns `[B, KV, G, D]`.
    """
    return _attention(kernels.library().pml_decode_attention, rows, key, value, mask, scale)


def flash_attention(rows: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                    scale: float, causal: int = 0) -> torch.Tensor:
    """`decode_attention`'s contract for many rows per head (prefills, packed batches): key blocks
    with an online softmax, register-tiled products. Needs D % `FLASH_DIM` == 0. `causal` > 0:
    row g also sees only keys t <= T - causal + g % causal (the causal mask of `causal` new tokens
    at the end of the keys, repeated over the heads of a group; SDPA's `is_causal` when T == causal)."""
    assert rows.shape[-1] % FLASH_DIM == 0, f"head dim {rows.shape[-1]} is not a multiple of {FLASH_DIM}"
    assert 0 <= causal <= key.shape[-2] and (causal == 0 or rows.shape[-2] % causal == 0)
    return _attention(kernels.library().pml_flash_attention, rows, key, value, mask, scale, causal)


def _attention(fn, rows, key, value, mask, scale, *extra) -> torch.Tensor:
    b, kv, g, d = rows.shape
    t = key.shape[-2]
    assert key.shape == value.shape == (b, kv, t, d) and key.stride(-1) == value.stride(-1) == 1
    assert rows.dtype == key.dtype == value.dtype == torch.float32
    rows = rows.contiguous()
    out = torch.empty_like(rows)
    m_strides, period = (0, 0, 0), g
    if mask is not None:
        period = mask.shape[-2]
        assert mask.dtype == torch.float32 and mask.shape[-1] == t and mask.stride(-1) == 1 and g % period == 0, (
            f"mask {tuple(mask.shape)} does not fit {g} rows over {t} keys")
        mask = mask.expand(b, kv, period, t)
        m_strides = mask.stride()[:3]
    fn(rows.data_ptr(), key.data_ptr(), value.data_ptr(), _ptr(mask), out.data_ptr(), b, kv, g, d, t,
       *key.stride()[:3], *value.stride()[:3], *m_strides, period, *extra, scale, torch.get_num_threads())
    return out
