"""K/V buffers on 4 KiB pages (what the cache uses at smollm2-135m's sizes) against 2 MiB-aligned huge pages.

A cache layer's K or V buffer is `[1, 3, ~4,100, 64]` fp32 here, about 3.1 MiB: below
`attention_store.buffers.HUGE_MIN_BYTES`, so `empty_tensor` gives it ordinary pages. This probe
measures both sides of advising them huge pages instead (`MADV_HUGEPAGE` on one 2 MiB-aligned
mapping per buffer):
- the C decode attention kernels over 30 layers' K/V already in memory (the speed benchmark's
  4,000 cached tokens): a packed batch step of 8 prompts (24 rows per K/V head) and one prompt's
  step (3 rows); the flash kernel of a batch prefill for comparison;
- what a cache's buffers cost to get: allocating 60 such buffers and filling them once (as an
  assembly does), round after round in this process (round 0 is a fresh process's first touch);
- with `--engine`, what a pool of reused huge-page buffers would gain end to end:
  `scripts/probes/batch_split.py` (a batch of 8 and one prompt, answered by the engine) in two
  child processes, one as the library is, one with every cache carved from a single huge-page
  arena that each answer reuses (the steady state of such a pool; allocated and first touched in
  the untimed warm-up).

    python scripts/probes/kv_pages.py [--rounds 4] [--repeats 9] [--engine]
"""

import argparse
import mmap
import os
import subprocess
import sys
import time

import _setup  # noqa: F401 (puts the checkout on sys.path)

HUGE = 2 << 20
KV, D, LAYERS, CONTEXT = 3, 64, 30, 4000


def huge_tensor(shape, keep: list):
    """An uninitialised fp32 tensor on a 2 MiB-aligned anonymous mapping advised huge pages."""
    import numpy as np
    import torch

    n = 4
    for s in shape:
        n *= s
    m = mmap.mmap(-1, n + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_HUGEPAGE)
    raw = np.frombuffer(m, dtype=np.uint8)
    at = (-raw.ctypes.data) % HUGE
    keep.append(m)
    return torch.frombuffer(memoryview(raw[at:at + n]), dtype=torch.float32).view(shape)


def plain_tensor(shape, keep: list):
    """What `empty_tensor` gives below HUGE_MIN_BYTES: `np.empty`, ordinary pages."""
    import numpy as np
    import torch

    n = 1
    for s in shape:
        n *= s
    t = torch.from_numpy(np.empty(n, dtype=np.float32)).view(shape)
    keep.append(t)  # alive until the round ends, as a cache's layers are
    return t


def times(fn, repeats: int) -> tuple[float, float]:
    """(min, median) milliseconds of `fn()` after an untimed call."""
    fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return min(out), sorted(out)[len(out) // 2]


def arena_child() -> None:
    """In this process, every cache buffer comes from one 2 MiB-aligned huge-page arena, reset at
    the start of each answer (the previous answer's cache is gone by then), then batch_split runs."""
    import numpy as np
    import torch

    from attention_store import adapter
    from prompt_cache import engine

    size = 1 << 30
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_HUGEPAGE)
    raw = np.frombuffer(m, dtype=np.uint8)
    start = (-raw.ctypes.data) % HUGE
    at = [start]

    def empty_tensor(shape, dtype):
        n = torch.empty(0, dtype=dtype).element_size()
        for s in shape:
            n *= s
        here, at[0] = at[0], at[0] + (n + 4095) // 4096 * 4096
        assert at[0] <= size, "arena too small for one answer's cache"
        return torch.frombuffer(memoryview(raw[here:here + n]), dtype=dtype).view(shape)

    adapter.empty_tensor = empty_tensor
    for name in ("answer", "answer_batch"):
        def reset_first(self, *a, _call=getattr(engine.PromptCache, name), **k):
            at[0] = start
            return _call(self, *a, **k)
        setattr(engine.PromptCache, name, reset_first)


def engine_runs() -> None:
    """batch_split.py in two child processes (run from this folder, so both probes import): as the
    library is, and with `arena_child()` first."""
    here = os.path.dirname(os.path.abspath(__file__))
    for name, arena in (("as the library is (4 KiB pages)", False), ("one reused huge-page arena", True)):
        print(f"\nbatch_split.py, caches {name}:", flush=True)
        code = ("import runpy, sys, kv_pages\n"
                + ("kv_pages.arena_child()\n" if arena else "")
                + "sys.argv = ['batch_split.py', '--runs', '2']\nrunpy.run_path('batch_split.py', run_name='__main__')\n"
                + "print(*[l.strip() for l in open('/proc/self/smaps_rollup') if 'AnonHuge' in l])\n")
        subprocess.run([sys.executable, "-c", code], check=True, cwd=here)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=4, help="allocate-and-fill rounds of each kind (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=9, help="timed calls per kernel figure (default: %(default)s)")
    p.add_argument("--engine", action="store_true", help="also run batch_split.py with and without a reused arena")
    args = p.parse_args()

    import torch

    from attention_store.kernels import ops
    from lanes_kernels import batch_mask

    torch.set_num_threads(1)
    kinds = {"4 KiB pages": plain_tensor, "huge pages": huge_tensor}
    shape = (1, KV, CONTEXT + 208 + 64, D)
    mib = 2 * LAYERS * 4 * shape[1] * shape[2] * D / 2**20
    print(f"allocate and fill {2 * LAYERS} buffers of {shape} fp32 ({mib:.0f} MiB), ms:")
    src = torch.randn(shape)
    for r in range(args.rounds):
        for name, make in kinds.items():
            keep: list = []
            t = time.perf_counter()
            for _ in range(2 * LAYERS):
                make(shape, keep).copy_(src)
            print(f"  round {r} {name:12s} {(time.perf_counter() - t) * 1e3:8.1f}")
    print("\nC kernels over 30 layers' K/V already in memory, ms (min / median):")
    step_mask, step_q = batch_mask(8, 26, step=True), torch.randn(1, KV, 24, D)
    one_mask, one_q = batch_mask(1, 26, step=True), torch.randn(1, KV, 3, D)
    pre_mask, pre_q = batch_mask(11, 17, step=False), torch.randn(1, KV, 3 * 187, D)
    for name, make in kinds.items():
        keep = []
        kv = []
        for _ in range(LAYERS):
            k, v = make(shape, keep), make(shape, keep)
            k.copy_(torch.randn(shape)), v.copy_(torch.randn(shape))
            kv.append((k, v))

        def cut(t):
            return [(k[:, :, :t], v[:, :, :t]) for k, v in kv]
        step, one, pre = cut(CONTEXT + 208), cut(CONTEXT + 26), cut(CONTEXT + 187)
        a = times(lambda: [ops.decode_attention(step_q, k, v, step_mask, 0.125) for k, v in step], args.repeats)
        b = times(lambda: [ops.decode_attention(one_q, k, v, one_mask, 0.125) for k, v in one], args.repeats)
        c = times(lambda: [ops.flash_attention(pre_q, k, v, pre_mask, 0.125) for k, v in pre], 3)
        print(f"  {name:12s} batch step {a[0]:.1f} / {a[1]:.1f}; one prompt's step {b[0]:.1f} / {b[1]:.1f}; "
              f"batch prefill (flash) {c[0]:.0f} / {c[1]:.0f}")
    if args.engine:
        engine_runs()


if __name__ == "__main__":
    main()
