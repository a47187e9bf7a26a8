"""`pml encode`, `pml store`, `pml run`, `pml bench` and `pml demo`: the model-side commands of `pml`.

Registered by `pml_cli.main` through `add_commands`; this module imports torch only inside handlers
so that `pml validate` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

from attention_store.dtypes import DEFAULT_STORAGE_DTYPE, STORAGE_DTYPES
from attention_store.policies import BUILTIN_SPECS, DEFAULT_POLICY, get_policy
from experiments.cli import add_device_arguments, count, thread_count
from pml.model import Prompt, Schema
from prompt_cache import DEFAULT_MODEL

log = logging.getLogger(__name__)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def add_commands(sub) -> None:
    p = sub.add_parser("encode", help="precompute a schema's module states into the store")
    p.add_argument("schema", help="PML schema file")
    _model_args(p, writable_store=True)
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")
    p.set_defaults(func=_user_errors(cmd_encode))

    p = sub.add_parser("store", help="list, remove or verify stored module states")
    p.add_argument("action", choices=["ls", "rm", "verify"])
    p.add_argument("keys", nargs="*", help="entry keys (or unique prefixes) for rm")
    p.add_argument("--store", help="store folder (default: every per-model store in a user cache folder)")
    p.add_argument("--schema", help="rm: every entry of this schema")
    p.add_argument("--all", action="store_true", help="rm: every entry")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_user_errors(cmd_store))

    p = sub.add_parser("run", help="answer a PML prompt, from the cache or by full prefill")
    p.add_argument("prompt", help="PML prompt file")
    p.add_argument("--schema", required=True, help="the prompt's PML schema file")
    _model_args(p)
    _generation_args(p)
    p.add_argument("--no-cache", action="store_true", help="full prefill baseline (no stored states)")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--json", action="store_true", help="one JSON object: text, usage, timing")
    _speculative_args(p)
    p.set_defaults(func=_user_errors(cmd_run))

    p = sub.add_parser("compare", help="one prompt under several policies against the full prefill")
    p.add_argument("prompt", help="PML prompt file")
    p.add_argument("--schema", required=True, help="the prompt's PML schema file")
    p.add_argument("--policies", default="independent,schema,blend:0.15,link:16", type=_policy_list,
                   help="comma-separated policy specs (default: %(default)s)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="registry name (smollm2-135m, gemma3-270m) or model folder")
    p.add_argument("--store", type=_store_folder, help="store folder (default: a user cache folder, one per model)")
    p.add_argument("--max-new-tokens", type=count, default=64)
    p.add_argument("--kl-tokens", type=count, default=32, help="KL along at most this many baseline answer tokens")
    _threads_arg(p)
    add_device_arguments(p)
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(func=_user_errors(cmd_compare))

    # `bench` hands its arguments to experiments.cli, whose parsers import the experiment modules
    # (and torch): building them here would slow down every other `pml` command.
    p = sub.add_parser("bench", help="run an experiment: latency, memory, quality, sink (see docs/EXPERIMENTS.md)",
                       add_help=False, prefix_chars="\0")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="the example schema answered with and without the cache")
    p.add_argument("--model", default=DEFAULT_MODEL, help="registry name or model folder")
    p.add_argument("--store", type=_store_folder, help="store folder (default: a user cache folder)")
    p.add_argument("--max-new-tokens", type=count, default=48)
    _threads_arg(p)
    add_device_arguments(p)
    p.set_defaults(func=_user_errors(cmd_demo))



def one_line_errors(parser: argparse.ArgumentParser) -> None:
    """Make `parser` report bad arguments as one line, `pml: error: MESSAGE`, and exit 2 (no usage dump)."""

    def error(message: str):
        parser.exit(2, f"pml: error: {message}\n")

    parser.error = error  # type: ignore[method-assign]


# -- argument types: checked while parsing, before any model loads or anything is written ---------
# (the numeric ones every command shares are in experiments.cli)


def _finite(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return x


def _temperature(text: str) -> float:
    x = _finite(text)
    if x < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 = greedy), got {text!r}")
    return x


def _top_p(text: str) -> float:
    x = _finite(text)
    if not 0 < x <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text!r}")
    return x


def _seed(text: str) -> int:
    from prompt_cache.generation import MAX_SEED

    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= n <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**64 - 1], got {text!r}")
    return n


def _store_folder(text: str) -> Path:
    from attention_store.store import StoreError, check_store_dir

    try:
        return check_store_dir(text, writable=False)
    except StoreError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _writable_store_folder(text: str) -> Path:
    from attention_store.store import StoreError, check_store_dir

    try:
        return check_store_dir(text, writable=True)
    except StoreError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _model_args(p, writable_store: bool = False) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="registry name (smollm2-135m, gemma3-270m) or model folder")
    p.add_argument("--store", type=_writable_store_folder if writable_store else _store_folder,
                   help="store folder (default: a user cache folder, one per model)")
    p.add_argument("--policy", default=DEFAULT_POLICY, type=_policy_spec, metavar="POLICY",
                   help=f"encoding policy: {', '.join(BUILTIN_SPECS)} (default: %(default)s, the paper's)")
    p.add_argument("--dtype", default=DEFAULT_STORAGE_DTYPE, choices=list(STORAGE_DTYPES),
                   help="storage dtype of states (default: %(default)s)")
    _threads_arg(p)
    add_device_arguments(p)


def _threads_arg(p) -> None:
    p.add_argument("--threads", type=thread_count, metavar="N",
                   help="torch CPU threads (default: $PML_THREADS, else free cores by the load average)")


def _policy_spec(spec: str) -> str:
    """argparse type: a registered policy spec, checked when the arguments are parsed."""
    try:
        return get_policy(spec).spec
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _policy_list(text: str) -> list[str]:
    """argparse type: comma-separated policy specs, each checked."""
    specs = [_policy_spec(t.strip()) for t in text.split(",") if t.strip()]
    if not specs:
        raise argparse.ArgumentTypeError("name at least one policy")
    return list(dict.fromkeys(specs))


def _generation_args(p) -> None:
    p.add_argument("--max-new-tokens", type=count, default=64)
    p.add_argument("--temperature", type=_temperature, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=_top_p, default=1.0, help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--seed", type=_seed, help="sampling seed, in [0, 2**64 - 1]")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def read_pml(path: str | Path, kind: type):
    """Parse a PML file (this layer reads files; the library takes text or parsed objects)."""
    from pml.errors import PMLError
    from pml.parser import parse_file

    if not Path(path).exists():
        raise PMLError("no such file", file=str(path))
    doc = parse_file(path)
    if not isinstance(doc, kind):
        want, got = kind.__name__.lower(), type(doc).__name__.lower()
        raise PMLError(f"expected a <{want}> file, this is a <{got}>", file=str(path))
    return doc


def _speculative_args(p) -> None:
    p.add_argument("--speculative", metavar="DRAFTER[:K]",
                   help="greedy-exact speculative decoding: lookup[:K] (n-gram prompt lookup) or model[:K] "
                        "(with --draft-model); K drafted tokens per verification (default 4)")
    p.add_argument("--draft-model", metavar="M", help="draft model sharing the tokenizer (implies model:4)")
    p.add_argument("--draft-store", type=_store_folder,
                   help="store folder of the draft model (default: its own user cache folder)")


def _speculative_config(args, pc):
    """A SpeculativeConfig from --speculative/--draft-model (None when neither is given)."""
    from prompt_cache.speculative import DRAFTERS, SpeculativeConfig

    spec = args.speculative or ("model" if args.draft_model else None)
    if spec is None:
        return None
    drafter, _, k = spec.partition(":")
    if drafter not in DRAFTERS or (k and not k.isdigit()):
        raise UserError(f"--speculative {spec!r}: expected lookup[:K] or model[:K] with K a whole number")
    k = int(k) if k else 4
    if not 1 <= k <= 64:
        raise UserError(f"--speculative {spec!r}: K must be in 1..64")
    if args.temperature > 0:
        raise UserError("speculative decoding is greedy-exact only: drop --temperature or --speculative")
    if (drafter == "model") != bool(args.draft_model):
        raise UserError("--speculative model needs --draft-model, and --draft-model goes with model[:K] only")
    if drafter == "lookup":
        return SpeculativeConfig(k=k)
    from attention_store.store import open_store
    from prompt_cache.engine import PromptCache

    draft_lm = _load(args.draft_model, device=args.device, device_map=args.device_map, dtype=args.model_dtype)
    if draft_lm.tokenizer.fingerprint != pc.lm.tokenizer.fingerprint:
        raise UserError(f"draft model {args.draft_model!r} does not share the tokenizer of {args.model!r}")
    draft = PromptCache(draft_lm, open_store(args.draft_store, draft_lm), policy=pc.policy,
                        storage_dtype=getattr(args, "dtype", DEFAULT_STORAGE_DTYPE))
    return SpeculativeConfig(k=k, drafter="model", draft=draft)


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="pml: %(message)s", stream=sys.stderr)


def _engine(args, promote_disk_hits: bool = True):
    from attention_store.store import open_store
    from prompt_cache.engine import PromptCache
    from prompt_cache.threads import apply_threads

    from prompt_cache.models import layer_devices

    from prompt_cache.timing import Clock

    args.threads_used = apply_threads(getattr(args, "threads", None))
    clock = Clock()
    t = clock.now()
    lm = _load(args.model, device=args.device, device_map=args.device_map, dtype=args.model_dtype)
    args.load_ms = clock.ms_since(t)  # reported beside TTFT: what a fresh process pays first
    # Under a device map each layer's states stay on that layer's GPU (memory budget per device).
    devices = layer_devices(lm.model) if args.device_map else None
    return PromptCache(lm, open_store(args.store, lm, layer_devices=devices, promote_disk_hits=promote_disk_hits),
                       policy=getattr(args, "policy", DEFAULT_POLICY),
                       storage_dtype=getattr(args, "dtype", DEFAULT_STORAGE_DTYPE))


class UserError(Exception):
    """Bad input to a model-side command: printed as `pml: error: MESSAGE`, exit 2."""


def _load(name: str, device: str | None = None, device_map: str | None = None, dtype: str = "fp32"):
    from attention_store.dtypes import storage_dtype
    from prompt_cache.models import UnknownModel, load_model, resolve_device

    try:
        resolve_device(device, device_map)  # a device this machine lacks fails before any loading
    except ValueError as e:
        raise UserError(str(e)) from None
    try:
        return load_model(name, storage_dtype(dtype), device=device, device_map=device_map)
    except UnknownModel as e:  # the message lists the built-in ones
        raise UserError(str(e)) from None
    except (RuntimeError, FileNotFoundError, OSError) as e:
        raise UserError(f"cannot load model {name!r}: {e}") from None


def _user_errors(handler):
    """Turn known bad-input exceptions into one line on stderr and exit code 2."""
    import functools

    @functools.wraps(handler)
    def run(args) -> int:
        from attention_store.errors import StoreError
        from prompt_cache.limits import LimitError

        try:
            return handler(args)
        except (UserError, StoreError) as e:
            print(f"pml: error: {e}", file=sys.stderr)
        except LimitError as e:
            print(f"pml: error: {e.message}", file=sys.stderr)
        except OSError as e:  # the machine, not the input: unreadable file, full disk, ...
            where = f": {e.filename}" if e.filename else ""
            print(f"pml: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2

    return run


def _progress(desc: str):
    from tqdm import tqdm

    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, unit="tok", file=sys.stderr, leave=False)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update


def cmd_encode(args) -> int:
    _setup_logging()
    from attention_store.adapter import kv_shape

    pc = _engine(args)
    name = pc.add_schema(read_pml(args.schema, Schema)).schema_name
    t = time.perf_counter()
    report = pc.encode(name, progress=_progress(f"encoding {name}"))
    seconds = time.perf_counter() - t
    layers, kv_heads, head_dim = kv_shape(pc.lm.model.config)
    expected = 2 * layers * kv_heads * head_dim * pc.storage_dtype.itemsize
    out = {"schema": name, "modules": report.modules, "tokens": report.tokens, "bytes": report.bytes,
           "bytes_per_token": report.bytes_per_token, "expected_bytes_per_token": expected,
           "encoded": report.encoded, "seconds": round(seconds, 3), "threads": args.threads_used}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"schema {name}: {report.modules} modules ({report.encoded} encoded now, "
              f"{report.modules - report.encoded} already stored), {report.tokens} tokens, "
              f"{report.bytes / 2**20:.2f} MiB in {seconds:.2f} s")
        print(f"bytes per token: {report.bytes_per_token:.0f} (2 x {layers} layers x {kv_heads} kv heads "
              f"x {head_dim} head dim x {pc.storage_dtype.itemsize} bytes = {expected})")
    return 0


def cmd_store(args) -> int:
    _setup_logging()
    import dataclasses

    from attention_store import admin

    roots = admin.find_stores(args.store)
    if args.action == "verify":  # before anything lists entries (listing quarantines damaged files too)
        results = admin.verify(roots)
        bad = [k for k, ok in results.items() if not ok]
        print(f"{len(results)} entries checked, {len(bad)} corrupted"
              + "".join(f"\n  {k} (moved aside; it will be recomputed)" for k in bad))
        return 1 if bad else 0
    if args.action == "rm":
        removed = admin.remove(roots, args.keys, schema=args.schema, everything=args.all)
        print(f"removed {removed} entries")
        return 0
    rows, corrupt = admin.list_entries(roots), admin.list_corrupt(roots)
    if args.json:
        print(json.dumps([{**dataclasses.asdict(row.meta), "tier": ",".join(row.tiers), "store": str(r)}
                          for r, row in rows]
                         + [{"key": c.path.name.split(".")[0], "tier": "corrupt", "path": str(c.path),
                             "nbytes": c.nbytes, "mtime": c.mtime, "store": str(c.store)} for c in corrupt]))
        return 0
    print(f"{'key':12}  {'schema':16} {'module':28} {'model':14} {'policy':11} {'dtype':8} {'tokens':>7} {'bytes':>11}  tier")
    for _, row in rows:
        m = row.meta
        print(f"{m.key[:12]}  {m.schema[:16]:16} {(m.module or '(root text)')[:28]:28} {m.model[:14]:14} "
              f"{m.policy:11} {m.dtype:8} {m.tokens:>7} {m.nbytes:>11}  {','.join(row.tiers)}")
    print(f"{len(rows)} entries, {sum(row.meta.nbytes for _, row in rows) / 2**20:.2f} MiB in "
          f"{', '.join(map(str, roots))}")
    if corrupt:
        print(f"{len(corrupt)} damaged file(s) set aside (newest first; `pml store rm --all` deletes them):")
        for c in corrupt:
            print(f"  {c.path} ({c.nbytes} bytes, {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(c.mtime))})")
    return 0


def _generation_config(args):
    from prompt_cache.generation import GenerationConfig

    try:
        return GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_p=args.top_p, seed=args.seed, stop=tuple(args.stop))
    except ValueError as e:
        raise UserError(str(e)) from None


def _print_piece(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def cmd_run(args) -> int:
    _setup_logging()
    config = _generation_config(args)  # before the model loads: bad values fail first
    # One prompt per process: a disk hit is read straight into the cache, not copied into memory too.
    pc = _engine(args, promote_disk_hits=False)
    pc.speculative = _speculative_config(args, pc)
    schema = read_pml(args.schema, Schema)
    pc.add_schema(schema)
    if pc.speculative is not None and pc.speculative.draft is not None:
        pc.speculative.draft.add_schema(schema)  # the draft caches its own module states
    on_text = _print_piece if args.stream and not args.json else None
    result = pc.answer(read_pml(args.prompt, Prompt), use_cache=not args.no_cache, config=config, on_text=on_text)
    if args.json:
        from attention_store import kernels

        print(json.dumps({**result.to_json(), "threads": args.threads_used, "load_ms": round(args.load_ms, 1),
                          "kernels": kernels.status()}))
        return 0
    print("" if args.stream else result.text)
    u, t = result.usage, result.timing
    print(f"\n[{'full prefill' if args.no_cache else 'cached'}] prompt {u.prompt_tokens} tokens "
          f"({u.cached_tokens} cached), {u.completion_tokens} generated; TTFT {t.ttft_ms:.1f} ms "
          f"(cache {t.cache_ms:.1f} + prefill {t.prefill_ms:.1f}), {t.decode_tokens_per_s:.1f} tok/s; "
          f"model load {args.load_ms:.0f} ms",
          file=sys.stderr)
    if result.speculative is not None:
        sp = result.speculative
        print(f"[speculative {sp['drafter']}:{sp['k']}] {sp['accepted']}/{sp['proposed']} drafts accepted "
              f"({sp['acceptance_rate']:.0%}), {sp['forwards']} verification forwards", file=sys.stderr)
    return 0


def cmd_compare(args) -> int:
    _setup_logging()
    from attention_store.store import open_store
    from experiments.recovery import compare_policies
    from prompt_cache.threads import apply_threads

    schema, prompt = read_pml(args.schema, Schema), read_pml(args.prompt, Prompt)
    threads = apply_threads(args.threads)
    lm = _load(args.model, device=args.device, device_map=args.device_map, dtype=args.model_dtype)
    out = compare_policies(lm, open_store(args.store, lm), schema, prompt, args.policies, args.max_new_tokens,
                           args.kl_tokens)
    if args.json:
        print(json.dumps({**out, "threads": threads}))
        return 0
    b = out["baseline"]
    print(f"full prefill: TTFT {b['ttft_ms']:.1f} ms, {b['prompt_tokens']} prompt tokens: {b['text'].strip()!r}")
    print(f"{'policy':20} {'TTFT ms':>9} {'recomputed':>12} {'first tok':>9} {'mean KL':>9} {'identical':>9}  answer")
    for r in out["policies"]:
        kl = "-" if r["mean_kl"] is None else f"{r['mean_kl']:.4f}"
        print(f"{r['policy']:20} {r['ttft_ms']:9.1f} {r['recomputed_tokens']:6d} ({r['recomputed_%']:4.1f}%) "
              f"{'yes' if r['first_token_same'] else 'no':>9} {kl:>9} {'yes' if r['identical'] else 'no':>9}  "
              f"{r['text'].strip()[:60]!r}")
    return 0


def cmd_bench(args) -> int:
    from experiments.cli import build_parser

    parsed = build_parser(prog="pml bench").parse_args(args.rest)
    return parsed.func(parsed)


def cmd_demo(args) -> int:
    _setup_logging()
    from prompt_cache.generation import GenerationConfig

    schema, prompt = EXAMPLES / "travel.pml", EXAMPLES / "travel_prompt.pml"
    if not schema.is_file():
        print(f"pml demo: example schema not found at {schema} (run from a source checkout)", file=sys.stderr)
        return 2
    pc = _engine(args)
    layout = pc.add_schema(read_pml(schema, Schema))
    prompt_doc = read_pml(prompt, Prompt)
    print(f"schema {layout.schema_name}: {len(layout.modules)} modules over {layout.length} reserved positions")
    report = pc.encode(layout.schema_name, progress=_progress("encoding"))
    print(f"stored {report.modules} entries, {report.tokens} tokens, {report.bytes / 2**20:.2f} MiB "
          f"({report.encoded} encoded now)")
    print(f"prompt ({prompt.name}):\n{prompt.read_text().strip()}\n")
    config = GenerationConfig(max_new_tokens=args.max_new_tokens)
    # The first forward of a process pays one-time kernel setup; keep it out of both timings.
    pc.answer(prompt_doc, use_cache=False, config=GenerationConfig(max_new_tokens=1))
    for use_cache in (False, True):
        r = pc.answer(prompt_doc, use_cache=use_cache, config=config)
        label = "with the cache " if use_cache else "full prefill   "
        print(f"{label}| TTFT {r.timing.ttft_ms:7.1f} ms | prompt {r.usage.prompt_tokens} tokens, "
              f"{r.usage.cached_tokens} cached | {r.text.strip()!r}")
    print("\nNext: pml layout examples/travel.pml; pml run examples/travel_prompt.pml --schema examples/travel.pml")
    return 0
