"""Recovery at assembly: recompute a chosen set of cached tokens with attention to every earlier one.

Independent encoding loses cross-module attention. The recovery policies (`blend:R`, `link:K` in
`attention_store.policies`) choose which assembled tokens to recompute; this module does it, the
same way for both: the chosen tokens run as new tokens over a cache of the others' reused states,
each seeing every cached token before it by position (and the chosen ones causally), layer by
layer, so at every layer they attend to the fused states. The rest keep their stored states bit
for bit. The fresh prompt tokens then attend to the fused cache as usual.
"""

from __future__ import annotations

import dataclasses

import torch

from attention_store import adapter
from attention_store.policies import EncodingPolicy
from prompt_cache.assembler import Assembled


class RecomputeContext:
    """What a policy may ask about an assembled prompt; the deviation probe runs at most once."""

    def __init__(self, lm, ready: Assembled):
        self.lm = lm
        self.ready = ready
        self.positions = ready.cache_positions  # [n]
        self.order = self.positions.argsort()  # cache indices in position order
        self.units = ready.cache_units  # [n] unit path of every cached token
        self.blocks = _blocks(self.units, self.order)
        self.probe_layer: int | None = None
        self.probe_kv: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    def deviation(self, layer: int) -> torch.Tensor:
        """[n] squared L2 distance of each token's values at `layer` from a full-context forward's."""
        ids, pos = self.ready.cache_ids[self.order], self.positions[self.order]
        cache = adapter.forward_until(self.lm.model, ids, pos, layer)
        keys, values = adapter.cache_kv(cache)
        back = self.order.argsort()  # position order -> cache order
        self.probe_layer = layer
        self.probe_kv = ([k[:, :, back] for k in keys], [v[:, :, back] for v in values])
        reused = adapter.cache_kv(self.ready.cache)[1][layer]
        return (self.probe_kv[1][layer].float() - reused.float()).pow(2).sum(dim=(0, 1, 3)).cpu()  # [n]


def _blocks(units: tuple[str, ...], order: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Runs of one unit in position order: (unit, cache indices)."""
    blocks: list[tuple[str, list[int]]] = []
    for i in order.tolist():
        if blocks and blocks[-1][0] == units[i]:
            blocks[-1][1].append(i)
        else:
            blocks.append((units[i], [i]))
    return [(u, torch.tensor(idx, dtype=torch.long)) for u, idx in blocks]


def recompute(lm, ready: Assembled, policy: EncodingPolicy) -> Assembled:
    """`ready` with the policy's chosen cached tokens recomputed (their positions in `.recomputed`)."""
    ctx = RecomputeContext(lm, ready)
    chosen = policy.recompute_set(ctx).to(torch.long)
    if chosen.numel() == 0:
        return dataclasses.replace(ready, recomputed=chosen)  # empty
    n = ready.cached_tokens
    keep = torch.ones(n, dtype=torch.bool)
    keep[chosen] = False
    rest = keep.nonzero().flatten()
    keys, values = adapter.cache_kv(ready.cache)
    keys, values = list(keys), list(values)
    if ctx.probe_kv is not None:  # layers up to the probe's are exact for every token: keep them
        for i in range(ctx.probe_layer + 1):
            keys[i], values[i] = ctx.probe_kv[0][i], ctx.probe_kv[1][i]
    # Gathers make new tensors: the stored entries behind the assembled cache are never written.
    room = adapter.room(ready.cache)  # keep the assembled cache's preallocation, if it had one
    cache = adapter.new_cache([k[:, :, rest.to(k.device)] for k in keys], [v[:, :, rest.to(v.device)] for v in values],
                              reserve=None if room is None else room + chosen.numel())
    pos, ids = ready.cache_positions, ready.cache_ids
    q_pos, r_pos = pos[chosen], pos[rest]
    allowed = torch.cat([r_pos[None, :] < q_pos[:, None], q_pos[None, :] <= q_pos[:, None]], dim=1)
    adapter.forward(lm.model, ids[chosen], q_pos, cache, r_pos, allowed=allowed, last_only=True)
    units = ctx.units
    return dataclasses.replace(
        ready, cache=cache, cache_positions=torch.cat([r_pos, q_pos]), cache_ids=torch.cat([ids[rest], ids[chosen]]),
        cache_spans=tuple((units[i], 1) for i in torch.cat([rest, chosen]).tolist()), recomputed=q_pos.sort().values)

