"""Linear layers that decode from the GGUF blocks their weights came from, exactly.

The built-in models ship as GGUF files whose matrices are Q4_1 (SmolLM2's projections) or Q8_0
(its tied embedding / LM head), converted once to fp32 for transformers. Those fp32 weights are the
blocks expanded, nothing more: every weight is `d * q + m` or `d * q`. A decode step is bound by
reading the weights, so reading the blocks instead (0.75 or 1.125 bytes a weight here, against 4)
is the same arithmetic on the same values over 3.6-5.3x fewer bytes.

`PackedLinear` is an `nn.Linear` (same `weight` parameter, same state dict, ties kept) that keeps
the blocks beside the weight and uses them for inputs of at most `MAX_ROWS` rows (decode steps,
the LM head of a last-token prefill, small batches, speculative verification) while the kernels
are active; anything else (prefill, other dtypes or devices, kernels off) runs `F.linear` on the
fp32 weight as before. `install` swaps a model's linear layers for packed ones only after
expanding the blocks and finding them bitwise equal to the layer's weight, so a packed layer
cannot compute with other values than the model holds.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from attention_store import kernels
from attention_store.kernels import ops

log = logging.getLogger(__name__)

MAX_ROWS = 16  # input rows up to which the packed path is used (it reads the weights once for all rows)
GGUF_BLOCK_BYTES = {"q4_1": 20, "q8_0": 34}  # a block in the GGUF file: fp16 scale(s), then the quants


def repack(fmt: str, raw: np.ndarray) -> torch.Tensor:
    """GGUF blocks `[rows, blocks * GGUF bytes]` (uint8) -> this library's layout `[rows, blocks, bytes]`.

    The fp16 scales become fp32 (exactly), so the kernel does no conversion; the quants are copied.
    """
    rows = raw.shape[0]
    src = np.ascontiguousarray(raw).reshape(rows, -1, GGUF_BLOCK_BYTES[fmt])
    out = np.empty((rows, src.shape[1], kernels.BLOCK_BYTES[fmt]), dtype=np.uint8)
    scales = 2 if fmt == "q4_1" else 1
    out[..., :4 * scales] = src[..., :2 * scales].copy().view(np.float16).astype(np.float32).view(np.uint8)
    out[..., 4 * scales:] = src[..., 2 * scales:]
    return torch.from_numpy(out)


class PackedLinear(torch.nn.Linear):
    """`nn.Linear` whose few-row products read GGUF blocks (see the module docstring)."""

    def __init__(self, linear: torch.nn.Linear, fmt: str, blocks: torch.Tensor):
        super().__init__(linear.in_features, linear.out_features, bias=False, device="meta")
        self.weight = linear.weight  # the same Parameter: ties (LM head = embedding) stay tied
        self.bias = linear.bias
        self.fmt = fmt
        self.register_buffer("blocks", blocks, persistent=False)  # not in the state dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.numel() <= MAX_ROWS * self.in_features and x.dtype == torch.float32 and x.device.type == "cpu"
                and kernels.active()):
            bias = None if self.bias is None else self.bias.detach()
            return ops.matvec(self.fmt, self.blocks, x, self.out_features, bias)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, packed={self.fmt}"


def expands_to(fmt: str, blocks: torch.Tensor, weight: torch.Tensor, rows: int = 4096) -> bool:
    """Whether `blocks` expand bitwise to `weight`, checked `rows` rows at a time (no full fp32 copy)."""
    if blocks.shape[:2] != (weight.shape[0], weight.shape[1] // kernels.BLOCK_WEIGHTS):
        return False
    return all(torch.equal(ops.dequantize(fmt, blocks[r:r + rows]), weight[r:r + rows])
               for r in range(0, weight.shape[0], rows))


def install(model: torch.nn.Module, packed: dict[str, tuple[str, torch.Tensor]]) -> list[str]:
    """Replace `model`'s linear layers named in `packed` (`name -> (fmt, blocks)`) by `PackedLinear`s.

    A layer is replaced only if its blocks expand to exactly its fp32 weight; others are left as
    they are, with a warning. Returns the names replaced. Does nothing (returns []) when the
    kernels are not available.
    """
    if kernels.library() is None:
        return []
    done = []
    modules = dict(model.named_modules())
    for name, (fmt, blocks) in packed.items():
        linear = modules.get(name)
        if type(linear) is not torch.nn.Linear or linear.weight.dtype != torch.float32 or linear.weight.device.type != "cpu":
            log.warning("not packing %s: not an fp32 CPU nn.Linear", name)
            continue
        if linear.in_features % kernels.BLOCK_WEIGHTS or not expands_to(fmt, blocks, linear.weight.detach()):
            log.warning("not packing %s: its %s blocks do not expand to its weight", name, fmt)
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, PackedLinear(linear, fmt, blocks))
        done.append(name)
    return done
