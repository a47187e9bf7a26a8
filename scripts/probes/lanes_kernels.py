"""The C kernels of a packed batch of 8 (smollm2-135m shapes, 4,000 cached tokens) built several ways, side by side.

Each variant is the kernel source compiled as the library compiles it (same compiler and flags),
loaded with ctypes and called through `attention_store.kernels.ops`:
- `before`: the source at `--baseline` (default 82d7e02, the kernels before query rows went into
  vector lanes);
- `now`: the source in this checkout;
- `now, row tiles`: this source with `-DLANE_ROWS` past every row count (decode attention's row
  tiles for a batch's 24 rows per head);
- `now, one key chunk`: decode attention's lanes without splitting a head's keys;
- `now, one PV pass`: decode attention's lanes reading V in one pass per tile, not in blocks;
- `now, one matvec pass`: no chunks of input blocks for long input rows;
- `now, no prefetch`: the lanes' score tiles without asking L2 for K and V ahead;
- `now, lanes flash`: the flash kernel's scores on the lanes tiles whatever the CPU (the default
  with AVX-512VL; with `--avx2` it is the 1-vector lanes tile against the key panels kept there).
Workloads, per decode step or prefill (30 layers, each layer's K/V and weights distinct buffers,
as in a real step, so nothing stays in cache between layers): decode attention of a batch step
(and, for what memory costs it, the same over one layer's K/V 30 times, which stays in cache)
(24 query rows per K/V head, a mask row per prompt), flash attention of the batch's prefill (187
fresh tokens as the batch's 8 questions give, masked here as 11 prompts of 17: 561 rows per
head) and of one prompt's (25 tokens: 75 rows), and the packed Q4_1 products of a step for 8
input rows and for 1 (a plain decode step) (down projection 576 x 1,536; gate 1,536 x 576; q 576 x 576).
Medians of `--repeats` calls, at each of `--threads`. `--avx2` builds every variant without
AVX-512 (`-mno-avx512f`), as on a CPU that has AVX2 alone.

    python scripts/probes/lanes_kernels.py [--threads 1 2] [--repeats 7] [--baseline REV] [--avx2]
"""

import argparse
import ctypes
import subprocess
import tempfile
from pathlib import Path

import _setup

ROOT = Path(__file__).resolve().parents[2]
KV, D, LAYERS, CONTEXT = 3, 64, 30, 4000
VARIANTS = {"now, row tiles": ["-DLANE_ROWS=1000000"], "now, one key chunk": ["-DLANE_CHUNK_KEYS=1000000000", "-DLANE_MIN_TASKS=1"],
            "now, one PV pass": ["-DLANE_PV_KEYS=1000000000"], "now, one matvec pass": ["-DMV_X_BYTES=1000000000"],
            "now, no prefetch": ["-DLANE_PF_KEYS=0"], "now, lanes flash": ["-DFLASH_LANES=1"]}


def build(source: str, defines: list[str], out: Path) -> ctypes.CDLL:
    from attention_store import kernels

    src = out.with_suffix(".c")
    src.write_text(source)
    subprocess.run([kernels._compiler(), *kernels.FLAGS, *defines, str(src), "-o", str(out), "-lm"], check=True)
    lib = ctypes.CDLL(str(out))
    kernels._declare(lib)
    return lib


def batch_mask(prompts: int, fresh: int, step: int):
    """Additive mask rows of a packed batch: prompt p sees the module and its own `fresh` tokens
    (causally when `step` is False) and none of the others'."""
    import torch

    t = CONTEXT + prompts * fresh
    allowed = torch.zeros(prompts * (1 if step else fresh), t, dtype=torch.bool)
    allowed[:, :CONTEXT] = True
    for p in range(prompts):
        own = slice(CONTEXT + p * fresh, CONTEXT + (p + 1) * fresh)
        if step:
            allowed[p, own] = True
        else:
            allowed[p * fresh:(p + 1) * fresh, own] = torch.ones(fresh, fresh, dtype=torch.bool).tril()
    return torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)[None, None]


def q4_1_blocks(n_out: int, n_in: int):
    """Random Q4_1 blocks as the library packs them (fp32 d and m, then 16 bytes of nibbles)."""
    import torch

    blocks = torch.randint(0, 256, (n_out, n_in // 32, 24), dtype=torch.uint8)
    scales = torch.stack([torch.rand(n_out, n_in // 32) * 0.01, torch.rand(n_out, n_in // 32) * -0.05], -1)
    blocks[..., :8] = scales.contiguous().view(torch.uint8)
    return blocks


def workloads():
    import torch

    from attention_store.kernels import ops

    def kv(t):  # per layer, as the cache holds them: [1, KV, capacity, D] viewed up to t
        return [(torch.randn(1, KV, t + 64, D)[:, :, :t], torch.randn(1, KV, t + 64, D)[:, :, :t]) for _ in range(LAYERS)]

    step_kv, step_mask = kv(CONTEXT + 8 * 26), batch_mask(8, 26, step=True)
    step_q = torch.randn(1, KV, 3 * 8, D)
    pre_kv, pre_mask = kv(CONTEXT + 187), batch_mask(11, 17, step=False)
    pre_q = torch.randn(1, KV, 3 * 187, D)
    one_kv, one_mask = kv(CONTEXT + 25), batch_mask(1, 25, step=False)
    one_q = torch.randn(1, KV, 3 * 25, D)
    mats = {(o, i): [q4_1_blocks(o, i) for _ in range(LAYERS)] for o, i in ((576, 1536), (1536, 576), (576, 576))}
    xs = {i: torch.randn(8, i) for i in (576, 1536)}
    x1 = {i: torch.randn(1, i) for i in (576, 1536)}
    out = {
        "decode attention, batch step (24 rows)": lambda: [ops.decode_attention(step_q, k, v, step_mask, 0.125)
                                                          for k, v in step_kv],
        "the same, one layer's K/V 30 times (cached)": lambda: [ops.decode_attention(step_q, *step_kv[0], step_mask, 0.125)
                                                               for _ in step_kv],
        "flash attention, batch prefill (561 rows)": lambda: [ops.flash_attention(pre_q, k, v, pre_mask, 0.125)
                                                             for k, v in pre_kv],
        "flash attention, one prefill (75 rows)": lambda: [ops.flash_attention(one_q, k, v, one_mask, 0.125)
                                                          for k, v in one_kv],
    }
    for (o, i), ws in mats.items():
        out[f"matvec {o} x {i}, 8 rows"] = lambda ws=ws, o=o, i=i: [ops.matvec("q4_1", w, xs[i], o) for w in ws]
    for (o, i), ws in mats.items():
        out[f"matvec {o} x {i}, 1 row"] = lambda ws=ws, o=o, i=i: [ops.matvec("q4_1", w, x1[i], o) for w in ws]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=7, help="timed calls per median (default: %(default)s)")
    p.add_argument("--baseline", default="82d7e02", help="git revision of the `before` source (default: %(default)s)")
    p.add_argument("--avx2", action="store_true", help="build without AVX-512 (-mno-avx512f)")
    args = p.parse_args()
    extra = ["-mno-avx512f"] if args.avx2 else []

    import torch

    from attention_store import kernels

    source = (ROOT / "attention_store/kernels/pml_kernels.c").read_text()
    shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{args.baseline}:attention_store/kernels/pml_kernels.c"],
                           capture_output=True, text=True)
    if shown.returncode != 0:
        raise SystemExit(f"--baseline {args.baseline}: {shown.stderr.strip()} (give a git revision of this checkout)")
    before = shown.stdout
    with tempfile.TemporaryDirectory() as tmp:
        libs = {"before": build(before, extra, Path(tmp) / "before.so"), "now": build(source, extra, Path(tmp) / "now.so")}
        libs.update({name: build(source, extra + flags, Path(tmp) / f"v{i}.so") for i, (name, flags) in enumerate(VARIANTS.items())})
        print("SIMD:", ", ".join(f"{name} {kernels.SIMD_NAMES[lib.pml_kernels_simd()]}" for name, lib in libs.items()))
        work = workloads()
        for threads in args.threads:
            torch.set_num_threads(threads)
            print(f"\n{threads} thread(s), ms (median of {args.repeats}):")
            print(f"  {'':46s}" + "".join(f"{name:>22s}" for name in libs))
            for name, fn in work.items():
                row = []
                for lib in libs.values():
                    kernels._lib = lib
                    row.append(_setup.median_ms(fn, args.repeats))
                print(f"  {name:46s}" + "".join(f"{ms:22.1f}" for ms in row))


if __name__ == "__main__":
    main()
