"""OpenMP's wait policy at two threads: fresh processes answering the speed benchmark's prompt.

Every kernel call and many torch operators open an OpenMP parallel region; a decode step of
smollm2-135m opens a few hundred. Between regions libgomp's idle threads spin for a while and
then sleep (`GOMP_SPINCOUNT`, 300,000 spins by default), never spin (`OMP_WAIT_POLICY=PASSIVE`:
each region then wakes its threads through the kernel), or spin for the count given. Each
policy runs in fresh processes (the runtime reads them at load), alternating, each loading the
model, reading the speed benchmark's module from its store, answering once untimed and once
timed: cached TTFT and decode tokens/s over 32 greedy tokens. `--contention 1` runs one competing
PyTorch job (the speed benchmark's) beside all of them.

    python scripts/probes/wait_policy.py [--rounds 3] [--threads 2] [--contention 0] [--spins 1000,5000,20000]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import _setup


def policies(spins: list[int]) -> dict[str, dict[str, str]]:
    """name -> the environment a child starts with."""
    named = {"passive": {"OMP_WAIT_POLICY": "PASSIVE"}, "default": {}}  # default: libgomp's 300,000 spins
    return named | {f"spin {n}": {"GOMP_SPINCOUNT": str(n)} for n in spins}


def child(run: Path, model: str, threads: int) -> None:
    from prompt_cache.generation import GenerationConfig

    pc, prompt = _setup.speed_store_prompt(run, model, threads)
    cfg = GenerationConfig(max_new_tokens=32, eos_ids=())
    pc.answer(prompt, config=cfg)  # untimed: the first forward's one-time work
    r = pc.answer(prompt, config=cfg)
    assert r.usage.cached_tokens > 0, "the store holds no states for this prompt: run the speed benchmark first"
    print(json.dumps({"ttft_ms": r.timing.ttft_ms, "tok_s": r.timing.decode_tokens_per_s, "tokens": list(r.token_ids)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", default="runs/speed/smollm2-135m")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--contention", type=int, default=0)
    p.add_argument("--spins", default="1000,5000,20000", help="GOMP_SPINCOUNT values to try beside passive and default")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(Path(args.run_dir), args.model, args.threads)
    run = _setup.speed_run(args.run_dir, args.model)
    from experiments.speed_extras import Contention
    from prompt_cache.threads import WAIT_ENV

    base = {k: v for k, v in os.environ.items() if k not in WAIT_ENV}
    named = policies([int(n) for n in args.spins.split(",") if n])
    got: dict[str, list[dict]] = {name: [] for name in named}
    with Contention(args.contention):
        for i in range(args.rounds):
            names = list(named) if i % 2 == 0 else list(reversed(named))
            for name in names:
                done = subprocess.run([sys.executable, __file__, "--child", "--run-dir", str(run), "--model", args.model,
                                       "--threads", str(args.threads)], env={**base, **named[name]},
                                      capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(done.stderr.strip()[-800:])
                got[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(f"  round {i} {name:10s} TTFT {got[name][-1]['ttft_ms']:6.0f} ms  decode {got[name][-1]['tok_s']:5.1f} tok/s",
                      flush=True)
    print(f"{args.threads} threads, {args.contention} competing process(es), medians of {args.rounds}:")
    first = next(iter(got.values()))[0]["tokens"]
    for name, rows in got.items():
        same = all(r["tokens"] == first for r in rows)
        print(f"  {name:10s} TTFT {statistics.median(r['ttft_ms'] for r in rows):6.0f} ms   decode "
              f"{statistics.median(r['tok_s'] for r in rows):5.1f} tok/s   tokens as the first run's: {same}")


if __name__ == "__main__":
    main()
