"""`blend:R` (CacheBlend, Yao et al., EuroSys 2025): modules are stored as `independent`; at assembly
a fraction R of the cached tokens, those whose states deviate most from a full-context forward, are
recomputed with attention to every earlier assembled token and fused with the reused states.

The criterion, exactly: a forward over all assembled tokens (their ids at their reserved positions,
causal by position) runs through decoder layers 0..`CHECK_LAYER` only; per token, the deviation is
the squared L2 distance between its value vectors there and the reused ones at that layer, summed
over KV heads and head dim. The `round(R * n)` tokens with the largest deviation are recomputed.
The probe's states for layers 0..`CHECK_LAYER` are exact, so every token keeps them; from layer
`CHECK_LAYER + 1` on, the selected tokens are recomputed over the reused states of the others.
The set is chosen once and kept for all deeper layers (CacheBlend narrows it gradually; we do not).
R = 0 reuses everything (`independent`); R = 1 recomputes everything (the full prefill).
"""

from __future__ import annotations

import torch

from attention_store.policies.base import RecomputeContext, register
from attention_store.policies.independent import RecoveryBase

CHECK_LAYER = 1  # the second decoder layer: early, as CacheBlend picks it, and past the first's special role


@register("blend")
class Blend(RecoveryBase):
    def __init__(self, arg: str | None = None):
        try:
            ratio = float(arg) if arg is not None else float("nan")
        except ValueError:
            ratio = float("nan")
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"policy blend needs a recompute ratio between 0 and 1, e.g. blend:0.15 (got blend:{arg})")
        super().__init__()
        self.ratio = ratio

    @property
    def spec(self) -> str:
        return f"blend:{self.ratio:g}"

    def recompute_set(self, ctx: RecomputeContext) -> torch.Tensor:
        n = ctx.positions.numel()
        k = round(self.ratio * n)
        if k == 0:
            return torch.zeros(0, dtype=torch.long)
        if k >= n:
            return torch.arange(n)
        return ctx.deviation(CHECK_LAYER).topk(k).indices.sort().values
