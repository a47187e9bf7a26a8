"""The encoding-policy interface and its registry: what a cached unit attends to when it is encoded.

A schema's cacheable tokens are encoded in one masked pass (`attention_store.encoder`). Tokens are
grouped: one group per module's own text, and the schema's root text split in two, its *leading*
part (BOS and the text before the first module, which serves as an attention sink) and the rest.
A policy answers one question per pair of groups: may tokens of group q attend to (earlier) tokens
of group k? The token mask is then `causal & visible[group[q], group[k]]`, built a chunk of rows at
a time, so planning memory grows with groups squared, not tokens squared.

A new policy is one file with a subclass and `@register("name")`; `get_policy("name:arg")` builds
it. Its `spec` (name plus argument) goes into every store key of the states it produces.

Example:
    >>> from attention_store.policies import get_policy
    >>> get_policy("independent:nosink").spec
    'independent:nosink'
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

if TYPE_CHECKING:
    import torch

ROOT = ""  # unit path of the schema's root-level text


@dataclass(frozen=True)
class Group:
    """Tokens that a policy treats alike: one unit's own text (root text split at the first module)."""

    unit: str  # unit path: ROOT for root text, else the module path `a/b/c`
    leading: bool = False  # root text before the first module (BOS included): the attention sink


class RecomputeContext(Protocol):
    """What a recovery policy may ask about an assembled prompt (the runtime provides it)."""

    positions: "torch.Tensor"  # [n] position id of every cached token, in cache order
    blocks: list[tuple[str, "torch.Tensor"]]  # (unit, cache indices) per run of one unit, by position

    def deviation(self, layer: int) -> "torch.Tensor":
        """[n] how far each cached token's values at `layer` are from a full-context forward's."""


class EncodingPolicy(abc.ABC):
    """What a unit's tokens may attend to while the schema is encoded.

    Subclasses set `name` and implement `visible`; `arg` is the text after `name:` in a spec (None
    if absent). A policy that must do work when a prompt is assembled (recomputing some cached
    tokens, for example) sets `needs_assembly = True`; the encoding-only policies here do not.
    """

    name: ClassVar[str]
    needs_assembly: ClassVar[bool] = False

    def __init__(self, arg: str | None = None):
        if arg is not None:
            raise ValueError(f"policy {self.name!r} takes no argument (got {self.name}:{arg})")

    @property
    def spec(self) -> str:
        """Name and argument as the user writes it."""
        return self.name

    @property
    def key_spec(self) -> str:
        """What goes into store keys: the spec of the policy whose *stored states* this one uses.

        A recovery policy that encodes like `independent` and only acts at assembly returns
        "independent", so it shares those entries instead of storing the same bytes again.
        """
        return self.spec

    def recompute_set(self, ctx: "RecomputeContext") -> "torch.Tensor":
        """Indices into the assembled cache to recompute with attention to every earlier cached token.

        Called only when `needs_assembly` is True.
        """
        raise NotImplementedError(f"policy {self.spec} does no work at assembly")

    @abc.abstractmethod
    def visible(self, groups: Sequence[Group], modules: Mapping[str, Any]) -> np.ndarray:
        """Bool `[G, G]`: may tokens of `groups[q]` attend to earlier tokens of `groups[k]`?

        `modules` is `Layout.modules` (path -> ModuleLayout with `union`, `scaffold`). Tokens always
        see earlier tokens of their own group; the diagonal must be True.
        """

    def __repr__(self) -> str:
        return f"<policy {self.spec}>"


_REGISTRY: dict[str, Callable[[str | None], EncodingPolicy]] = {}


def register(name: str):
    """Class decorator: make `cls` available as `get_policy(name)` / `get_policy(f"{name}:ARG")`."""

    def add(cls):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"encoding policy {name!r} is already registered")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return add


def unregister(name: str) -> None:
    """Remove a registered policy (tests register their own and clean up)."""
    _REGISTRY.pop(name, None)


def policy_names() -> list[str]:
    """Registered policy names, sorted."""
    return sorted(_REGISTRY)


def get_policy(spec: "str | EncodingPolicy") -> EncodingPolicy:
    """The policy named by `spec` (`name` or `name:arg`); a ValueError naming the choices otherwise."""
    if isinstance(spec, EncodingPolicy):
        return spec
    name, sep, arg = str(spec).partition(":")
    if name not in _REGISTRY:
        raise ValueError(f"unknown encoding policy {spec!r}: choose one of {', '.join(policy_names())}")
    return _REGISTRY[name](arg if sep else None)
