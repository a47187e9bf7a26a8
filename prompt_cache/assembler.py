"""Assemble a prompt's cache from stored module states, and list the tokens still to compute.

Given a bound prompt (selected modules, parameter values, new text), the cached states of the
schema's root text and of every selected cacheable module are concatenated into one transformers
cache, each token keeping its reserved position. What remains is *fresh*: parameter values at their
slots (a scaffold is reused when the value is the scaffold itself), the text of `cache="false"`
modules, and the prompt's own text, placed after the schema's highest reserved position.

Fresh tokens attend to every assembled state and causally to each other, as in the paper: a
parameter value thus sees the module text around it, while cached text never sees the value.
The full-prefill baseline is `baseline_tokens`: the same token ids with contiguous positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from attention_store import adapter
from attention_store.encoder import ROOT, EncodePlan
from attention_store.direct import EntryFile
from attention_store.entry import KVEntry


@dataclass
class Assembled:
    """A ready cache plus the fresh tokens to prefill over it."""

    cache: object  # transformers DynamicCache, per layer [1, kv_heads, cached_tokens, head_dim]
    cache_positions: torch.Tensor  # [cached_tokens] position id of every cached state
    fresh_ids: torch.Tensor  # [fresh] token ids to compute, in order
    fresh_positions: torch.Tensor  # [fresh] their position ids
    next_position: int  # where decoding continues
    cache_ids: torch.Tensor | None = None  # [cached_tokens] token id of every cached state
    # (unit path, token count) per run of the cache, in cache order: which unit each cached state came
    # from, kept per run so assembly (the TTFT path) builds nothing per token; see `cache_units`.
    cache_spans: tuple[tuple[str, int], ...] = ()
    recomputed: torch.Tensor | None = None  # position ids of cached tokens recomputed at assembly (recovery)

    @property
    def cache_units(self) -> tuple[str, ...]:
        """[cached_tokens] the unit path of every cached state (expanded from `cache_spans`)."""
        return tuple(u for u, n in self.cache_spans for _ in range(n))

    @property
    def cached_tokens(self) -> int:
        return self.cache_positions.numel()


def used_units(p: EncodePlan, bound) -> list[str]:
    """Units whose stored states this prompt reuses: root text, then selected cacheable modules."""
    return [u for u in [ROOT, *bound.modules] if u in p.units]


def kept_tokens(layout, unit: str, entry: KVEntry, bound) -> torch.Tensor:
    """bool [entry tokens]: which of a stored unit's states this prompt reuses (all but the scaffold
    tokens of parameters that get another value)."""
    drop = entry.replaceable.clone()
    for seg in _slots(layout, unit):
        if _value(bound, unit, seg) == tuple(seg.token_ids):
            drop &= ~((entry.positions >= seg.start) & (entry.positions < seg.end))
    return ~drop


def _slots(layout, path: str):
    return [s for s in layout.segments if s.path == path and s.kind == "parameter"]


def _value(bound, path: str, seg) -> tuple[int, ...]:
    return tuple(bound.arguments.get((path, seg.name), seg.token_ids))


def fresh_tokens(layout, bound) -> tuple[list[int], list[int]]:
    """Ids and positions of everything not served from the store, in the order they are computed."""
    ids: list[int] = []
    pos: list[int] = []
    selected = set(bound.modules)
    for seg in layout.segments:
        if seg.path not in selected or seg.kind == "module":
            continue
        cached = layout.modules[seg.path].cache
        if seg.kind == "parameter":
            value = _value(bound, seg.path, seg)
            if cached and value == tuple(seg.token_ids):
                continue  # the stored scaffold is the value
        elif cached:
            continue
        else:
            value = tuple(seg.token_ids)
        ids += value
        pos += range(seg.start, seg.start + len(value))
    ids += bound.suffix_ids
    pos += range(layout.length, layout.length + len(bound.suffix_ids))
    return ids, pos


def assemble(layout, p: EncodePlan, bound, entries: dict[str, KVEntry], dtype: torch.dtype,
             device: torch.device | str | Sequence[torch.device | str] = "cpu", room: int | None = None) -> Assembled:
    """Concatenate the stored states this prompt uses into one cache (model dtype, model device).

    `device` is one device for every layer, or one per layer (`prompt_cache.models.layer_devices`)
    when the model is split across devices: layer i's K/V must be where layer i attends.
    `room`: tokens to be generated after the prompt. Given, the states are copied straight into
    preallocated buffers with room for the fresh tokens and those (`adapter.BufferedLayer`), so
    neither prefill nor decoding copies the cache again; None adopts views where it can.
    """
    # Each piece is a (start, end) run of an entry's tokens to keep: everything but the scaffold
    # tokens of parameters that get another value. Slicing runs makes views, so the one
    # concatenation below is the only copy of the states on the time-to-first-token path.
    pieces: list[tuple[KVEntry, int, int]] = []
    for unit in used_units(p, bound):
        pieces += [(entries[unit], lo, hi) for lo, hi in runs(kept_tokens(layout, unit, entries[unit], bound))]
    ids, pos = fresh_tokens(layout, bound)
    reserve = None if room is None else len(ids) + room
    if reserve is not None:
        cache, cache_positions = buffered(pieces, reserve, dtype, device)
    elif pieces:
        pieces = _loaded(pieces)  # views need the states in memory
        n_layers = len(pieces[0][0].keys)
        devices = _per_layer(device, n_layers)

        def layer(which: str, i: int) -> torch.Tensor:
            # Pieces may sit on another device than layer i (a memory tier on one device, a disk
            # load on CPU): move each to layer i's device before the concatenation.
            parts = [getattr(e, which)[i][:, :, lo:hi].to(devices[i]) for e, lo, hi in pieces]
            out = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
            return out.to(device=devices[i], dtype=dtype)

        cache = adapter.new_cache([layer("keys", i) for i in range(n_layers)],
                                  [layer("values", i) for i in range(n_layers)])
        cache_positions = torch.cat([e.positions[lo:hi] for e, lo, hi in pieces])
    else:
        cache, cache_positions = adapter.new_cache(), torch.zeros(0, dtype=torch.long)
    if pieces:
        cache_ids = torch.cat([e.token_ids[lo:hi] for e, lo, hi in pieces])
        cache_spans = tuple((e.meta.module, hi - lo) for e, lo, hi in pieces)
    else:
        cache_ids, cache_spans = torch.zeros(0, dtype=torch.long), ()
    return Assembled(cache, cache_positions, torch.tensor(ids, dtype=torch.long),
                     torch.tensor(pos, dtype=torch.long), layout.length + len(bound.suffix_ids),
                     cache_ids.cpu(), cache_spans)


def buffered(pieces: list[tuple[KVEntry | EntryFile, int, int]], reserve: int, dtype: torch.dtype,
             device: torch.device | str | Sequence[torch.device | str] = "cpu") -> tuple[object, torch.Tensor]:
    """A cache of preallocated layers holding the `(entry, lo, hi)` runs in order (one copy, straight
    into buffers with `reserve` free slots), and the runs' positions. An opened `EntryFile` (a disk
    hit, `AttentionStore.get(defer=True)`) is read from its file straight into the buffers where
    they are on the CPU (`attention_store.direct`), and loaded whole first elsewhere; a damaged one
    raises `DamagedEntry`."""
    if not pieces:
        return adapter.new_cache(reserve=reserve), torch.zeros(0, dtype=torch.long)
    devices = _per_layer(device, pieces[0][0].num_layers)
    positions = torch.cat([e.positions[lo:hi] for e, lo, hi in pieces])
    if any(d.type != "cpu" for d in devices):
        pieces = _loaded(pieces)
    if not any(isinstance(e, EntryFile) for e, _, _ in pieces):
        part = lambda which, i: [getattr(e, which)[i][:, :, lo:hi] for e, lo, hi in pieces]  # noqa: E731 (views)
        return adapter.buffered_cache([part("keys", i) for i in range(len(devices))],
                                      [part("values", i) for i in range(len(devices))], reserve, dtype, devices), positions
    shape = pieces[0][0].layer_shape if isinstance(pieces[0][0], EntryFile) else tuple(pieces[0][0].keys[0].shape)
    like = torch.empty((*shape[:2], 0, shape[3]), dtype=dtype)
    cache = adapter.new_cache(reserve=reserve)
    cache.layers = [adapter.BufferedLayer.filled(like, positions.numel(), reserve, dtype, d) for d in devices]
    spans: dict[int, tuple[EntryFile, list[tuple[int, int, int]]]] = {}
    at = 0
    for e, lo, hi in pieces:
        if isinstance(e, EntryFile):
            spans.setdefault(id(e), (e, []))[1].append((lo, hi, at))
        else:
            for layer, k, v in zip(cache.layers, e.keys, e.values, strict=True):
                layer._k[:, :, at:at + hi - lo].copy_(k[:, :, lo:hi])
                layer._v[:, :, at:at + hi - lo].copy_(v[:, :, lo:hi])
        at += hi - lo
    for f, runs_of_f in spans.values():
        f.read_into([layer._k for layer in cache.layers], [layer._v for layer in cache.layers], runs_of_f)
    return cache, positions


def _loaded(pieces: list[tuple[KVEntry | EntryFile, int, int]]) -> list[tuple[KVEntry, int, int]]:
    """`pieces` with every opened `EntryFile` read whole (once each)."""
    loaded: dict[int, KVEntry] = {}
    for e, _, _ in pieces:
        if isinstance(e, EntryFile) and id(e) not in loaded:
            loaded[id(e)] = e.load()
    return [(loaded.get(id(e), e), lo, hi) for e, lo, hi in pieces]


def _per_layer(device, n_layers: int) -> list[torch.device]:
    """One device per layer: a single device repeated, or the given list checked against the layer count."""
    if isinstance(device, (str, torch.device)):
        return [torch.device(device)] * n_layers
    devices = [torch.device(d) for d in device]
    if n_layers and len(devices) != n_layers:
        raise ValueError(f"{len(devices)} layer devices given for entries with {n_layers} layers")
    return devices


def runs(keep: torch.Tensor) -> list[tuple[int, int]]:
    """Maximal runs of True in a bool [T] tensor, as (start, end) pairs."""
    flags = keep.tolist()
    runs, start = [], None
    for i, f in enumerate(flags + [False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            runs.append((start, i))
            start = None
    return runs


def baseline_tokens(layout, bound) -> list[int]:
    """The prompt as one ordinary sequence: the same token ids, in layout order, then the new text."""
    ids: list[int] = []
    selected = set(bound.modules)
    for seg in layout.segments:
        if seg.kind == "module" or (seg.path != ROOT and seg.path not in selected):
            continue
        ids += _value(bound, seg.path, seg) if seg.kind == "parameter" else seg.token_ids
    return ids + list(bound.suffix_ids)
