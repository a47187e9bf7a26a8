"""The speed benchmark's conditions and reference lines: competing processes, fresh `pml run`
processes, and the physical limit of the cached forward on this machine.

- `Contention(n)`: n competing processes for the length of a measurement. Each one is the kind of
  neighbour that hurts: a PyTorch job running multi-threaded matmuls at torch's default thread
  count (a pure-Python busy loop hurts far less). They stop by themselves: at a deadline, and as
  soon as their parent is gone (they poll `os.getppid()`), so a killed benchmark leaves nothing.
- `cli_runs`: `pml run` as fresh processes (model load, store open, one answer), full prefill and
  cached interleaved; TTFT and `load_ms` from its `--json` output, wall time from outside.
- `physical_limit`: FLOPs of the cached forward divided by this machine's measured matmul
  throughput, and bytes it must read (weights + cached K/V) divided by measured copy bandwidth,
  at the benchmark's thread count, in the same run.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMPETITOR_SECONDS = 1800  # a competitor never outlives this, whatever happens to its parent
COMPETITOR = """
import os, sys, time
import torch
deadline, parent = time.monotonic() + float(sys.argv[1]), int(sys.argv[2])
a = torch.randn(768, 768)
while time.monotonic() < deadline and os.getppid() == parent:
    a = torch.tanh(a @ a)
"""


class Contention:
    """`with Contention(n):` n bounded competing PyTorch processes (none for n = 0)."""

    def __init__(self, n: int, seconds: float = COMPETITOR_SECONDS):
        self.n, self.seconds = n, seconds
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> "Contention":
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        for _ in range(self.n):
            self.procs.append(subprocess.Popen(
                [sys.executable, "-c", COMPETITOR, str(self.seconds), str(os.getpid())], env=env,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        if self.n:
            time.sleep(2.0)  # let them import torch and start multiplying before anything is timed
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()

    def alive(self) -> int:
        return sum(p.poll() is None for p in self.procs)


def cli_runs(model: str, schema: Path, prompt: Path, store: Path, threads: int, repeats: int,
             progress=None) -> list[dict]:
    """`pml run --json` as fresh processes, `full` (--no-cache) and `cached` interleaved per repeat."""
    from prompt_cache.timing import Clock

    clock = Clock()  # wall time of each child process, read in this one
    rows = []
    for r in range(repeats):
        for mode in (("full", "cached") if r % 2 == 0 else ("cached", "full")):
            cmd = [sys.executable, "-m", "pml_cli.main", "run", str(prompt), "--schema", str(schema), "--model", model,
                   "--store", str(store), "--max-new-tokens", "1", "--threads", str(threads), "--json"]
            if mode == "full":
                cmd.append("--no-cache")
            t = clock.now()
            done = subprocess.run(cmd, capture_output=True, text=True)
            wall = clock.ms_since(t)
            if done.returncode != 0:
                raise RuntimeError(f"pml run failed ({done.returncode}): {done.stderr.strip()[-500:]}")
            out = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append({"mode": mode, "repeat": r, "ttft_ms": out["timing"]["ttft_ms"],
                         "cache_ms": out["timing"]["cache_ms"], "prefill_ms": out["timing"]["prefill_ms"],
                         "load_ms": out["load_ms"], "process_ms": wall, "cached_tokens": out["usage"]["cached_tokens"]})
            if progress is not None:
                progress(rows[-1])
    return rows


def cli_summary(rows: list[dict]) -> tuple[list[dict], float]:
    """Medians per mode and the full / cached TTFT ratio."""
    table = []
    for mode in ("full", "cached"):
        got = [r for r in rows if r["mode"] == mode]
        table.append({"mode": mode, "repeats": len(got),
                      **{f"{k}_median": statistics.median(r[k] for r in got) for k in ("ttft_ms", "cache_ms", "prefill_ms", "load_ms", "process_ms")}})
    return table, table[0]["ttft_ms_median"] / table[1]["ttft_ms_median"]


def time_ms(fn, repeats: int = 7, pick=min) -> float:
    """`pick` (min by default: the best case) of `repeats` timings of `fn()` in ms, after one
    untimed call (CPU work: the clock synchronizes the CPU, which is a no-op)."""
    from prompt_cache.timing import Clock

    clock = Clock()
    fn()
    times = []
    for _ in range(repeats):
        t = clock.now()
        fn()
        times.append(clock.ms_since(t))
    return pick(times)


def physical_limit(lm, fresh: int, cached: int) -> dict:
    """The cached forward's FLOPs and bytes against this machine's measured throughput (this thread count).

    FLOPs: 2 x (non-embedding parameters) x fresh tokens, the LM head for the last position only,
    and attention: 4 x layers x query heads x head dim x fresh x (cached + fresh) (QK^T and PV).
    Bytes: every weight once plus the cached keys and values once. Throughput: the best of several
    `torch.nn.functional.linear` calls shaped like the model's MLP for `fresh` tokens, and the best
    of several copies of a 256 MiB tensor (read + write counted). Best-of, so the bound is optimistic.
    """
    import torch

    from attention_store.adapter import kv_shape

    model = lm.model
    cfg = model.config.get_text_config(decoder=True)
    layers, kv_heads, head_dim = kv_shape(model.config)
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    params = sum(p.numel() for p in model.parameters())
    tied = emb.data_ptr() == head.data_ptr()
    body = params - emb.numel() - (0 if tied else head.numel())
    flops = (2 * body * fresh + 2 * head.numel()
             + 4 * layers * cfg.num_attention_heads * head_dim * fresh * (cached + fresh))
    dtype = emb.dtype
    x = torch.randn(fresh, cfg.hidden_size, dtype=dtype)
    w = torch.randn(cfg.intermediate_size, cfg.hidden_size, dtype=dtype)
    mm_ms = time_ms(lambda: torch.nn.functional.linear(x, w))
    gflops = 2 * fresh * cfg.hidden_size * cfg.intermediate_size / mm_ms / 1e6
    src = torch.empty(64 << 20, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), repeats=5)
    gbs = 2 * src.numel() * 4 / copy_ms / 1e6  # read + write
    nbytes = params * emb.element_size() + 2 * layers * kv_heads * head_dim * cached * emb.element_size()
    compute_ms = flops / gflops / 1e6
    memory_ms = nbytes / gbs / 1e6
    return {"flops_g": flops / 1e9, "matmul_gflops": gflops, "compute_bound_ms": compute_ms,
            "bytes_mb": nbytes / 1e6, "copy_gb_s": gbs, "bandwidth_bound_ms": memory_ms,
            "bound_ms": max(compute_ms, memory_ms), "bound": "compute" if compute_ms >= memory_ms else "bandwidth"}


def decode_compare(pc, prompt: str, tokens: int = 32, repeats: int = 3) -> dict:
    """Greedy decoding after the cached prefill as `answer` does it now (preallocated cache written
    in place, grouped query heads read each key/value head once, the C kernels where they are in
    use) against the earlier behaviour (`DynamicCache` layers that concatenate every step,
    transformers' own sdpa attention, torch's kernels only),
    interleaved in one process; tokens/s medians and whether the tokens are identical."""
    from attention_store import adapter, kernels
    from prompt_cache import generation
    from prompt_cache.generation import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=tokens, eos_ids=())
    model = pc.lm.model
    s, bound = pc.bind(prompt)
    rates: dict[str, list[float]] = {"now": [], "before": []}
    out: dict[str, list[int]] = {}
    try:
        for r in range(repeats):
            for mode in (("now", "before") if r % 2 == 0 else ("before", "now")):
                model.set_attn_implementation(adapter.ATTENTION if mode == "now" else "sdpa")
                with contextlib.nullcontext() if mode == "now" else kernels.disabled():
                    ready = pc.assemble(s, bound, room=tokens if mode == "now" else None)
                    logits, state = pc.prefill(ready)
                    t = pc.clock.now()
                    got = list(generation.decode(pc.lm, state, logits, cfg))
                    rates[mode].append((len(got) - 1) / (pc.clock.now() - t))
                out[mode] = got
    finally:
        model.set_attn_implementation(adapter.ATTENTION)
    med = {m: statistics.median(v) for m, v in rates.items()}
    return {"tokens": tokens, "now_tok_s": med["now"], "before_tok_s": med["before"],
            "ratio": med["now"] / med["before"], "identical": out["now"] == out["before"]}
