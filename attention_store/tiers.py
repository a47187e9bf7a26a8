"""Storage tiers: content-addressed KV entries in memory (LRU, pinning) and on disk (safetensors)."""

from __future__ import annotations

import abc
import contextlib
import errno
import json
import logging
import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from attention_store.buffers import empty_bytes
from attention_store.dtypes import dtype_name
from attention_store.direct import EntryFile, TensorInfo
from attention_store.entry import EntryMeta, KVEntry, payload_checksum
from attention_store.errors import StoreError
from attention_store.fileio import publish
from attention_store.keys import KEY_RE, EntryKey
from attention_store.owner import claim_owner

log = logging.getLogger(__name__)

# /2: the checksum covers the metadata too; /3: the checksum is XXH3-128. Older files are recomputed.
FILE_FORMAT = "pml-kv/3"
OLD_FILE_FORMATS = ("pml-kv/1", "pml-kv/2")
# safetensors dtype names -> torch dtypes, for the tensors a store file holds.
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
              "BOOL": torch.bool}
DEFAULT_MEMORY_BUDGET = 4 << 30  # bytes of KV kept in a memory tier unless told otherwise
CORRUPT_KEEP = 16  # damaged files kept in `corrupt/` for inspection (the newest); older ones are deleted
STALE_TEMP_S = 3600.0  # a temp file this old is a killed writer's leftover, not a write in progress
MAX_HEADER_BYTES = 16 << 20  # a safetensors header longer than this is damage, not metadata
CORRUPT_DIR = "corrupt"


class Tier(abc.ABC):
    """One storage tier. Entries are immutable once put; a key names its content."""

    name: str

    @abc.abstractmethod
    def get(self, key: EntryKey) -> KVEntry | None:
        """The entry stored under `key`, or None if absent (or unusable: the caller recomputes)."""

    @abc.abstractmethod
    def put(self, entry: KVEntry) -> None:
        """Store `entry` under `entry.meta.key` (a key names its content: an entry already there is kept)."""

    @abc.abstractmethod
    def delete(self, key: EntryKey) -> bool:
        """Remove the entry under `key`; True if there was one."""

    @abc.abstractmethod
    def entries(self) -> list[EntryMeta]:
        """Index rows of every stored entry (metadata only, no tensors loaded)."""

    @abc.abstractmethod
    def __contains__(self, key: object) -> bool:
        """Whether an entry is stored under `key` (without loading or verifying it)."""


class MemoryTier(Tier):
    """Entries kept as tensors on `device`, least recently used evicted first to stay within `budget_bytes`.

    With `layer_devices` (one device per layer, for a model split across GPUs) layer i's K/V is kept
    on `layer_devices[i]`, where layer i attends, and `budget_bytes` is a budget *per device*: each
    device counts the bytes of the layers it holds. Keeping states where they are used makes
    assembly an on-device copy; one tier with a per-device count (rather than one tier per device)
    keeps an entry whole, so a hit is never half on one GPU and missing on another.

    Pinned keys are never evicted; if they alone exceed the budget they are kept and a warning is
    logged. An unpinned entry bigger than the whole budget (of some device) is not kept. Pins are by
    content key and per holder (e.g. a schema name), so two schemas sharing an entry each keep it pinned.
    """

    name = "memory"

    def __init__(self, budget_bytes: int = DEFAULT_MEMORY_BUDGET, device: torch.device | str = "cpu",
                 layer_devices: Sequence[torch.device | str] | None = None):
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.device = torch.device(device)
        self.layer_devices = tuple(torch.device(d) for d in layer_devices) if layer_devices else None
        self._entries: OrderedDict[EntryKey, KVEntry] = OrderedDict()  # oldest use first
        self._pins: dict[str, frozenset[EntryKey]] = {}  # holder -> keys it keeps resident
        self._pinned: frozenset[EntryKey] = frozenset()  # union of `_pins`
        self._lock = threading.Lock()
        self.evictions = 0  # entries evicted to stay within the budget, since creation (server metrics)

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def device_bytes(self) -> dict[str, int]:
        """Bytes held per device (`str(device)` -> bytes), the quantity each budget bounds."""
        out: dict[str, int] = {}
        for entry in self._entries.values():
            for dev, n in _bytes_by_device(entry).items():
                out[dev] = out.get(dev, 0) + n
        return out

    def _place(self, entry: KVEntry) -> KVEntry:
        if self.layer_devices is None:
            return entry.to(self.device)
        if len(self.layer_devices) != entry.num_layers:
            raise ValueError(f"memory tier has {len(self.layer_devices)} layer devices, entry "
                             f"{entry.meta.key[:12]} has {entry.num_layers} layers")
        return entry.to_layers(self.layer_devices)

    def pin_keys(self, keys: Iterable[EntryKey], holder: str = "") -> None:
        """Never evict the entries under `keys` (stored now or later); replaces what `holder` pinned before."""
        with self._lock:
            self._pins[holder] = frozenset(keys)
            self._pinned = frozenset().union(*self._pins.values())

    def unpin_keys(self, holder: str = "") -> None:
        """Drop `holder`'s pins (keys another holder pinned stay pinned), evicting now if over budget."""
        with self._lock:
            self._pins.pop(holder, None)
            self._pinned = frozenset().union(*self._pins.values())
            self._evict()

    def pinned(self) -> frozenset[EntryKey]:
        """Every pinned key, of all holders."""
        return self._pinned

    def get(self, key: EntryKey) -> KVEntry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, entry: KVEntry) -> None:
        pinned = entry.meta.key in self._pinned
        entry = self._place(entry) if pinned or self._fits(entry) else None
        if entry is None:
            return
        with self._lock:
            self._entries[entry.meta.key] = entry
            self._entries.move_to_end(entry.meta.key)
            self._evict()

    def _fits(self, entry: KVEntry) -> bool:
        """Whether `entry`, placed, would fit each device's budget on its own."""
        if self.layer_devices is None:
            share = {str(self.device): entry.nbytes}
        else:
            share = {}
            for dev, k, v in zip(self.layer_devices, entry.keys, entry.values):
                share[str(dev)] = share.get(str(dev), 0) + k.numel() * k.element_size() + v.numel() * v.element_size()
        if max(share.values()) <= self.budget_bytes:
            return True
        log.info("memory tier: entry %s (%s/%s, %d bytes) is bigger than the whole budget (%d bytes per device); "
                 "not kept", entry.meta.key[:12], entry.meta.schema, entry.meta.module, entry.nbytes, self.budget_bytes)
        return False

    def _evict(self) -> None:
        used = self.device_bytes()
        for key in list(self._entries):
            over = {d for d, n in used.items() if n > self.budget_bytes}
            if not over:
                return
            entry = self._entries[key]
            share = _bytes_by_device(entry)
            if key in self._pinned or not over & share.keys():
                continue  # pinned, or frees nothing on a device that is over budget
            del self._entries[key]
            for d, n in share.items():
                used[d] -= n
            self.evictions += 1
            log.debug("memory tier: evicted %s (%s/%s)", key[:12], entry.meta.schema, entry.meta.module)
        over = {d: n for d, n in used.items() if n > self.budget_bytes}
        if over:
            log.warning("memory tier: pinned entries alone take %s bytes, over the %d byte budget; keeping them",
                        ", ".join(f"{n} on {d}" for d, n in sorted(over.items())), self.budget_bytes)

    def delete(self, key: EntryKey) -> bool:
        with self._lock:
            return self._entries.pop(key, None) is not None

    def entries(self) -> list[EntryMeta]:
        with self._lock:
            return [e.meta for e in self._entries.values()]

    def keys_lru(self) -> list[EntryKey]:
        """Stored keys, least recently used first (the eviction order)."""
        with self._lock:
            return list(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)


def _bytes_by_device(entry: KVEntry) -> dict[str, int]:
    """Bytes of an entry's keys + values per device they sit on."""
    out: dict[str, int] = {}
    for t in (*entry.keys, *entry.values):
        out[str(t.device)] = out.get(str(t.device), 0) + t.numel() * t.element_size()
    return out


def _read_file(path: Path, limit: int | None = None) -> tuple[np.ndarray, os.stat_result]:
    """The bytes of regular file `path` (at most `limit`) and its stat; never follows a symlink.

    The bytes are a private copy: nothing read here changes when the file is later rewritten or
    truncated in place (a memory-mapped view would, and dies with SIGBUS on truncation). An
    uninitialised uint8 array read into once (a bytearray's zero-fill nearly doubled the load of a
    176 MiB entry in the speed benchmark's profile: 236 ms vs 132 ms, docs/RESULTS.md), huge-page
    backed (`buffers.empty_bytes`: one page fault per 2 MiB, not per 4 KiB), so tensors can be
    views of it without a second copy.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # NONBLOCK: a FIFO cannot hang us
    with os.fdopen(fd, "rb", buffering=0) as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        size = st.st_size if limit is None else min(st.st_size, limit)
        buf = empty_bytes(size)
        got = fh.readinto(memoryview(buf))
        if got != size:
            raise ValueError(f"read {got} of {size} bytes (the file changed while being read)")
        return buf, st


def _layout(header: dict, start: int, size: int) -> dict[str, TensorInfo]:
    """Where each tensor of a safetensors file lies (`start`: where its data begins, `size`: the
    file's bytes), checked against its shape and the file."""
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"tensor {name}: unexpected dtype {info['dtype']}")
        lo, hi = info["data_offsets"]
        shape = tuple(info["shape"])
        if hi - lo != _numel(shape) * dtype.itemsize or start + hi > size or lo < 0:
            raise ValueError(f"tensor {name}: offsets {lo}..{hi} do not fit its shape {shape} or the file")
        out[name] = TensorInfo(dtype, shape, start + lo)
    return out


def _tensors(buf: np.ndarray, header: dict) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file held in `buf`, as views of `buf` (our private copy)."""
    out = {}
    for name, t in _layout(header, 8 + int.from_bytes(buf[:8].tobytes(), "little"), len(buf)).items():
        count = _numel(t.shape)
        view = (torch.frombuffer(memoryview(buf), dtype=t.dtype, count=count, offset=t.offset) if count
                else torch.empty(0, dtype=t.dtype))
        out[name] = view.reshape(t.shape)
    return out


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for d in shape:
        count *= d
    return count


def _header(data: np.ndarray) -> dict:
    """The safetensors JSON header at the start of `data` (`__metadata__` holds our string metadata)."""
    if len(data) < 8:
        raise ValueError("file shorter than a safetensors header")
    n = int.from_bytes(data[:8].tobytes(), "little")
    if n > MAX_HEADER_BYTES or 8 + n > len(data):
        raise ValueError(f"header of {n} bytes does not fit the file")
    header = json.loads(data[8:8 + n].tobytes())
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return header


class DiskTier(Tier):
    """One safetensors file per entry at `root/<key[:2]>/<key>.safetensors`.

    Tensors `k.{i}`, `v.{i}`, `token_ids`, `positions`, `replaceable`; the string metadata holds the
    EntryMeta as JSON and a sha256 over the format, that JSON and the tensors. A file is written
    whole to a temp file and hard-linked to its name, which fails if the name exists: concurrent
    writers of one key store it once, and a reader sees no file or a whole one. A load reads the
    file into memory (a copy, checked against the checksum; `verify_on_load=False` skips the
    hashing) and never maps it, so a file changed afterwards cannot change served states. A damaged
    file is logged once, moved to `root/corrupt/` (the newest `corrupt_keep` are kept), and reported
    as a miss; never served. Nothing outside `root` is read, written or deleted through a symlink.

    The folder is created by the first `put`; with `owner` (model name and fingerprints), that put
    first claims the folder for the owner (`owner.json`, created exclusively).
    """

    name = "disk"

    def __init__(self, root: str | os.PathLike[str], verify_on_load: bool = True, owner: Mapping | None = None,
                 corrupt_keep: int = CORRUPT_KEEP):
        self.root = Path(root)
        self.verify_on_load = verify_on_load
        self.owner = dict(owner) if owner is not None else None
        self.corrupt_keep = corrupt_keep
        self.published = 0  # entry files this tier created (a key already on disk is not written again)
        self._claimed = owner is None

    def path(self, key: EntryKey) -> Path:
        """Where the entry for `key` lives."""
        if not KEY_RE.match(key):
            raise ValueError(f"not an entry key (64 lowercase hex digits): {key!r}")
        return self.root / key[:2] / f"{key}.safetensors"

    # -- writing -------------------------------------------------------------------------------
    def put(self, entry: KVEntry) -> None:
        from safetensors.torch import save

        path = self.path(entry.meta.key)
        if path.parent.is_symlink():
            raise StoreError(f"{path.parent} is a symlink; a store writes only inside its folder: remove it")
        if path.is_file() and not path.is_symlink():
            return  # same key, same content: stored already (possibly by another process)
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in entry.tensors().items()}
        meta = entry.meta.to_json()
        metadata = {"format": FILE_FORMAT, "meta": meta, "checksum": payload_checksum(tensors, _signed(meta))}
        data = save(tensors, metadata=metadata)
        try:
            if not self._claimed:
                claim_owner(self.root, self.owner)  # type: ignore[arg-type]
                self._claimed = True
            if publish(path, data):
                self.published += 1
        except OSError as e:
            raise StoreError(_write_error(self.root, e)) from None

    # -- reading -------------------------------------------------------------------------------
    def get(self, key: EntryKey) -> KVEntry | None:
        return self._load(key, verify=self.verify_on_load)

    def _load(self, key: EntryKey, verify: bool) -> KVEntry | None:
        path = self.path(key)
        if path.parent.is_symlink() or not os.path.lexists(path):
            return None  # a symlink, FIFO or folder in an entry's place is read below, fails, and is moved aside
        st = None
        try:
            data, st = _read_file(path)
            header = _header(data)
            meta = self._checked_meta(path, header, key, st)
            if meta is None:
                return None
            tensors = _tensors(data, header)  # views of our private copy of the file
            if verify and payload_checksum(tensors, _signed(header["__metadata__"]["meta"])) != header["__metadata__"].get("checksum"):
                raise ValueError("checksum mismatch (payload or metadata changed)")
            n = sum(1 for name in tensors if name.startswith("k."))
            return KVEntry(meta, tuple(tensors[f"k.{i}"] for i in range(n)), tuple(tensors[f"v.{i}"] for i in range(n)),
                           tensors["token_ids"], tensors["positions"], tensors["replaceable"])
        except FileNotFoundError:  # deleted or quarantined by someone else meanwhile
            return None
        except MemoryError:  # this machine's state, not the file's: do not set a sound file aside
            raise
        except Exception as exc:  # safetensors raises its own error types for bad headers / truncation
            self.quarantine(key, f"{type(exc).__name__}: {exc}", _st=st)
            return None

    def _checked_meta(self, path: Path, header: dict, key: EntryKey, st: os.stat_result) -> EntryMeta | None:
        """The entry metadata of a file's header; None for an older format (the file is removed, to
        be recomputed); ValueError for anything else that is not an entry under `key`."""
        metadata = header.get("__metadata__") or {}
        if metadata.get("format") in OLD_FILE_FORMATS:
            log.info("disk tier: %s has the older file format %s; recomputing it", path.name, metadata["format"])
            self._remove_if_same(path, st)
            return None
        if metadata.get("format") != FILE_FORMAT:
            raise ValueError(f"format {metadata.get('format')!r}, expected {FILE_FORMAT!r}")
        meta = EntryMeta.from_json(metadata["meta"])
        if meta.key != key:
            raise ValueError(f"file holds entry {meta.key}, not {key}")
        return meta

    def open(self, key: EntryKey) -> EntryFile | None:
        """The entry under `key` opened but not read (`attention_store.direct`): its header,
        metadata and small tensors are read and checked as `get` checks them, its states are read
        later by `EntryFile.read_into`, straight into the caller's buffers and checksummed there.
        None on a miss; a damaged header is moved aside and is a miss."""
        path = self.path(key)
        if path.parent.is_symlink() or not os.path.lexists(path):
            return None
        st, fd = None, -1
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ValueError("not a regular file")
            n = int.from_bytes(os.pread(fd, 8, 0), "little")
            if n > MAX_HEADER_BYTES or 8 + n > st.st_size:
                raise ValueError(f"header of {n} bytes does not fit the file")
            head = np.frombuffer(os.pread(fd, 8 + n, 0), dtype=np.uint8)
            header = _header(head)
            meta = self._checked_meta(path, header, key, st)
            if meta is None:
                os.close(fd)
                return None
            layout = _layout(header, 8 + n, st.st_size)
            small = {}
            for name in ("token_ids", "positions", "replaceable"):
                t = layout[name]
                raw = os.pread(fd, _numel(t.shape) * t.dtype.itemsize, t.offset)
                small[name] = torch.frombuffer(bytearray(raw), dtype=t.dtype).reshape(t.shape) if raw else torch.empty(0, dtype=t.dtype)
            opened = EntryFile(meta, small["token_ids"], small["positions"], small["replaceable"], layout,
                               header["__metadata__"].get("checksum"), _signed(header["__metadata__"]["meta"]), fd,
                               on_damage=lambda reason: self.quarantine(key, reason, _st=st),
                               load_entry=lambda: self.get(key))
            fd = -1  # the EntryFile owns it now
            _check_layout(opened)
            return opened
        except FileNotFoundError:
            return None
        except MemoryError:
            raise
        except Exception as exc:
            if fd >= 0:
                os.close(fd)
            self.quarantine(key, f"{type(exc).__name__}: {exc}", _st=st)
            return None

    def quarantine(self, key: EntryKey, reason: str, _st: os.stat_result | None = None) -> None:
        """Move the file of `key` to `corrupt/` (it will be recomputed), logging `reason` once."""
        self._quarantine(self.path(key), reason, _st)

    def _quarantine(self, path: Path, reason: str, st: os.stat_result | None = None) -> None:
        if st is not None and not _same_file(path, st):
            return  # already replaced by another process (quarantined and rewritten): not ours to move
        corrupt = self.root / CORRUPT_DIR
        aside = corrupt / path.name
        log.warning("disk tier: %s is damaged (%s); moved to %s, it will be recomputed", path, reason, aside)
        if not corrupt.is_symlink():
            with contextlib.suppress(OSError):
                corrupt.mkdir(exist_ok=True)
                os.replace(path, aside)
                os.utime(aside, follow_symlinks=False)  # mtime = when it was set aside, for pruning
                self._prune_corrupt()
                return
        with contextlib.suppress(OSError):
            path.unlink()

    def _prune_corrupt(self) -> None:
        files = self.corrupt_files()
        for p, _size, _mtime in files[self.corrupt_keep:]:
            with contextlib.suppress(OSError):
                p.unlink()

    def _remove_if_same(self, path: Path, st: os.stat_result) -> None:
        if _same_file(path, st):
            with contextlib.suppress(OSError):
                path.unlink()

    def verify(self, key: EntryKey) -> bool:
        """Fully read and checksum the entry under `key`; a damaged one is moved aside. True if it is sound."""
        return self._load(key, verify=True) is not None

    def verify_all(self) -> dict[str, bool]:
        """`verify` every stored file: key (or file name) -> sound. A misfiled file is moved aside."""
        out: dict[str, bool] = {}
        for path in self.files():
            key = path.stem
            if KEY_RE.match(key) and self.path(EntryKey(key)) == path:
                out[key] = self.verify(EntryKey(key))
            else:
                self._quarantine(path, "misfiled: its name is not the key of its folder")
                out[path.name] = False
        return out

    # -- listing -------------------------------------------------------------------------------
    def files(self) -> Iterator[Path]:
        """Every `*.safetensors` regular file in the entry folders (misfiled ones included; no symlinks)."""
        for shard in _scan(self.root):
            if len(shard.name) == 2 and shard.is_dir(follow_symlinks=False):
                for f in _scan(Path(shard.path)):
                    if f.name.endswith(".safetensors") and not f.name.startswith(".") and f.is_file(follow_symlinks=False):
                        yield Path(f.path)

    def _keys(self) -> list[EntryKey]:
        return sorted(EntryKey(p.stem) for p in self.files() if KEY_RE.match(p.stem) and self.path(EntryKey(p.stem)) == p)

    def entries(self) -> list[EntryMeta]:
        rows = []
        for key in self._keys():
            path = self.path(key)
            st = None
            try:
                head, st = _read_file(path, limit=8 + MAX_HEADER_BYTES)
                metadata = _header(head).get("__metadata__") or {}
                if metadata.get("format") in OLD_FILE_FORMATS:
                    continue  # recomputed (and replaced) when next used
                rows.append(EntryMeta.from_json(metadata["meta"]))
            except FileNotFoundError:
                continue
            except Exception as exc:
                self._quarantine(path, f"{type(exc).__name__}: {exc}", st)
        return rows

    def corrupt_files(self) -> list[tuple[Path, int, float]]:
        """Files set aside in `corrupt/`, newest first: (path, bytes, mtime)."""
        rows = []
        for f in _scan(self.root / CORRUPT_DIR):
            if f.is_file(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    st = f.stat(follow_symlinks=False)
                    rows.append((Path(f.path), st.st_size, st.st_mtime))
        return sorted(rows, key=lambda r: r[2], reverse=True)

    # -- removing ------------------------------------------------------------------------------
    def delete(self, key: EntryKey) -> bool:
        path = self.path(key)
        if path.parent.is_symlink():
            return False  # never delete through a link out of the store
        try:
            path.unlink()  # a symlinked file is unlinked itself, its target untouched
            return True
        except FileNotFoundError:
            return False

    def remove_all(self) -> int:
        """Delete every entry file (misfiled ones too), `corrupt/` and temp files; returns entry files removed.

        A `.safetensors` file in an entry folder that is not an entry of this store's format (its header
        says so) is someone else's file: it is left alone, with a warning.
        """
        removed = 0
        for path in list(self.files()):
            try:
                head, _st = _read_file(path, limit=8 + MAX_HEADER_BYTES)
                fmt = (_header(head).get("__metadata__") or {}).get("format")
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as e:
                fmt = None
                log.warning("disk tier: %s is not a readable entry (%s); left in place", path, e)
            if fmt not in (FILE_FORMAT, *OLD_FILE_FORMATS):
                if fmt is not None:
                    log.warning("disk tier: %s is not an entry (format %r); left in place", path, fmt)
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
        for path, _size, _mtime in self.corrupt_files():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self.remove_stale_temp(older_than_s=-1)
        return removed

    def __contains__(self, key: object) -> bool:
        if not (isinstance(key, str) and KEY_RE.match(key)):
            return False
        path = self.path(EntryKey(key))
        return not path.parent.is_symlink() and path.is_file()

    def remove_stale_temp(self, older_than_s: float = STALE_TEMP_S) -> int:
        """Delete temp files left by killed writers (older than `older_than_s`); returns how many."""
        removed, now = 0, time.time()
        folders = [self.root, *(Path(d.path) for d in _scan(self.root)
                                if len(d.name) == 2 and d.is_dir(follow_symlinks=False))]
        for folder in folders:
            for f in _scan(folder):
                if f.name.startswith(".") and f.name.endswith(".tmp") and f.is_file(follow_symlinks=False):
                    with contextlib.suppress(OSError):
                        if now - f.stat(follow_symlinks=False).st_mtime > older_than_s:
                            os.unlink(f.path)
                            removed += 1
        if removed:
            log.info("disk tier: removed %d temp file(s) left by killed writers in %s", removed, self.root)
        return removed


def _check_layout(f: EntryFile) -> None:
    """What `KVEntry` checks of its tensors, from an opened file's header: one keys and one values
    tensor per layer, all `[1, kv_heads, T, head_dim]` of one dtype, and metadata that agrees."""
    n = f.num_layers
    names = {*(f"k.{i}" for i in range(n)), *(f"v.{i}" for i in range(n)), "token_ids", "positions", "replaceable"}
    if not n or set(f.tensors) != names:
        raise ValueError(f"tensors {sorted(f.tensors)} are not one k.i and v.i per layer plus the token tensors")
    shape, dtype = f.layer_shape, f.dtype
    if len(shape) != 4 or shape[0] != 1:
        raise ValueError(f"keys must be [1, kv_heads, T, head_dim]; got {shape}")
    for name in names - {"token_ids", "positions", "replaceable"}:
        if f.tensors[name].shape != shape or f.tensors[name].dtype != dtype:
            raise ValueError(f"tensor {name}: {f.tensors[name].shape} {f.tensors[name].dtype}, expected {shape} {dtype}")
    t = shape[2]
    for name, want in (("token_ids", torch.long), ("positions", torch.long), ("replaceable", torch.bool)):
        if f.tensors[name].shape != (t,) or f.tensors[name].dtype != want:
            raise ValueError(f"{name} must be {want} [{t}]")
    nbytes = 2 * n * _numel(shape) * dtype.itemsize
    if f.meta.tokens != t or f.meta.dtype != dtype_name(dtype) or f.meta.nbytes != nbytes:
        raise ValueError(f"metadata (tokens={f.meta.tokens}, dtype={f.meta.dtype}, nbytes={f.meta.nbytes}) does not "
                         f"match its tensors (T={t}, {dtype_name(dtype)}, {nbytes} bytes)")


def _signed(meta_json: str) -> str:
    """What the checksum covers besides the tensors: the file format and the metadata."""
    return f"{FILE_FORMAT}\0{meta_json}"


def _same_file(path: Path, st: os.stat_result) -> bool:
    try:
        now = os.lstat(path)
    except OSError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def _scan(folder: Path) -> list[os.DirEntry]:
    """Entries of `folder` (empty if it is missing, not a folder, or a symlink)."""
    if folder.is_symlink():
        return []
    try:
        with os.scandir(folder) as it:
            return list(it)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _write_error(root: Path, e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return f"cannot write to store {root}: the disk is full; free space or use another --store folder"
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write to store {root}: {e.strerror}; use a writable --store folder"
    return f"cannot write to store {root}: {e.strerror or e}"
