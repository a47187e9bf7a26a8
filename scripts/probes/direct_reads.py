"""Fresh processes answering the speed benchmark's prompt from the disk tier, the two ways a disk hit is read.

`promote`: the ordinary read (the whole file into a fresh buffer, checksummed, kept in the memory
tier) and then assembly's copy into the cache's buffers. `direct`: `pml run`'s way since the
direct reads (`attention_store.direct`): the file read straight into the cache's buffers,
checksummed there, not kept in memory. Alternating fresh processes, each loading the model as
`pml run` does, then answering once with one new token; prints TTFT and its cache (read and
assembly) and prefill phases. Uses the speed benchmark's files (run `python -m experiments.speed`
first).

    python scripts/probes/direct_reads.py [--pairs 4] [--run-dir runs/speed/smollm2-135m]
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import _setup


def child(run: Path, mode: str, model: str) -> None:
    from prompt_cache.generation import GenerationConfig

    pc, prompt = _setup.speed_store_prompt(run, model, threads=1, promote_disk_hits=mode == "promote")
    r = pc.answer(prompt, config=GenerationConfig(max_new_tokens=1))
    assert r.usage.cached_tokens > 0, "the store holds no states for this prompt: run the speed benchmark first"
    t = r.timing
    print(json.dumps({"mode": mode, "ttft_ms": t.ttft_ms, "cache_ms": t.cache_ms, "prefill_ms": t.prefill_ms,
                      "token": r.token_ids[0]}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run-dir", default="runs/speed/smollm2-135m")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--child", choices=("promote", "direct"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(Path(args.run_dir), args.child, args.model)
    run = _setup.speed_run(args.run_dir, args.model)
    print(f"{'mode':8s} {'ttft_ms':>8s} {'cache_ms':>9s} {'prefill_ms':>11s}  first token")
    for i in range(args.pairs):
        for mode in (("promote", "direct") if i % 2 == 0 else ("direct", "promote")):
            done = subprocess.run([sys.executable, __file__, "--child", mode, "--run-dir", str(run), "--model", args.model],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(done.stderr.strip()[-800:])
            out = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{mode:8s} {out['ttft_ms']:8.0f} {out['cache_ms']:9.0f} {out['prefill_ms']:11.0f}  {out['token']}",
                  flush=True)


if __name__ == "__main__":
    main()
