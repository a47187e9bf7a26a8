"""What a fresh buffer costs: read a stored entry file (warm in the page cache) into new memory.

Per way, 3 reads into 3 new buffers, kept alive (as a process that loads entries keeps them): an
anonymous mapping advised MADV_HUGEPAGE (`attention_store.buffers.empty_bytes`, what the disk tier
uses), and `np.empty` (4 KiB pages). The first touch of new pages dominates; with huge pages it
depends on whether the kernel has free 2 MiB blocks at that moment, so run it a few times.

    python scripts/probes/fresh_buffers.py FILE        # e.g. a .safetensors entry of a store
"""

import _setup  # noqa: F401 (puts the checkout on sys.path)


def main() -> None:
    import numpy as np

    from attention_store.buffers import empty_bytes
    from prompt_cache.timing import Clock

    import argparse

    ap = argparse.ArgumentParser(description="read FILE into fresh huge-page and np.empty buffers")
    ap.add_argument("file", help="a large file, e.g. a .safetensors entry of a store")
    path = ap.parse_args().file
    clock = Clock()
    with open(path, "rb") as f:
        n = f.seek(0, 2)
        f.seek(0)
        f.readinto(memoryview(np.empty(n, np.uint8)))  # into the page cache, untimed
    for name, alloc in (("huge-page mapping", empty_bytes), ("np.empty", lambda n: np.empty(n, np.uint8))):
        kept, times = [], []
        for _ in range(3):
            t = clock.now()
            buf = alloc(n)
            with open(path, "rb", buffering=0) as f:
                f.readinto(memoryview(buf))
            times.append(clock.ms_since(t))
            kept.append(buf)
        print(f"{name:18s} {n / 2**20:.0f} MiB: " + ", ".join(f"{t:.0f} ms" for t in times))


if __name__ == "__main__":
    main()
