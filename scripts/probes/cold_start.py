"""The first cached answer of a fresh process, with and without `adapter.warm_up` at load.

Builds a store with the speed benchmark's 4,000-token module (once), then runs fresh processes in
alternation, `--runs` of each: load smollm2-135m (one thread), open the store, answer the
speed prompt from the disk tier with one new token, and answer it again (memory tier). Without
warm-up, the child replaces `adapter.warm_up` by a no-op before loading. Prints each process's
load, first TTFT with its cache and prefill parts, and second TTFT.

    python scripts/probes/cold_start.py [--runs 5] [--store DIR]
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import _setup


def child(mode: str, store: str, schema: str, prompt: str) -> None:
    import torch

    from attention_store import adapter
    from attention_store.store import open_store
    from prompt_cache.engine import PromptCache
    from prompt_cache.generation import GenerationConfig
    from prompt_cache.models import load_model
    from prompt_cache.timing import Clock

    torch.set_num_threads(1)
    if mode == "without":
        adapter.warm_up = lambda model: None
    clock = Clock()
    t = clock.now()
    lm = load_model("smollm2-135m")
    load_ms = clock.ms_since(t)
    pc = PromptCache(lm, open_store(store, lm))
    pc.add_schema(Path(schema).read_text())
    one = GenerationConfig(max_new_tokens=1)
    first = pc.answer(Path(prompt).read_text(), config=one)
    second = pc.answer(Path(prompt).read_text(), config=one)
    print(json.dumps({"warm_up": mode, "load_ms": round(load_ms), "ttft_ms": round(first.timing.ttft_ms),
                      "cache_ms": round(first.timing.cache_ms), "prefill_ms": round(first.timing.prefill_ms),
                      "second_ttft_ms": round(second.timing.ttft_ms)}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(*sys.argv[2:6])
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--store", default=None, help="work folder for the store and PML files (default: a temporary one)")
    args = ap.parse_args()
    work = Path(args.store or tempfile.mkdtemp(prefix="pml-cold-"))
    work.mkdir(parents=True, exist_ok=True)
    from attention_store.store import open_store
    from prompt_cache.engine import PromptCache

    pc, schema, prompt = _setup.speed_prompt()
    (work / "speed.pml").write_text(schema)
    (work / "prompt.pml").write_text(prompt)
    disk = PromptCache(pc.lm, open_store(work / "store", pc.lm))  # the module's states on disk
    disk.add_schema(schema)
    disk.encode("speed")
    for r in range(args.runs):
        for mode in (("without", "with") if r % 2 == 0 else ("with", "without")):
            out = subprocess.run([sys.executable, __file__, "--child", mode, str(work / "store"),
                                  str(work / "speed.pml"), str(work / "prompt.pml")],
                                 capture_output=True, text=True, check=True)
            print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
