"""torch-facing calls into the kernel library: shapes, strides and dtypes checked here, not in C.

Every function needs `attention_store.kernels.active()` (the caller checks) and fp32 CPU tensors.
"""

from __future__ import annotations

import torch

from attention_store import kernels


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
    """softmax(rows K^T * scale + mask) V per key/value head.

    rows `[B, KV, G, D]` (the G query heads of a group as rows), key/value `[B, KV, T, D]` with the
    last dimension contiguous (views of a preallocated cache are fine), mask additive
    `[B or 1, KV or 1, G, T]` or None. Returns `[B, KV, G, D]`.
    """
    b, kv, g, d = rows.shape
    t = key.shape[-2]
    assert key.shape == value.shape == (b, kv, t, d) and key.stride(-1) == value.stride(-1) == 1
    assert rows.dtype == key.dtype == value.dtype == torch.float32
    rows = rows.contiguous()
    out = torch.empty_like(rows)
    m_strides = (0, 0, 0)
    if mask is not None:
        assert mask.dtype == torch.float32 and mask.shape[-2:] == (g, t) and mask.stride(-1) == 1
        mask = mask.expand(b, kv, g, t)
        m_strides = mask.stride()[:3]
    kernels.library().pml_decode_attention(
        rows.data_ptr(), key.data_ptr(), value.data_ptr(), _ptr(mask), out.data_ptr(), b, kv, g, d, t,
        *key.stride()[:3], *value.stride()[:3], *m_strides, scale, torch.get_num_threads())
    return out
