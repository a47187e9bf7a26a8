"""`link:K` (EPIC's LegoLink, Hu et al., ICML 2025): modules are stored as `independent`; at assembly
the first K tokens of every block after the first module are recomputed with attention to every
earlier assembled token.

A block is a run of cached tokens of one unit in position order: a module's own text, or root text
that follows a module. Blocks before the first module (the leading root text) and the first
module itself already saw everything before them. The first tokens of a block are where attention
sinks form; recomputing them links a block to what precedes it. With K at least every block's
length this is the `schema` policy's states for a prompt that selects modules in schema order.
"""

from __future__ import annotations

import torch

from attention_store.policies.base import ROOT, RecomputeContext, register
from attention_store.policies.independent import RecoveryBase


@register("link")
class Link(RecoveryBase):
    def __init__(self, arg: str | None = None):
        if arg is None or not arg.isdigit():
            raise ValueError(f"policy link needs a token count, e.g. link:16 (got link:{arg})")
        super().__init__()
        self.k = int(arg)

    @property
    def spec(self) -> str:
        return f"link:{self.k}"

    def recompute_set(self, ctx: RecomputeContext) -> torch.Tensor:
        first_module = next((i for i, (unit, _) in enumerate(ctx.blocks) if unit != ROOT), len(ctx.blocks))
        picked = [idx[: self.k] for _, idx in ctx.blocks[first_module + 1:]]
        return torch.cat(picked).sort().values if picked else torch.zeros(0, dtype=torch.long)
