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


def _whole(text: str, least: int, most: int | None = None) -> int:
    what = f"a whole number >= {least}" if most is None else f"a whole number from {least} to {most}"
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if n < least or (most is not None and n > most):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return n


# argparse types of every numeric option of `pml` and the experiments: a bad value is a one-line
# usage error naming the option, before anything loads (never a traceback, nor a count quietly raised).
def count(text: str) -> int:
    """A whole number >= 0."""
    return _whole(text, 0)


def positive(text: str) -> int:
    """A whole number >= 1."""
    return _whole(text, 1)


def port(text: str) -> int:
    """A TCP port, 0-65535 (0: any free one)."""
    return _whole(text, 0, 65535)


def thread_count(text: str) -> int:
    """`--threads` of `pml run`/`serve`/...: a positive integer (`prompt_cache.threads.parse_threads`)."""
    from prompt_cache.threads import parse_threads

    try:
        return parse_threads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def similarity(text: str) -> float:
    """A cosine similarity threshold in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a cosine similarity in (0, 1], e.g. 0.95, got {text!r}")
    return value


def listed(item):
    """An argparse type: a comma-separated list, each entry of type `item` (`--lengths 1000,2000`);
    a bad entry is named in the one-line error."""
    def parse(text: str) -> list:
        entries = [e.strip() for e in text.split(",") if e.strip()]
        if not entries:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        out = []
        for e in entries:
            try:
                out.append(item(e))
            except argparse.ArgumentTypeError as why:
                raise argparse.ArgumentTypeError(f"{why} (in {text!r})") from None
        return out
    parse.__name__ = f"list of {item.__name__}"
    return parse


BENCH_THREADS = 1  # the benchmarks' torch threads unless told: the same count in every run and on any machine


def add_threads_argument(p: argparse.ArgumentParser, default: int | None = BENCH_THREADS, engines: str = "torch",
                         chooser: str = "pml run") -> None:
    """`--threads N` of an experiment. Unset: `$PML_THREADS`, else `default` (None: the thread
    policy's choice). 0: the thread policy's choice (`prompt_cache.threads`: the free cores by the
    load average, as `pml run` uses; a server's own, as `pml serve` makes it, where `chooser` says
    so), never torch's one thread per core, which stalls whenever another process holds a core."""
    policy = f"as `{chooser}` chooses"
    said = (f"default and 0: {policy}, $PML_THREADS or the free cores by the load average" if default is None
            else f"default: $PML_THREADS, else {default}; 0: {policy}")
    p.add_argument("--threads", type=count, default=None, metavar="N", help=f"{engines} threads ({said})")
    p.set_defaults(threads_default=default)


def bench_threads(args: argparse.Namespace) -> int:
    """The thread count `add_threads_argument` asked for, resolved except for 0 (the policy's
    choice, which a server decides for itself)."""
    from prompt_cache.threads import ENV, env_threads

    if args.threads is not None:
        return args.threads
    try:
        chosen = env_threads()
    except ValueError as e:
        raise SystemExit(f"error: ${ENV}: {e}") from None
    if chosen is not None:
        return chosen
    return 0 if args.threads_default is None else args.threads_default


def apply_threads(args: argparse.Namespace) -> int:
    """Set torch's threads as `--threads` asks (see `add_threads_argument`); `args.threads` becomes
    the count used, so reports and rerun commands state it. Returns it."""
    from prompt_cache import threads

    args.threads = threads.apply_threads(bench_threads(args) or None)
    return args.threads


def add_run_arguments(p: argparse.ArgumentParser, out: str) -> None:
    """`--data` (the evaluation data folder, `experiments.data.data_dir`) and `--out` (the run
    folder, `out` under runs/ by default, e.g. "batch/<model>") of an experiment."""
    from experiments.data import ENV_VAR

    p.add_argument("--data", default=None, help=f"shared data folder (default: ${ENV_VAR} or ../shared/data)")
    p.add_argument("--out", default=None, help=f"run folder (default: runs/{out})")


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
        from prompt_cache.models import UnknownModel

        logging.basicConfig(level=logging.WARNING, format="pml: %(message)s", stream=sys.stderr)
        try:
            return _module(name).run(args)
        except (FileNotFoundError, ValueError, UnknownModel) as e:
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
