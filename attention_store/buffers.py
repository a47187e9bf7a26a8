"""Large host buffers backed by transparent huge pages where the kernel offers them.

A fresh 176 MiB `np.empty` is untouched memory: the first write to each 4 KiB page faults into the
kernel, about 45,000 faults per entry, so reading a warm entry file into it costs 82-282 ms where
the read itself takes about 25 ms. An anonymous private mapping advised `MADV_HUGEPAGE` faults
once per 2 MiB instead: 26-28 ms when the kernel has free 2 MiB blocks, and 231 ms when it must
compact memory first (`python scripts/probes/fresh_buffers.py ENTRY`, docs/RESULTS.md). Kept:
a process that reads entries keeps getting freed huge pages back, and the bad case (231 ms) is
within `np.empty`'s range. The memory is private to this process, like
`np.empty`'s: nothing another process does to a file changes it (no SIGBUS, unlike a file mapping).
Where huge pages are off (`/sys/kernel/mm/transparent_hugepage/enabled` = never) or the platform
has no `madvise`, this is an ordinary anonymous mapping: correct, just without the saving.
"""

from __future__ import annotations

import mmap

import numpy as np

HUGE_MIN_BYTES = 4 << 20  # below this, faults are few and a mapping's set-up costs more than it saves


def empty_bytes(nbytes: int) -> np.ndarray:
    """An uninitialised, writable uint8 array of `nbytes`, huge-page backed when large."""
    if nbytes < HUGE_MIN_BYTES or not hasattr(mmap, "MAP_ANONYMOUS"):
        return np.empty(nbytes, dtype=np.uint8)
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        try:
            m.madvise(advice)
        except OSError:  # huge pages unsupported here: an ordinary mapping
            pass
    return np.frombuffer(m, dtype=np.uint8)  # the array keeps the mapping alive


def empty_tensor(shape: tuple[int, ...], dtype) -> "torch.Tensor":
    """An uninitialised CPU tensor, huge-page backed when large (e.g. an assembled KV cache)."""
    import torch

    count = 1
    for d in shape:
        count *= d
    itemsize = torch.empty(0, dtype=dtype).element_size()
    raw = empty_bytes(count * itemsize)
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(memoryview(raw), dtype=dtype, count=count).view(shape)
