"""K/V buffers on 4 KiB pages (what the cache uses at smollm2-135m's sizes) against 2 MiB-aligned huge pages.

A cache layer's K or V buffer is `[1, 3, ~4,100, 64]` fp32 here, about 3.1 MiB: below
`attention_store.buffers.HUGE_MIN_BYTES`, so `empty_tensor` gives it ordinary pages. This probe
measures both sides of advising them huge pages instead (`MADV_HUGEPAGE` on one 2 MiB-aligned
mapping per buffer):
- the C decode attention kernels over 30 layers' K/V already in memory (the speed benchmark's
  4,000 cached tokens): a packed batch step of 8 prompts (24 rows per K/V head) and one prompt's
  step (3 rows); the flash kernel of a batch prefill for comparison;
- what a cache's buffers cost to get: allocating 60 such buffers and filling them once (as an
  assembly does), round after round in this process (round 0 is a fresh process's first touch).

    python scripts/probes/kv_pages.py [--rounds 4] [--repeats 9]
"""

import argparse
import mmap
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=4, help="allocate-and-fill rounds of each kind (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=9, help="timed calls per kernel figure (default: %(default)s)")
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


if __name__ == "__main__":
    main()
