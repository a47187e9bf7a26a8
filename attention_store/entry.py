"""One stored entry: the KV states of one unit (module or root text) and its index row.

KV layout, per layer: keys and values are `[1, kv_heads, tokens, head_dim]` (batch 1), as in
transformers; `kv_heads = num_key_value_heads` and `head_dim` come from the model config.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence

import torch

from attention_store.dtypes import dtype_name
from attention_store.keys import EntryKey


@dataclasses.dataclass(frozen=True)
class EntryMeta:
    """The index row of one stored entry: plain data, no tensors."""

    key: EntryKey
    schema: str  # schema name
    module: str  # module path inside the schema (`a/b/c`)
    model: str  # model display name
    model_fingerprint: str
    policy: str  # encoding policy (e.g. how modules attend to each other)
    dtype: str  # storage dtype, e.g. "float16"
    tokens: int  # T
    nbytes: int  # bytes of keys + values

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EntryMeta:
        d = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        if set(d) != names:
            raise ValueError(f"entry metadata fields {sorted(d)} != {sorted(names)}")
        d["key"] = EntryKey(d["key"])
        return cls(**d)


@dataclasses.dataclass
class KVEntry:
    """The attention states of one module: per layer keys/values `[1, kv_heads, T, head_dim]`.

    `token_ids`, `positions` and `replaceable` are `[T]`; `replaceable` marks the parameter
    scaffold tokens the assembler overwrites with argument states.
    """

    meta: EntryMeta
    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    token_ids: torch.Tensor  # LongTensor [T]
    positions: torch.Tensor  # LongTensor [T]
    replaceable: torch.Tensor  # BoolTensor [T]

    def __post_init__(self) -> None:
        self.keys, self.values = tuple(self.keys), tuple(self.values)
        if not self.keys or len(self.keys) != len(self.values):
            raise ValueError(f"KVEntry needs one keys and one values tensor per layer; got "
                             f"{len(self.keys)} keys, {len(self.values)} values")
        shape, dtype = self.keys[0].shape, self.keys[0].dtype
        if len(shape) != 4 or shape[0] != 1:
            raise ValueError(f"KVEntry keys must be [1, kv_heads, T, head_dim]; got {tuple(shape)}")
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k.shape != shape or v.shape != shape or k.dtype != dtype or v.dtype != dtype:
                raise ValueError(f"KVEntry layer {i}: keys {tuple(k.shape)} {k.dtype}, values {tuple(v.shape)} "
                                 f"{v.dtype}; every layer must be {tuple(shape)} {dtype}")
        t = shape[2]
        for name, tensor, want in (("token_ids", self.token_ids, torch.long), ("positions", self.positions, torch.long),
                                   ("replaceable", self.replaceable, torch.bool)):
            if tensor.shape != (t,) or tensor.dtype != want:
                raise ValueError(f"KVEntry {name} must be {want} [{t}]; got {tensor.dtype} {tuple(tensor.shape)}")
        if self.meta.tokens != t or self.meta.dtype != dtype_name(dtype) or self.meta.nbytes != self.nbytes:
            raise ValueError(f"KVEntry meta (tokens={self.meta.tokens}, dtype={self.meta.dtype}, nbytes={self.meta.nbytes}) "
                             f"does not match its tensors (T={t}, {dtype_name(dtype)}, {self.nbytes} bytes)")

    @classmethod
    def create(cls, *, key: EntryKey, schema: str, module: str, model: str, model_fingerprint: str, policy: str,
               keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], token_ids: torch.Tensor,
               positions: torch.Tensor, replaceable: torch.Tensor) -> KVEntry:
        """Build an entry, filling `meta.dtype`, `meta.tokens` and `meta.nbytes` from the tensors."""
        keys, values = tuple(keys), tuple(values)
        meta = EntryMeta(key=key, schema=schema, module=module, model=model, model_fingerprint=model_fingerprint,
                         policy=policy, dtype=dtype_name(keys[0].dtype), tokens=int(keys[0].shape[2]),
                         nbytes=sum(t.numel() * t.element_size() for t in (*keys, *values)))
        return cls(meta, keys, values, token_ids, positions, replaceable)

    @property
    def nbytes(self) -> int:
        """Bytes of keys + values: 2 x layers x kv_heads x T x head_dim x dtype size."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    def to(self, device: torch.device | str) -> KVEntry:
        """This entry with its tensors on `device` (self if already there)."""
        device = torch.device(device)
        if all(t.device == device for t in (*self.keys, *self.values, self.token_ids)):
            return self
        move = lambda ts: tuple(t.to(device) for t in ts)  # noqa: E731
        return KVEntry(self.meta, move(self.keys), move(self.values), self.token_ids.to(device),
                       self.positions.to(device), self.replaceable.to(device))

    def to_layers(self, devices: Sequence[torch.device | str]) -> KVEntry:
        """This entry with layer i's keys and values on `devices[i]` (token ids and positions stay put).

        For a model split across devices: each layer's states sit where that layer attends.
        """
        devices = [torch.device(d) for d in devices]
        if len(devices) != self.num_layers:
            raise ValueError(f"{len(devices)} devices for an entry with {self.num_layers} layers")
        if all(k.device == d for k, d in zip(self.keys, devices)):
            return self
        return KVEntry(self.meta, tuple(k.to(d) for k, d in zip(self.keys, devices)),
                       tuple(v.to(d) for v, d in zip(self.values, devices)), self.token_ids,
                       self.positions, self.replaceable)

    def matches(self, token_ids: torch.Tensor | Sequence[int], positions: torch.Tensor | Sequence[int]) -> bool:
        """Whether this entry holds states of exactly `token_ids` at `positions` (both `[T]`).

        Keys are content hashes, so an honest entry always matches what its key was computed from; a
        mismatch means a file that is self-consistent but holds another entry's states.
        """
        ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1).cpu()
        pos = torch.as_tensor(positions, dtype=torch.long).reshape(-1).cpu()
        return (ids.shape == self.token_ids.shape and pos.shape == self.positions.shape
                and torch.equal(ids, self.token_ids.cpu()) and torch.equal(pos, self.positions.cpu()))

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor map as stored on disk: `k.{i}`, `v.{i}`, `token_ids`, `positions`, `replaceable`."""
        out = {f"k.{i}": k for i, k in enumerate(self.keys)}
        out.update({f"v.{i}": v for i, v in enumerate(self.values)})
        out.update(token_ids=self.token_ids, positions=self.positions, replaceable=self.replaceable)
        return out


def payload_checksum(tensors: Mapping[str, torch.Tensor], header: str = "") -> str:
    """XXH3-128 over `header` (the file format and the entry's metadata JSON) and every tensor.

    The header is inside the hash so that metadata (schema, module, key) cannot be edited without
    the checksum failing. XXH3 (the `xxhash` package) rather than sha256: this guards against
    damage, not against an attacker who can write the store (token ids and positions are checked
    against the plan separately), and it runs at memory speed: about 11-30 ms for a 176 MiB entry in
    the speed benchmark's profile, where sha256 took 117 ms (docs/RESULTS.md, speed benchmark).
    Tensors are hashed through their buffers, without a bytes copy, in name order; a reader that
    streams a file (`attention_store.direct`) hashes the same pieces in the same order.
    """
    h = checksum_hasher(header)
    for name in sorted(tensors):
        t = tensors[name]
        hash_tensor_name(h, name, t.dtype, t.shape)
        hash_tensor_bytes(h, t)
    return h.hexdigest()


def checksum_hasher(header: str):
    """The payload checksum's hash object, started with `header`."""
    import xxhash

    return xxhash.xxh3_128(header.encode())


def hash_tensor_name(h, name: str, dtype: torch.dtype, shape: Sequence[int]) -> None:
    """What the checksum covers before a tensor's bytes: its name, dtype and shape."""
    h.update(f"\0{name}\0{dtype}\0{tuple(shape)}\0".encode())


def hash_tensor_bytes(h, t: torch.Tensor) -> None:
    h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
