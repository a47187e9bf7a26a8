"""Encode a schema's modules into KV entries at their reserved positions, in one masked pass.

The schema's tokens are laid out in document order (every union member, parameter scaffolds, no
`cache="false"` module) and run through the model once, in chunks, with an attention mask that
says what each token may see under the encoding policy:

- `independent` (the paper's model, the default): a module's tokens see the module's own earlier
  tokens and the schema's leading root text (BOS and the text before the first module), which acts
  as an attention sink: without it the first tokens of every module would have nothing to attend
  to but themselves, unlike anything the model saw in training.
- `schema` (what the authors' code did): a token sees every earlier token of the schema except
  members of a union it is not in; after a union, tokens see its scaffold member (or no member).

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
from attention_store.policies import DEFAULT_POLICY, POLICIES
from attention_store.entry import KVEntry
from attention_store.dtypes import dtype_name
from attention_store.keys import entry_key

log = logging.getLogger(__name__)

ROOT = ""  # unit path of the schema's root-level text
CHUNK = 512  # tokens per forward call while encoding: bounds activation memory, drives progress


@dataclass(frozen=True)
class EncodePlan:
    """The schema's encode sequence and its attention pattern (plain data, no model)."""

    schema: str
    policy: str
    token_ids: torch.Tensor  # [N] int64
    positions: torch.Tensor  # [N] int64, reserved position of each token
    replaceable: torch.Tensor  # [N] bool, parameter scaffold tokens
    unit_of: tuple[str, ...]  # [N] unit path of each token ("" = root text)
    units: dict[str, torch.Tensor]  # unit path -> indices into the sequence, in order
    allowed: torch.Tensor  # [N, N] bool, allowed[q, k]: token q attends to token k
    key_memo: dict = field(default_factory=dict, compare=False, repr=False)  # unit_key results

    def context(self, unit: str) -> torch.Tensor:
        """Bool [N]: tokens outside `unit` that some token of `unit` attends to."""
        seen = self.allowed[self.units[unit]].any(dim=0)
        seen[self.units[unit]] = False
        return seen


def _chain(path: str) -> list[str]:
    """Module paths from the outermost ancestor down to `path` itself."""
    if path == ROOT:
        return []
    parts = path.split("/")
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def plan(layout, policy: str = DEFAULT_POLICY, sink: bool = True) -> EncodePlan:
    """Lay out every cacheable token of the schema and the mask the policy implies.

    `sink=False` drops the leading root text from what `independent` modules see (each module then
    attends to itself alone); it exists to measure the sink's effect (experiments/sink.py).
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown encoding policy {policy!r}: choose one of {', '.join(POLICIES)}")
    modules = layout.modules
    ids, pos, repl, owner = [], [], [], []
    for seg in layout.segments:
        if seg.kind == "module" or (seg.path != ROOT and not modules[seg.path].cache):
            continue
        ids += seg.token_ids
        pos += range(seg.start, seg.start + len(seg.token_ids))
        repl += [seg.kind == "parameter"] * len(seg.token_ids)
        owner += [seg.path] * len(seg.token_ids)
    n = len(ids)
    names = list(dict.fromkeys(owner))
    number = {name: i for i, name in enumerate(names)}
    unit_idx = torch.tensor([number[o] for o in owner], dtype=torch.long)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    same = unit_idx[:, None] == unit_idx[None, :]
    if policy == "independent":
        first_module = min((m.start for m in modules.values()), default=layout.length)
        leading = torch.tensor([sink and o == ROOT and p < first_module for o, p in zip(owner, pos)],
                               dtype=torch.bool)
        allowed = causal & (same | leading[None, :])
    else:
        visible = torch.tensor([[_union_visible(modules, q, k) for k in names] for q in names], dtype=torch.bool)
        allowed = causal & visible[unit_idx][:, unit_idx]
    units = {name: (unit_idx == i).nonzero().flatten() for i, name in enumerate(names)}
    return EncodePlan(layout.schema_name, policy, torch.tensor(ids, dtype=torch.long),
                      torch.tensor(pos, dtype=torch.long), torch.tensor(repl, dtype=torch.bool),
                      tuple(owner), units, allowed)


def _union_visible(modules, q: str, k: str) -> bool:
    """Under `schema`: may tokens owned by `q` see (earlier) tokens owned by `k`? Only unions forbid."""
    q_chain = set(_chain(q))
    for member in _chain(k):
        union = modules[member].union
        if union is None or member in q_chain:
            continue
        inside_union = any(modules[m].union == union for m in q_chain)
        if inside_union or not modules[member].scaffold:
            return False
    return True


def context_digest(p: EncodePlan, unit: str) -> str:
    """Hash of what `unit` attended to: ids, positions and owners of the visible outside tokens.

    Both policies' visibility is transitively closed (what a visible token saw is visible too), so
    this names everything that influenced the unit's states besides its own tokens.
    """
    seen = p.context(unit).nonzero().flatten().tolist()
    h = hashlib.sha256(p.policy.encode())
    h.update(np.asarray(p.token_ids[seen], dtype=np.int64).tobytes())
    h.update(np.asarray(p.positions[seen], dtype=np.int64).tobytes())
    h.update("\0".join(p.unit_of[i] for i in seen).encode())
    return h.hexdigest()


def unit_key(p: EncodePlan, unit: str, lm, dtype: torch.dtype):
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
        policy=p.policy,
    )


def encode_units(p: EncodePlan, lm, units: list[str], dtype: torch.dtype,
                 progress: Callable[[int, int], None] | None = None) -> list[KVEntry]:
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
    allowed = p.allowed[needed][:, needed]
    cache = adapter.new_cache()
    total = needed.numel()
    for lo in range(0, total, CHUNK):
        hi = min(lo + CHUNK, total)
        adapter.forward(lm.model, p.token_ids[needed[lo:hi]], p.positions[needed[lo:hi]], cache,
                        p.positions[needed[:lo]], allowed=allowed[lo:hi, :hi], last_only=True)
        if progress is not None:
            progress(hi, total)
    keys, values = adapter.cache_kv(cache)
    where = torch.full((len(p.unit_of),), -1, dtype=torch.long)
    where[needed] = torch.arange(total)
    entries = []
    for u in units:
        idx = p.units[u]
        at = where[idx].to(keys[0].device)
        k = tuple(layer[:, :, at].to(dtype).contiguous() for layer in keys)
        v = tuple(layer[:, :, at].to(dtype).contiguous() for layer in values)
        entries.append(KVEntry.create(
            key=unit_key(p, u, lm, dtype), schema=p.schema, module=u, model=lm.name,
            model_fingerprint=lm.fingerprint, policy=p.policy, keys=k, values=v,
            token_ids=p.token_ids[idx].clone(), positions=p.positions[idx].clone(),
            replaceable=p.replaceable[idx].clone()))
    return entries


def ensure_encoded(p: EncodePlan, lm, store, dtype: torch.dtype, units: list[str] | None = None,
                   progress: Callable[[int, int], None] | None = None) -> dict[str, KVEntry]:
    """Entries for `units` (default: all), from the store where present, encoded and stored otherwise."""
    found: dict[str, KVEntry] = {}
    missing = []
    for u in p.units if units is None else units:
        entry, _tier = store.get(unit_key(p, u, lm, dtype), expect=(p.token_ids[p.units[u]], p.positions[p.units[u]]))
        if entry is None:
            missing.append(u)
        else:
            found[u] = entry
    if missing:
        log.info("encoding %d module(s) of schema %r not in the store: %s", len(missing), p.schema,
                 ", ".join(m or "(root text)" for m in missing))
        for entry in encode_units(p, lm, missing, dtype, progress):
            store.put(entry)
            found[entry.meta.module] = entry
    return found
