"""Fresh processes reading a stored entry as `pml run` does: why the cached TTFT of a fresh process spreads.

Each child loads the model (as `pml run` does), then reads FILE (an entry of a store; the share of
it in the page cache beforehand is printed) into a fresh huge-page buffer (`buffers.empty_bytes`, the
disk tier's read), timed. Every other child first touches and frees `--pretouch` MiB of fresh
memory (also timed): if the read is then steadily fast, what spreads is the first touch of memory
the process has never used, not the read or the file. On this project's VM (a Firecracker guest)
the same read took 29-31 ms or 292-408 ms, and touching 512 MiB took 608-1,486 ms
(docs/RESULTS.md).

    python scripts/probes/first_touch.py FILE [--runs 4] [--pretouch 512] [--model smollm2-135m]
"""

import argparse
import json
import subprocess
import sys

import _setup  # noqa: F401 (puts the checkout on sys.path)


def child(path: str, pretouch_mib: int, model: str) -> None:
    import os

    import torch

    from attention_store.buffers import empty_bytes
    from prompt_cache.models import load_model
    from prompt_cache.timing import Clock

    torch.set_num_threads(1)
    load_model(model, torch.float32)
    clock = Clock()
    t = clock.now()
    if pretouch_mib:
        touched = empty_bytes(pretouch_mib << 20)
        touched[::4096] = 1  # one write per 4 KiB page
        del touched
    pretouch_ms = clock.ms_since(t)
    t = clock.now()
    with open(path, "rb", buffering=0) as f:
        buf = empty_bytes(os.fstat(f.fileno()).st_size)
        f.readinto(memoryview(buf))
    print(json.dumps({"pretouch_mib": pretouch_mib, "pretouch_ms": round(pretouch_ms),
                      "read_ms": round(clock.ms_since(t)), "mib": round(len(buf) / 2**20)}))


def resident_fraction(path: str) -> float:
    """The share of `path`'s pages in the page cache (mincore(2) over a read-only mapping)."""
    import ctypes
    import mmap
    import os

    size = os.path.getsize(path)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * pages)()
        if libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(size))
    finally:
        os.close(fd)
    return sum(b & 1 for b in vec) / pages


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file", help="an entry file of a store, e.g. runs/speed/smollm2-135m/store-scratch/*/*.safetensors")
    ap.add_argument("--runs", type=int, default=4, help="children of each kind, alternating (default: %(default)s)")
    ap.add_argument("--pretouch", type=int, default=512, help="MiB the other children touch first (default: %(default)s)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        return child(args.file, args.child, args.model)
    for _ in range(args.runs):
        for pre in (0, args.pretouch):
            resident = resident_fraction(args.file)
            out = subprocess.run([sys.executable, __file__, args.file, "--child", str(pre), "--model", args.model],
                                 capture_output=True, text=True, check=True).stdout
            print(f"{out.strip().splitlines()[-1]}  file in page cache before: {resident:.0%}", flush=True)


if __name__ == "__main__":
    main()
