"""`independent` (the paper's model): a module sees its own text and the schema's leading root text.

The leading root text (BOS and any text before the first module) is an attention sink: without it
the first tokens of every module would attend to nothing but themselves, unlike anything the model
saw in training (measured in docs/RESULTS.md#attention-sink). `independent:nosink` drops it, to
measure exactly that.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from attention_store.policies.base import EncodingPolicy, Group, register


@register("independent")
class Independent(EncodingPolicy):
    def __init__(self, arg: str | None = None):
        if arg not in (None, "nosink"):
            raise ValueError(f"policy independent takes no argument or 'nosink' (got independent:{arg})")
        self.sink = arg is None

    @property
    def spec(self) -> str:
        return "independent" if self.sink else "independent:nosink"

    def visible(self, groups: Sequence[Group], modules: Mapping[str, Any]) -> np.ndarray:
        units = np.array([g.unit for g in groups], dtype=object)
        out = units[:, None] == units[None, :]
        if self.sink:
            out |= np.array([g.leading for g in groups])[None, :]
        return out


class RecoveryBase(Independent):
    """A recovery policy: encodes (and keys its entries) exactly like `independent`, then recomputes
    some cached tokens at assembly (`recompute_set`), so it shares independent's stored states."""

    needs_assembly = True

    def __init__(self):
        super().__init__(None)

    @property
    def key_spec(self) -> str:
        return "independent"
