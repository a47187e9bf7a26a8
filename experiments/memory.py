"""Memory experiment (`pml bench memory`): stored bytes per token per model and dtype, store size per workload, peak RSS.

Three tables per model:

- bytes per token: computed from the config (2 x layers x kv_heads x head_dim x dtype size) and
  measured, by encoding a real document into a store with each storage dtype: bytes of the stored
  tensors (memory tier) and sizes of the safetensors files (disk tier, headers and token ids included),
  each divided by the stored tokens;
- store size per workload: a document-QA schema of `--doc-tokens` tokens (LongBench multi_news) and
  a 20-passage MuSiQue schema (one module per passage), encoded at fp32;
- peak process memory (RSS sampled every few ms, and the lifetime `ru_maxrss`) while encoding each
  workload and answering it with and without the cache.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from attention_store.dtypes import STORAGE_DTYPES
from experiments import cli, outputs
from experiments.data import data_dir
from experiments.common import document_pool, exact_text, reset_store_dir
from experiments.workloads import prompt_xml, schema_xml

DEFAULT_MODELS = ("smollm2-135m", "gemma3-270m")
DOC_QUESTION = "What are the main events reported in these articles?"
MIB = 2**20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "--models", dest="models", default=",".join(DEFAULT_MODELS),
                        help="models, comma-separated: registry names, dirs or tiny:<arch> (default: %(default)s)")
    parser.add_argument("--dtypes", default=",".join(STORAGE_DTYPES), help="storage dtypes to measure (default: %(default)s)")
    parser.add_argument("--probe-tokens", type=cli.positive, default=512,
                        help="tokens of the document encoded per dtype for bytes/token (default: %(default)s)")
    parser.add_argument("--doc-tokens", type=cli.positive, default=2048,
                        help="tokens of the document-QA workload (default: %(default)s)")
    parser.add_argument("--passages", type=cli.positive, default=20, help="MuSiQue passages per schema (default: %(default)s)")
    parser.add_argument("--limit", type=cli.positive, default=None, help="run only the first N models (quick runs)")
    cli.add_threads_argument(parser)
    cli.add_run_arguments(parser, "memory")
    cli.add_device_arguments(parser)


# --------------------------------------------------------------------------- measuring memory


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def maxrss_bytes() -> int:
    """Lifetime peak RSS of this process (`ru_maxrss` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@contextmanager
def peak_rss(result: dict, clock=None, interval_s: float = 0.005):
    """Sample RSS in a thread while the block runs; fills result with before/peak/after bytes and ms.

    `clock` (a `prompt_cache.timing.Clock`, default the CPU's) times the block.
    """
    from prompt_cache.timing import Clock

    clock = clock or Clock()
    before = rss_bytes()
    peak = [before]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_bytes())
            stop.wait(interval_s)

    thread = threading.Thread(target=sample, daemon=True)
    t = clock.now()
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        after = rss_bytes()
        result.update(rss_before=before, rss_peak=max(peak[0], after), rss_after=after,
                      ms=clock.ms_since(t))


def disk_bytes(store_dir: Path) -> int:
    """Bytes of the entry files of a store folder."""
    return sum(p.stat().st_size for p in Path(store_dir).glob("??/*.safetensors"))


# --------------------------------------------------------------------------- workloads


def musique_schema(data: Path, passages: int, tokenizer) -> tuple[str, str, int]:
    """(schema xml, prompt xml, n) for the first MuSiQue item: one module per passage."""
    from pml.builder import PromptBuilder, SchemaBuilder

    path = data / "multidoc" / "musique_train100_longbench_style.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass --data DIR (or set PML_DATA) to the shared data folder")
    item = json.loads(path.open().readline())
    chosen = item["passages"][:passages]
    b = SchemaBuilder("musique")
    b.system("Answer the question using the passages below.")
    p = PromptBuilder("musique")
    for i, doc in enumerate(chosen):
        b.module(f"p{i}", text=f"Passage {i + 1}:\n{doc['title']}\n{doc['text']}\n")
        p.use(f"p{i}")
    return b.to_xml(), p.user(item["input"]).to_xml(), len(chosen)


def workloads(data: Path, lm, doc_tokens: int, passages: int) -> list[tuple[str, str, str, str]]:
    """(name, schema name, schema xml, prompt xml) of each workload."""
    pool = document_pool(data, lm.tokenizer, doc_tokens)
    text, _ = exact_text(lm.tokenizer, pool, doc_tokens)
    doc = ("document-qa", "docqa", schema_xml("docqa", [text]), prompt_xml("docqa", 1, DOC_QUESTION))
    mxml, mprompt, n = musique_schema(data, passages, lm.tokenizer)
    return [doc, (f"musique-{n}-passages", "musique", mxml, mprompt)]


# --------------------------------------------------------------------------- the experiment


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from attention_store.adapter import kv_shape
    from attention_store.dtypes import storage_dtype
    from attention_store.store import open_store
    from prompt_cache.engine import PromptCache
    from prompt_cache.generation import GenerationConfig

    cli.apply_threads(args)
    models = [m for m in str(args.models).split(",") if m.strip()][: args.limit]
    dtypes = [d for d in str(args.dtypes).split(",") if d.strip()]
    for d in dtypes:
        if d not in STORAGE_DTYPES:
            raise SystemExit(f"unknown dtype {d!r}: choose from {', '.join(STORAGE_DTYPES)}")
    out = outputs.run_dir("memory", args.out)
    items = outputs.ItemLog(out / "items.jsonl")
    from prompt_cache.models import load_model

    data = data_dir(args.data)
    answer_cfg = GenerationConfig(max_new_tokens=4, eos_ids=())

    for model in tqdm(models, desc="memory", unit="model"):
        ids = [f"{model}|bpt|{d}" for d in dtypes]
        if all(items.done(i) for i in ids) and items.done(f"{model}|workload|musique") and items.done(f"{model}|workload|docqa"):
            continue
        load: dict = {}
        with peak_rss(load):
            lm = load_model(model, cli.model_dtype(args), device=args.device, device_map=args.device_map)
        layers, kv_heads, head_dim = kv_shape(lm.model.config)
        scratch = out / "store-scratch"
        base = {"model": model, "layers": layers, "kv_heads": kv_heads, "head_dim": head_dim,
                "load_rss_growth_MiB": (load["rss_after"] - load["rss_before"]) / MIB}

        # Bytes per token, per storage dtype.
        probe, _ = exact_text(lm.tokenizer, document_pool(data, lm.tokenizer, args.probe_tokens), args.probe_tokens)
        for d in dtypes:
            if items.done(f"{model}|bpt|{d}"):
                continue
            pc = PromptCache(lm, open_store(reset_store_dir(scratch), lm), storage_dtype=d)
            pc.add_schema(schema_xml("probe", [probe]))
            rep = pc.encode("probe")
            items.add({"id": f"{model}|bpt|{d}", "table": "bytes_per_token", **base, "dtype": d,
                       "computed_bytes_per_token": 2 * layers * kv_heads * head_dim * storage_dtype(d).itemsize,
                       "measured_bytes_per_token": _num(rep.bytes / rep.tokens),
                       "disk_bytes_per_token": _num(disk_bytes(scratch) / rep.tokens),
                       "tokens": rep.tokens, "entries": rep.modules})

        # Store size and peak memory per workload (fp32, the model's own dtype).
        for name, schema, xml, prompt in workloads(data, lm, args.doc_tokens, args.passages):
            if items.done(f"{model}|workload|{schema}"):
                continue
            pc = PromptCache(lm, open_store(reset_store_dir(scratch), lm))
            pc.add_schema(xml)
            enc, cached, full = {}, {}, {}
            with peak_rss(enc, pc.clock):
                rep = pc.encode(schema)
            with peak_rss(cached, pc.clock):
                res_c = pc.answer(prompt, config=answer_cfg)
            with peak_rss(full, pc.clock):
                res_f = pc.answer(prompt, use_cache=False, config=answer_cfg)
            row = {"id": f"{model}|workload|{schema}", "table": "workload", **base, "workload": name,
                   "dtype": "fp32", "modules": rep.modules, "stored_tokens": rep.tokens,
                   "prompt_tokens": res_f.usage.prompt_tokens, "store_MiB": rep.bytes / MIB,
                   "disk_MiB": disk_bytes(scratch) / MIB, "fp16_store_MiB": rep.bytes / 2 / MIB,
                   "encode_ms": enc["ms"], "ttft_cached_ms": res_c.timing.ttft_ms, "ttft_full_ms": res_f.timing.ttft_ms}
            for phase, m in (("encode", enc), ("answer_cached", cached), ("answer_full", full)):
                row[f"rss_before_{phase}_MiB"] = m["rss_before"] / MIB
                row[f"rss_peak_{phase}_MiB"] = m["rss_peak"] / MIB
                row[f"rss_growth_{phase}_MiB"] = (m["rss_peak"] - m["rss_before"]) / MIB
            row["maxrss_MiB"] = maxrss_bytes() / MIB  # lifetime peak of this process so far
            items.add(row)
        del lm
    shutil.rmtree(out / "store-scratch", ignore_errors=True)

    rows = list(items.rows.values())
    bpt = [r for r in rows if r["table"] == "bytes_per_token"]
    work = [r for r in rows if r["table"] == "workload"]
    summary = [{k: v for k, v in r.items() if k not in ("id", "table")} for r in bpt + work]
    for r, src in zip(summary, bpt + work):
        r["table"] = src["table"]
    outputs.write_csv(out / "summary.csv", summary)
    write_report(out, bpt, work)
    print(f"memory: {len(bpt)} dtype rows, {len(work)} workload rows -> {out}/summary.csv, report.md")
    return 0


def _num(x: float) -> int | float:
    """Bytes as ints (rounded from 100 up), so that tables print 1098, not 1.1e+03."""
    return int(round(x)) if float(x).is_integer() or abs(x) >= 100 else round(x, 1)


def write_report(out: Path, bpt: list[dict], work: list[dict]) -> None:
    bpt_cols = ["model", "dtype", "layers", "kv_heads", "head_dim", "computed_bytes_per_token",
                "measured_bytes_per_token", "disk_bytes_per_token", "tokens"]
    work_cols = ["model", "workload", "modules", "stored_tokens", "store_MiB", "disk_MiB", "fp16_store_MiB",
                 "encode_ms", "ttft_cached_ms", "ttft_full_ms"]
    rss_cols = ["model", "workload", "load_rss_growth_MiB", "rss_before_encode_MiB", "rss_growth_encode_MiB",
                "rss_growth_answer_cached_MiB", "rss_growth_answer_full_MiB", "maxrss_MiB"]
    models = ", ".join(dict.fromkeys(r["model"] for r in bpt + work))
    outputs.write_report(out / "report.md", "Memory: attention store size and process memory", model=models,
                         dtype="weights fp32; storage dtype per row", sections=[
        ("Bytes per stored token", "computed = 2 x layers x kv_heads x head_dim x dtype size; measured = "
         "stored key/value bytes / tokens; disk = safetensors file bytes / tokens (headers, token ids, "
         "positions included).\n\n" + outputs.markdown_table(bpt, bpt_cols)),
        ("Store size per workload (fp32 storage; fp16 halves it)", outputs.markdown_table(work, work_cols)),
        ("Process memory (MiB)", "RSS sampled every 5 ms during each phase; growth = peak during the phase - "
         "RSS before it (`load` = RSS added by loading the model: freed memory reused by a later model hides "
         "part of it); `maxrss` = lifetime peak of the process when the row finished.\n\n"
         + outputs.markdown_table(work, rss_cols)),
    ])


if __name__ == "__main__":  # python -m experiments.memory: the same parser as `pml bench memory`
    from experiments.cli import main

    raise SystemExit(main(["memory", *sys.argv[1:]]))
