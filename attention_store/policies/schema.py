"""`schema` (what the authors' code did): a module sees every earlier token of the schema except
members of unions it is not part of; after a union, tokens see its scaffold member (or no member).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from attention_store.policies.base import ROOT, EncodingPolicy, Group, register


def module_chain(path: str) -> list[str]:
    """Module paths from the outermost ancestor down to `path` itself (none for root text)."""
    if path == ROOT:
        return []
    parts = path.split("/")
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


@register("schema")
class SchemaContext(EncodingPolicy):
    def visible(self, groups: Sequence[Group], modules: Mapping[str, Any]) -> np.ndarray:
        out = np.ones((len(groups), len(groups)), dtype=bool)
        # Only a key inside some union can be hidden; other columns stay all True (cheap for big schemas).
        for ki, k in enumerate(groups):
            if any(modules[m].union is not None for m in module_chain(k.unit)):
                out[:, ki] = [_union_visible(modules, q.unit, k.unit) for q in groups]
        return out


def _union_visible(modules: Mapping[str, Any], q: str, k: str) -> bool:
    """May tokens owned by `q` see (earlier) tokens owned by `k`? Only unions forbid."""
    q_chain = set(module_chain(q))
    for member in module_chain(k):
        union = modules[member].union
        if union is None or member in q_chain:
            continue
        inside_union = any(modules[m].union == union for m in q_chain)
        if inside_union or not modules[member].scaffold:
            return False
    return True
