"""Encode a schema's modules into KV entries at their reserved positions, in one masked pass.

The schema's tokens are laid out in document order (every union member, parameter scaffolds, no
`cache="false"` module) and run through the model once, in chunks, with an attention mask that
says what each token may see under the encoding policy (`attention_store.policies`: `independent`,
the paper's and the default; `independent:nosink`; `schema`, what the authors' code did).

The plan keeps visibility per token *group* (a unit's own text, root text split at the first
module), not per token pair: the mask rows of one chunk are built when that chunk runs, so planning
memory grows with the number of units, not with tokens squared.

The resulting KV per unit (root text, or one module's own tokens) is sliced out and becomes one
store entry, keyed by everything that changed its bytes, including a digest of what it attended to.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from attention_store import adapter
from attention_store.dtypes import dtype_name
from attention_store.entry import KVEntry
from attention_store.keys import EntryKey, entry_key
from attention_store.policies import DEFAULT_POLICY, ROOT, EncodingPolicy, Group, get_policy

log = logging.getLogger(__name__)

CHUNK = 512  # tokens per forward call while encoding: bounds activation memory, drives progress
Progress = Callable[[int, int], None]  # (tokens done, tokens in all)


@dataclass(frozen=True)
class EncodePlan:
    """The schema's encode sequence and its attention pattern (plain data, no model).

    `allowed(rows, cols)` gives the bool mask `[len(rows), len(cols)]` between any tokens of the
    sequence: causal, and `visible` between their groups.
    """

    schema: str
    policy: EncodingPolicy
    token_ids: torch.Tensor  # [N] int64
    positions: torch.Tensor  # [N] int64, reserved position of each token
    replaceable: torch.Tensor  # [N] bool, parameter scaffold tokens
    unit_of: tuple[str, ...]  # [N] unit path of each token ("" = root text)
    units: dict[str, torch.Tensor]  # unit path -> indices into the sequence, in order
    group: torch.Tensor  # [N] int64, index into `groups` of each token
    groups: tuple[Group, ...]  # [G]
    visible: torch.Tensor  # [G, G] bool, the policy's answer per pair of groups
    key_memo: dict = field(default_factory=dict, compare=False, repr=False)  # unit_key results

    def allowed(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Bool `[len(rows), len(cols)]`: may sequence token `rows[i]` attend to token `cols[j]`?"""
        causal = rows[:, None] >= cols[None, :]
        return causal & self.visible[self.group[rows]][:, self.group[cols]]

    def context(self, unit: str) -> torch.Tensor:
        """Bool [N]: tokens outside `unit` that some token of `unit` attends to."""
        idx = self.units[unit]
        seen = torch.zeros(len(self.unit_of), dtype=torch.bool)
        order = torch.arange(len(self.unit_of))
        for g in self.group[idx].unique().tolist():
            last = int(idx[self.group[idx] == g].max())  # causal: keys up to the group's last token
            seen |= self.visible[g][self.group] & (order <= last)
        seen[idx] = False
        return seen


def plan(layout, policy: str | EncodingPolicy = DEFAULT_POLICY) -> EncodePlan:
    """Lay out every cacheable token of the schema and the visibility its encoding policy implies."""
    policy = get_policy(policy)
    modules = layout.modules
    ids, pos, repl, owner = [], [], [], []
    for seg in layout.segments:
        if seg.kind == "module" or (seg.path != ROOT and not modules[seg.path].cache):
            continue
        ids += seg.token_ids
        pos += range(seg.start, seg.start + len(seg.token_ids))
        repl += [seg.kind == "parameter"] * len(seg.token_ids)
        owner += [seg.path] * len(seg.token_ids)
    first_module = min((m.start for m in modules.values()), default=layout.length)
    token_groups = [Group(o, leading=o == ROOT and p < first_module) for o, p in zip(owner, pos)]
    groups = tuple(dict.fromkeys(token_groups))
    number = {g: i for i, g in enumerate(groups)}
    visible = torch.from_numpy(np.asarray(policy.visible(groups, modules), dtype=bool))
    if visible.shape != (len(groups), len(groups)) or not bool(visible.diagonal().all()):
        raise ValueError(f"{policy!r}.visible returned {tuple(visible.shape)} for {len(groups)} groups, "
                         "or hid a group from itself")
    names = list(dict.fromkeys(owner))
    unit_idx = {name: [] for name in names}
    for i, o in enumerate(owner):
        unit_idx[o].append(i)
    return EncodePlan(layout.schema_name, policy, torch.tensor(ids, dtype=torch.long),
                      torch.tensor(pos, dtype=torch.long), torch.tensor(repl, dtype=torch.bool), tuple(owner),
                      {u: torch.tensor(i, dtype=torch.long) for u, i in unit_idx.items()},
                      torch.tensor([number[g] for g in token_groups], dtype=torch.long), groups, visible)


def context_digest(p: EncodePlan, unit: str) -> str:
    """Hash of what `unit` attended to: ids, positions and owners of the visible outside tokens.

    A policy's visibility is transitively closed for the built-in ones (what a visible token saw is
    visible too), so this names everything that influenced the unit's states besides its own tokens.
    """
    seen = p.context(unit).nonzero().flatten().tolist()
    h = hashlib.sha256(p.policy.key_spec.encode())
    h.update(np.asarray(p.token_ids[seen], dtype=np.int64).tobytes())
    h.update(np.asarray(p.positions[seen], dtype=np.int64).tobytes())
    h.update("\0".join(p.unit_of[i] for i in seen).encode())
    return h.hexdigest()


def unit_key(p: EncodePlan, unit: str, lm, dtype: torch.dtype) -> EntryKey:
    """The store key of `unit`'s states for this model and storage dtype (memoized on the plan)."""
    memo = (unit, lm.fingerprint, lm.tokenizer.fingerprint, dtype)
    if memo not in p.key_memo:
        p.key_memo[memo] = _unit_key(p, unit, lm, dtype)
    return p.key_memo[memo]


def _unit_key(p: EncodePlan, unit: str, lm, dtype: torch.dtype):
    idx = p.units[unit]
    return entry_key(
        model_fingerprint=lm.fingerprint,
        tokenizer_fingerprint=lm.tokenizer.fingerprint,
        dtype=dtype_name(dtype),
        token_ids=p.token_ids[idx].tolist(),
        position_ids=p.positions[idx].tolist(),
        context=context_digest(p, unit),
        policy=p.policy.key_spec,
    )


def encode_units(p: EncodePlan, lm, units: list[str], dtype: torch.dtype,
                 progress: Progress | None = None) -> list[KVEntry]:
    """Compute the entries of `units`, running only their tokens and what they attend to.

    One forward over the needed tokens in sequence order, `CHUNK` tokens per call, each chunk over
    the cache of the earlier ones with its rows of the plan's mask.
    """
    if not units:
        return []
    want = torch.zeros(len(p.unit_of), dtype=torch.bool)
    for u in units:
        want[p.units[u]] = True
        want |= p.context(u)
    needed = want.nonzero().flatten()  # [M] indices into the plan, in sequence order
    cache = adapter.new_cache()
    total = needed.numel()
    for lo in range(0, total, CHUNK):
        hi = min(lo + CHUNK, total)
        adapter.forward(lm.model, p.token_ids[needed[lo:hi]], p.positions[needed[lo:hi]], cache,
                        p.positions[needed[:lo]], allowed=p.allowed(needed[lo:hi], needed[:hi]),
                        last_only=True)
        if progress is not None:
            progress(hi, total)
    keys, values = adapter.cache_kv(cache)
    where = torch.full((len(p.unit_of),), -1, dtype=torch.long)
    where[needed] = torch.arange(total)
    entries = []
    for u in units:
        idx = p.units[u]
        at = where[idx]
        # Index each layer on its own device: under a device map the layers live on several.
        k = tuple(layer[:, :, at.to(layer.device)].to(dtype).contiguous() for layer in keys)
        v = tuple(layer[:, :, at.to(layer.device)].to(dtype).contiguous() for layer in values)
        entries.append(KVEntry.create(
            key=unit_key(p, u, lm, dtype), schema=p.schema, module=u, model=lm.name,
            model_fingerprint=lm.fingerprint, policy=p.policy.key_spec, keys=k, values=v,
            token_ids=p.token_ids[idx].clone(), positions=p.positions[idx].clone(),
            replaceable=p.replaceable[idx].clone()))
    return entries


def lookup(p: EncodePlan, lm, store, dtype: torch.dtype, units: list[str] | None = None,
           defer: bool = False) -> tuple[dict[str, KVEntry], list[str]]:
    """`(found, missing)`: stored entries of `units` (default: all), and the units not in the store.
    `defer`: disk hits may be opened `EntryFile`s (`AttentionStore.get`), for an assembly into buffers."""
    found: dict[str, KVEntry] = {}
    missing = []
    for u in p.units if units is None else units:
        entry, _tier = store.get(unit_key(p, u, lm, dtype), expect=(p.token_ids[p.units[u]], p.positions[p.units[u]]),
                                 defer=defer)
        if entry is None:
            missing.append(u)
        else:
            found[u] = entry
    return found, missing


def encode_missing(p: EncodePlan, lm, store, dtype: torch.dtype, missing: list[str],
                   progress: Progress | None = None) -> dict[str, KVEntry]:
    """Encode `missing` units, put them into `store`, and return them by unit."""
    if not missing:
        return {}
    log.info("encoding %d module(s) of schema %r not in the store: %s", len(missing), p.schema,
             ", ".join(m or "(root text)" for m in missing))
    out = {}
    for entry in encode_units(p, lm, missing, dtype, progress):
        store.put(entry)
        out[entry.meta.module] = entry
    return out


def ensure_encoded(p: EncodePlan, lm, store, dtype: torch.dtype, units: list[str] | None = None,
                   progress: Progress | None = None) -> dict[str, KVEntry]:
    """Entries for `units` (default: all), from the store where present, encoded and stored otherwise."""
    found, missing = lookup(p, lm, store, dtype, units)
    return {**found, **encode_missing(p, lm, store, dtype, missing, progress)}
