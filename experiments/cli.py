"""`pml bench latency|memory|quality`: the experiment commands, each in its own lazily imported module.

Every experiment module defines `add_arguments(parser)` and `run(args) -> int`. Modules are imported
only when their parser is built or run, so a missing or broken one does not take down the others.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

EXPERIMENTS = {
    "latency": "time to first token with and without the cache",
    "memory": "bytes of stored attention states per token and per schema",
    "quality": "task scores with and without the cache, and fidelity to the baseline",
    "speed": "the speed benchmark: cached vs full-prefill TTFT on one 4,000-token module, with targets",
    "batch": "a packed batch of prompts over one schema against answering them one by one: tokens/s",
    "peers": "TTFT beside llama.cpp on the same GGUF and token ids: full prefill, prefix reuse, modular reuse "
             "(optional: needs the [peers] extra)",
    "sink": "fidelity of the independent policy with and without the leading root text as attention sink",
    "recovery": "recovery policies (blend:R, link:K) against independent and schema: fidelity vs TTFT",
    "semantic": "semantic cache (L1): false-hit rate on different SQuAD questions, hit rate on surface rewrites",
    "speculative": "speculative decoding (prompt lookup): acceptance and decode tokens/s against plain greedy",
    "serving": "the server: TTFT of a repeated long prompt, and throughput of concurrent clients, cache vs no cache",
    "cost": "API workloads replayed against live servers with and without caching: hit rate, TTFT, cost",
}


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # as prompt_cache.models.DEVICE_MAPS


def count(text: str) -> int:
    """An argparse type: a whole number >= 0 (`pml` and the experiments), else a one-line error."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return n


def add_device_arguments(p: argparse.ArgumentParser) -> None:
    """`--device` and `--device-map` for every command that loads a model (experiments and `pml`)."""
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps: the whole model on one device (default: cpu; "
                                    "under `accelerate launch`, each process's own device)")
    p.add_argument("--device-map", choices=DEVICE_MAPS,
                   help="split the model's layers across every visible GPU with accelerate (e.g. auto), "
                        "for models too big for one; stored states are kept per layer on that layer's device")
    p.add_argument("--model-dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="dtype the weights are loaded in (default: %(default)s; fp16 or bf16 on a GPU)")


def model_dtype(args: argparse.Namespace):
    """The torch dtype of `--model-dtype` (fp32 when the parser has no such option)."""
    from attention_store.dtypes import storage_dtype

    return storage_dtype(getattr(args, "model_dtype", "fp32"))


def _module(name: str):
    return importlib.import_module(f"experiments.{name}")


def add_experiments(sub) -> None:
    """One sub-command per experiment whose module imports; the others say why they are missing."""
    for name, help_text in EXPERIMENTS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            _module(name).add_arguments(p)
        except Exception as e:  # noqa: BLE001 - one broken experiment must not hide the others
            p.set_defaults(func=_unavailable(name, e))
            continue
        p.set_defaults(func=_dispatch(name))


def _dispatch(name: str):
    def call(args: argparse.Namespace) -> int:
        logging.basicConfig(level=logging.WARNING, format="pml: %(message)s", stream=sys.stderr)
        try:
            return _module(name).run(args)
        except (FileNotFoundError, ValueError) as e:
            print(f"pml bench {name}: error: {e}", file=sys.stderr)
            return 2
    return call


def _unavailable(name: str, error: Exception):
    def call(args: argparse.Namespace) -> int:
        print(f"pml bench {name}: unavailable: experiments.{name} failed to import ({error})", file=sys.stderr)
        return 2
    return call


def add_bench(subparsers) -> None:
    """Add `bench` with one sub-command per experiment to an argparse subparsers object."""
    p = subparsers.add_parser("bench", help="run an experiment (latency, memory, quality)",
                              description="Reproduction experiments; results go under runs/.")
    sub = p.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    add_experiments(sub)


def build_parser(prog: str = "python -m experiments") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Prompt Cache reproduction experiments")
    sub = parser.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    add_experiments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """`python -m experiments ...` (and `python -m experiments.X`): sets the OpenMP wait policy as
    `pml` does (nothing imports torch before this), so both commands measure the same process."""
    from prompt_cache.threads import set_wait_policy

    set_wait_policy(long_running=False)
    args = build_parser().parse_args(argv)
    return args.func(args)
