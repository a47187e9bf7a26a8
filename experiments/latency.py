"""Latency experiment (`pml bench latency`): TTFT with cached modules (memory and disk tier) vs full prefill.

For each context length L and module count K, a real document (LongBench multi_news contexts, cut to
exactly L tokens) is split into K modules of L/K tokens; a prompt selects all of them and asks a
question as new user text. Per repeat, the three ways of answering run back to back, in an order
rotated between repeats so that drift on a shared machine hits each alike:

- `full`: `answer(use_cache=False)`, one ordinary prefill of the whole prompt;
- `memory`: `answer()` with every module already in the memory tier;
- `disk`: `answer()` from a freshly opened store over the same folder (empty memory tier), so the
  states are read from their safetensors files (the OS page cache may hold them: nothing here drops it).

TTFT is split into cache (lookup + copy), prefill of the fresh tokens, and the decode rate of the
following tokens. Schema encoding is timed once per (L, K) and kept out of TTFT, as in the paper.
"""

from __future__ import annotations

import argparse
import sys
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path

from experiments import cli, distributed, outputs
from experiments.common import (document_pool, module_tokens, piece_sizes, reset_store_dir,
                                rotated, split_exact, summarize)
from experiments.data import data_dir
from experiments.workloads import prompt_xml, schema_xml
from prompt_cache import DEFAULT_MODEL

DEFAULT_LENGTHS = (256, 512, 1024, 2048, 4096)
DEFAULT_MODULES = (1, 4, 16)
MODES = ("full", "memory", "disk")
QUESTION = "Summarize the main events described in the news articles above in a few sentences, naming the people and places involved."


# --------------------------------------------------------------------------- the experiment


@dataclass(frozen=True)
class Point:
    length: int  # context tokens (all modules together)
    modules: int  # number of modules the context is split into

    @property
    def tag(self) -> str:
        return f"L{self.length}-K{self.modules}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="registry name, model dir, or tiny:<arch> (default: %(default)s)")
    parser.add_argument("--lengths", type=cli.listed(cli.positive), default=",".join(map(str, DEFAULT_LENGTHS)),
                        help="context lengths in tokens, comma-separated (default: %(default)s; 8192 works too)")
    parser.add_argument("--modules", type=cli.listed(cli.positive), default=",".join(map(str, DEFAULT_MODULES)),
                        help="module counts the context is split into (default: %(default)s)")
    parser.add_argument("--repeats", type=cli.positive, default=3, help="timed repeats per point (default: %(default)s)")
    parser.add_argument("--new-tokens", type=cli.positive, default=16, help="tokens generated per answer, for the decode rate (default: %(default)s)")
    parser.add_argument("--limit", type=cli.positive, default=None, help="run only the first N lengths (quick runs)")
    cli.add_threads_argument(parser)
    cli.add_run_arguments(parser, "latency/<model>")
    cli.add_device_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """One process, or one of several under `accelerate launch`: each takes a share of the (L, K) points."""
    import torch
    from tqdm import tqdm

    from attention_store.store import open_store
    from prompt_cache.engine import PromptCache
    from prompt_cache.generation import GenerationConfig

    lengths = list(args.lengths)
    counts = list(args.modules)
    if args.limit is not None:
        lengths = lengths[: args.limit]
    model_tag = args.model.replace(":", "-").replace("/", "_")
    out = outputs.run_dir(f"latency/{model_tag}", args.out)
    world = distributed.world()
    merged = out / "items.jsonl"
    own = distributed.shard_path(merged, world)
    items = outputs.ItemLog(own, also_read=[p for p in [merged, *distributed.shard_files(merged)] if p != own])
    # Split the full point list (not what is left), so every process computes the same split.
    points = distributed.share([Point(L, K) for L in lengths for K in counts if K <= L], world)

    cli.apply_threads(args)
    from prompt_cache.models import describe_placement, layer_devices, load_model

    state = distributed.start(world)
    lm = load_model(args.model, cli.model_dtype(args), **distributed.placement(args, world, state))
    # Under a device map the memory tier keeps each layer's states on that layer's device.
    devices = layer_devices(lm.model) if args.device_map else None
    dtype = str(next(lm.model.parameters()).dtype).removeprefix("torch.")
    pool = document_pool(data_dir(args.data), lm.tokenizer, max(lengths))
    # One scratch store per process: the disk mode must read only its own process's files.
    store_dir = reset_store_dir(out / ("store-scratch" if world.size == 1 else f"store-scratch-rank{world.rank}"))
    timed = GenerationConfig(max_new_tokens=args.new_tokens, eos_ids=())  # no EOS: always N tokens
    pc_mem = PromptCache(lm, open_store(store_dir, lm, layer_devices=devices))
    pc_disk = PromptCache(lm, open_store(store_dir, lm, layer_devices=devices))

    todo = [(p, r) for p in points for r in range(args.repeats) if not items.done(f"{p.tag}-r{r}")]
    bar = tqdm(total=len(todo), desc=f"latency {args.model}" + (f" [{world.rank}]" if world.size > 1 else ""),
               unit="repeat", position=world.rank)
    warmed = False
    for point in points:
        reps = [r for r in range(args.repeats) if not items.done(f"{point.tag}-r{r}")]
        if not reps:
            continue
        name = f"lat-{point.tag}"
        texts = split_exact(lm.tokenizer, pool, piece_sizes(point.length, point.modules))
        xml, prompt = schema_xml(name, texts), prompt_xml(name, point.modules, QUESTION)
        layout = pc_mem.add_schema(xml)
        if module_tokens(layout) != point.length:
            raise RuntimeError(f"{point.tag}: the schema's modules hold {module_tokens(layout)} tokens, not {point.length}")
        pc_disk.add_schema(xml)
        clock = pc_mem.clock
        t = clock.now()
        report = pc_mem.encode(name)
        encode_ms = clock.ms_since(t)
        if not warmed:  # first calls pay one-off costs (allocator, kernels): keep them out of every timing
            pc_disk.store = open_store(store_dir, lm, layer_devices=devices)
            for pc, use in ((pc_mem, False), (pc_mem, True), (pc_disk, True)):
                pc.answer(prompt, use_cache=use, config=timed)
            warmed = True
        for r in reps:
            row = {"id": f"{point.tag}-r{r}", "model": args.model, "dtype": dtype, "length": point.length,
                   "modules": point.modules, "repeat": r, "context_tokens": module_tokens(layout),
                   "stored_tokens": report.tokens, "stored_bytes": report.bytes, "encode_ms": encode_ms,
                   "new_tokens": args.new_tokens, "threads": torch.get_num_threads()}
            for mode in rotated(MODES, r):
                if mode == "disk":
                    pc_disk.store = open_store(store_dir, lm, layer_devices=devices)  # fresh memory tier: states come from files
                    assert len(pc_disk.store.memory) == 0
                pc = pc_disk if mode == "disk" else pc_mem
                res = pc.answer(prompt, use_cache=mode != "full", config=timed)
                if mode != "full" and res.timing.encode_ms:
                    raise RuntimeError(f"{point.tag}: {mode} answer re-encoded modules; the store lost entries")
                row.update({f"{mode}_ttft_ms": res.timing.ttft_ms, f"{mode}_cache_ms": res.timing.cache_ms,
                            f"{mode}_prefill_ms": res.timing.prefill_ms,
                            f"{mode}_decode_tok_s": res.timing.decode_tokens_per_s,
                            f"{mode}_cached_tokens": res.usage.cached_tokens,
                            f"{mode}_prompt_tokens": res.usage.prompt_tokens})
            items.add(row)
            bar.update(1)
        for row in pc_mem.store.entries():  # keep the scratch store small: one point at a time
            pc_mem.store.delete(row.meta.key)
    bar.close()
    shutil.rmtree(store_dir, ignore_errors=True)
    distributed.barrier(state)
    if not world.is_main:
        return 0

    distributed.merge_shards(merged)
    items = outputs.ItemLog(merged)
    rows = [r for r in items.rows.values() if r["model"] == args.model]
    summary = summary_rows(rows)
    placement = describe_placement(lm.model)
    for row in summary:  # where it ran, at the end so the timing columns keep their places
        row.update(placement=placement, world_size=world.size)
    outputs.write_csv(out / "summary.csv", summary)
    plot = plot_ttft(out / "ttft_vs_length.png", summary, rows, args.model)
    write_report(out, summary, args.model, dtype, plot, placement, world)
    print(f"latency: {len(rows)} repeats -> {out}/summary.csv, {plot.name}, report.md")
    return 0


STATS = ("ttft_ms", "cache_ms", "prefill_ms", "decode_tok_s")


def summary_rows(rows: list[dict]) -> list[dict]:
    """One row per (length, modules, mode): median/min/max over repeats, and speedup over full prefill."""
    groups: dict[tuple[int, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["length"], r["modules"]), []).append(r)
    out = []
    for (length, modules), reps in sorted(groups.items()):
        full = statistics.median(r["full_ttft_ms"] for r in reps)
        for mode in MODES:
            row = {"model": reps[0]["model"], "dtype": reps[0]["dtype"], "length": length, "modules": modules,
                   "mode": mode, "repeats": len(reps), "context_tokens": reps[0]["context_tokens"],
                   "prompt_tokens": reps[0][f"{mode}_prompt_tokens"], "cached_tokens": reps[0][f"{mode}_cached_tokens"]}
            for stat in STATS:
                s = summarize([r[f"{mode}_{stat}"] for r in reps])
                row.update({f"{stat}_{k}": v for k, v in s.items()})
            row["speedup"] = full / row["ttft_ms_median"]
            row["encode_ms"] = reps[0]["encode_ms"] if mode != "full" else ""
            out.append(row)
    return out


def plot_ttft(path: Path, summary: list[dict], rows: list[dict], model: str) -> Path:
    """TTFT vs context length (log-log): full prefill, and cached per tier and module count; min-max bars."""
    from experiments.plots import Series, line_plot

    lengths = sorted({r["length"] for r in rows})
    # Full prefill does not depend on the split: one curve over the repeats of every split, so its
    # bars also show how far the machine drifted between points.
    full = [[r["full_ttft_ms"] for r in rows if r["length"] == L] for L in lengths]
    series = [Series("full prefill (all splits)", lengths, [statistics.median(v) for v in full],
                     [min(v) for v in full], [max(v) for v in full], "-o")]
    styles = {"memory": "--s", "disk": ":^"}
    for mode in ("memory", "disk"):
        for k in sorted({r["modules"] for r in summary}):
            pts = sorted((r for r in summary if r["mode"] == mode and r["modules"] == k), key=lambda r: r["length"])
            if pts:
                series.append(Series(f"cached ({mode} tier, {k} module{'s' * (k > 1)})", [p["length"] for p in pts],
                                     [p["ttft_ms_median"] for p in pts], [p["ttft_ms_min"] for p in pts],
                                     [p["ttft_ms_max"] for p in pts], styles[mode]))
    return line_plot(path, series, xlabel="context tokens (cached document)", ylabel="TTFT (ms)",
                     title=f"Time to first token, {model} (median, min-max bars)", logx=True, logy=True)


def write_report(out: Path, summary: list[dict], model: str, dtype: str, plot: Path, placement: str | None = None,
                 world: distributed.World = distributed.World()) -> None:
    cols = ["length", "modules", "mode", "repeats", "ttft_ms_median", "ttft_ms_min", "ttft_ms_max",
            "cache_ms_median", "prefill_ms_median", "decode_tok_s_median", "speedup"]
    enc = sorted({(r["length"], r["modules"], r["encode_ms"]) for r in summary if r["mode"] == "memory"})
    enc_rows = [{"length": L, "modules": K, "encode_ms": e} for L, K, e in enc]
    outputs.write_report(out / "report.md", "Latency: TTFT with the attention store vs full prefill",
                         model=model, dtype=dtype, placement=placement, processes=world.describe(), sections=[
        ("TTFT", f"![TTFT vs context length]({plot.name})\n\nTimes in ms (median, min, max over repeats); "
                 "`cache` = store lookup + copy into one cache, `prefill` = forward over the fresh tokens, "
                 "`speedup` = median full-prefill TTFT / median TTFT of the row. Modes ran interleaved, "
                 "order rotated per repeat.\n\n" + outputs.markdown_table(summary, cols)),
        ("Schema encoding (once per schema, not part of TTFT)", outputs.markdown_table(enc_rows)),
    ])


if __name__ == "__main__":  # python -m experiments.latency: the same parser as `pml bench latency`
    from experiments.cli import main

    raise SystemExit(main(["latency", *sys.argv[1:]]))
