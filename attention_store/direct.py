"""A disk-tier entry read straight into the caller's cache buffers.

`DiskTier.get` reads a whole entry file into a fresh buffer, and assembly then copies it into the
cache's own buffers: a process that answers one prompt (`pml run`) touches the entry's size of
fresh memory twice and copies it once more than it needs to. In a fresh process on this machine's
VM, memory never touched before is what costs (`scripts/probes/first_touch.py`, docs/RESULTS.md).
`DiskTier.open` instead reads only the header, the metadata and the small tensors (token ids,
positions, the replaceable flags), all checked as a full load checks them, and returns an
`EntryFile`; `EntryFile.read_into` then reads each layer's keys and values from the file straight
into the runs of the cache buffers they fill, hashing every byte of the file's tensors on the way
(the same XXH3-128 checksum as a full load, in the same order), and compares the checksum at the
end. A damaged file is moved aside by its tier and raises `DamagedEntry`: the caller's buffers
then hold unchecked bytes and must be dropped (`PromptCache.assemble` recomputes the entry).

The file stays open from `open` to `read_into`, so a file replaced or removed meanwhile is still
the one that was checked. Tokens the caller does not keep (the scaffold of a parameter that gets
another value) are read into a small reused buffer, only to be hashed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from attention_store.entry import EntryMeta, KVEntry, checksum_hasher, hash_tensor_bytes, hash_tensor_name

SCRATCH_BYTES = 1 << 20  # tokens not read into a destination are read through this much memory at a time


class DamagedEntry(Exception):
    """An entry file whose states do not match its checksum (found while reading them); set aside."""


@dataclass
class TensorInfo:
    """Where one tensor lies in an entry file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file


@dataclass(eq=False)
class EntryFile:
    """An opened, not yet read disk-tier entry: what assembly needs to place it, and `read_into`.

    Has the fields of a `KVEntry` that describe the tokens (`meta`, `token_ids`, `positions`,
    `replaceable`, `matches`), not its states: `load()` reads those the ordinary way.
    """

    meta: EntryMeta
    token_ids: torch.Tensor
    positions: torch.Tensor
    replaceable: torch.Tensor
    tensors: dict[str, TensorInfo]  # every tensor of the file by name
    checksum: str  # the file's recorded checksum
    signed_header: str  # what the checksum covers before the tensors
    fd: int
    on_damage: Callable[[str], None]  # moves the file aside (the tier's quarantine of this file)
    load_entry: Callable[[], KVEntry | None]  # the tier's ordinary full load

    matches = KVEntry.matches

    @property
    def num_layers(self) -> int:
        return sum(1 for name in self.tensors if name.startswith("k."))

    @property
    def dtype(self) -> torch.dtype:
        return self.tensors["k.0"].dtype

    @property
    def layer_shape(self) -> tuple[int, ...]:
        return self.tensors["k.0"].shape

    def load(self) -> KVEntry:
        """The whole entry, read the ordinary way (for callers that need its tensors)."""
        self.close()
        entry = self.load_entry()
        if entry is None:
            raise DamagedEntry(f"entry {self.meta.key} ({self.meta.module or '(root text)'}) could not be read")
        return entry

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        self.close()

    def read_into(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                  spans: Sequence[tuple[int, int, int]]) -> None:
        """Read runs of this entry's states into `keys[i]` / `values[i]` (layer i's buffers,
        `[1, kv_heads, capacity, head_dim]`, contiguous, on the CPU, any float dtype): each
        `(lo, hi, at)` copies the entry's tokens `lo:hi` to the buffer's tokens `at:at + hi - lo`.
        Every tensor byte of the file is hashed; a mismatch moves the file aside and raises
        `DamagedEntry`. The file is closed afterwards."""
        if self.fd < 0:
            raise ValueError(f"entry file {self.meta.key} was already read")
        spans = sorted(spans)
        for (_, hi, _), (lo, _, _) in zip(spans, spans[1:]):
            if lo < hi:
                raise ValueError(f"overlapping runs {spans}")
        try:
            h = checksum_hasher(self.signed_header)
            scratch = np.empty(SCRATCH_BYTES, dtype=np.uint8)
            for name in sorted(self.tensors):
                info = self.tensors[name]
                hash_tensor_name(h, name, info.dtype, info.shape)
                if name[:2] in ("k.", "v."):
                    dest = (keys if name[0] == "k" else values)[int(name[2:])]
                    self._read_layer(h, info, dest, spans, scratch)
                else:  # a small tensor, already in memory
                    hash_tensor_bytes(h, getattr(self, name))
            if h.hexdigest() != self.checksum:
                self.on_damage("checksum mismatch (payload or metadata changed)")
                raise DamagedEntry(f"entry {self.meta.key} ({self.meta.module or '(root text)'}) failed its "
                                   f"checksum while being read; it was set aside and will be recomputed")
        except OSError as e:
            self.on_damage(f"{type(e).__name__}: {e}")
            raise DamagedEntry(f"entry {self.meta.key}: {e}") from None
        finally:
            self.close()

    def _read_layer(self, h, info: TensorInfo, dest: torch.Tensor, spans, scratch: np.ndarray) -> None:
        _, heads, t, d = info.shape
        row = d * info.dtype.itemsize  # bytes of one token of one head
        if dest.shape[1] != heads or dest.shape[3] != d or not dest.is_contiguous() or dest.device.type != "cpu":
            raise ValueError(f"buffer {tuple(dest.shape)} cannot hold states {info.shape}")
        direct = dest.dtype == info.dtype
        for head in range(heads):
            base = info.offset + head * t * row
            at_token = 0
            for lo, hi, at in [*spans, (t, t, 0)]:  # the sentinel reads the tail after the last run
                if at_token < lo:  # not kept: hashed only
                    self._through(h, scratch, base + at_token * row, lo - at_token, row, None)
                if hi > lo:
                    out = dest[0, head, at:at + hi - lo]
                    if direct:  # straight from the file into the buffer
                        raw = out.view(torch.uint8).numpy()
                        _pread_full(self.fd, raw, base + lo * row)
                        h.update(raw)
                    else:  # another dtype: through the scratch, converted by the copy
                        self._through(h, scratch, base + lo * row, hi - lo, row, (out, info.dtype))
                at_token = max(at_token, hi)

    def _through(self, h, scratch: np.ndarray, offset: int, tokens: int, row: int, into) -> None:
        step = max(1, len(scratch) // row)
        for first in range(0, tokens, step):
            n = min(step, tokens - first)
            raw = scratch[:n * row]
            _pread_full(self.fd, raw, offset + first * row)
            h.update(raw)
            if into is not None:
                out, dtype = into
                out[first:first + n].copy_(torch.frombuffer(memoryview(raw), dtype=dtype).view(n, -1))


def _pread_full(fd: int, into: np.ndarray, offset: int) -> None:
    """Fill `into` from the file at `offset`; a short file is damage."""
    view = memoryview(into).cast("B")
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise OSError(f"file ends at byte {offset + got}, before its tensors do")
        got += n
