"""Fresh `pml run --json` processes with the decode kernels on and off, alternating: where a cached TTFT goes.

Uses the speed benchmark's files (run `python -m experiments.speed ...` first): its schema, prompt
and scratch store under `runs/speed/<model>/`. Prints per process the TTFT, its cache and prefill
phases, and `load_ms`. `--rebuild` deletes the kept packed weights first, so the first process with
the kernels shows what building them once costs in `load_ms`.

    python scripts/probes/kernels_fresh.py [--pairs 4] [--rebuild] [--run-dir runs/speed/smollm2-135m]
"""

import argparse
import json
import os
import subprocess
import sys

import _setup


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run-dir", default="runs/speed/smollm2-135m")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--rebuild", action="store_true")
    args = p.parse_args()
    run = _setup.speed_run(args.run_dir, args.model)
    if args.rebuild:
        from prompt_cache.models import converted_dir

        for kept in converted_dir(args.model).glob("packed-*.blocks"):
            kept.unlink()
    cmd = [sys.executable, "-m", "pml_cli.main", "run", str(run / "speed_prompt.pml"), "--schema", str(run / "speed.pml"),
           "--model", args.model, "--store", str(run / "store-scratch"), "--max-new-tokens", "1", "--threads", "1", "--json"]
    print(f"{'PML_KERNELS':12s} {'ttft_ms':>8s} {'cache_ms':>9s} {'prefill_ms':>11s} {'load_ms':>8s}  kernels")
    for _ in range(args.pairs):
        for mode in ("auto", "off"):
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PML_KERNELS": mode})
            if done.returncode != 0:
                raise SystemExit(done.stderr.strip()[-500:])
            out = json.loads(done.stdout.strip().splitlines()[-1])
            t = out["timing"]
            print(f"{mode:12s} {t['ttft_ms']:8.0f} {t['cache_ms']:9.0f} {t['prefill_ms']:11.0f} {out['load_ms']:8.0f}  {out['kernels']}")


if __name__ == "__main__":
    main()
