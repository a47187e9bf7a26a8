"""`pml serve`: the OpenAI- and Anthropic-compatible server (serving/), registered by `pml_cli.main`."""

from __future__ import annotations

import logging
import socket
import sys
from pathlib import Path

from experiments.cli import count, port, positive, similarity, thread_count
from prompt_cache import DEFAULT_MODEL
from serving import DEFAULT_MAX_BATCH


def add_commands(sub) -> None:
    p = sub.add_parser("serve", help="serve the model over OpenAI- and Anthropic-compatible HTTP APIs",
                       description="One warm model behind /v1/chat/completions, /v1/completions, /v1/messages "
                                   "and /v1/schemas, with automatic prefix caching (see docs/SERVING.md).")
    p.add_argument("--model", default=DEFAULT_MODEL, help="registry name, model folder or tiny:<arch> (default: %(default)s)")
    p.add_argument("--store", help="store folder (default: a user cache folder, one per model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=port, default=8000, help="(default: %(default)s)")
    p.add_argument("--schema", action="append", default=[], metavar="FILE",
                   help="PML schema file to register and pin at start (repeatable)")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="accepted API key (repeatable); without one, no authentication")
    p.add_argument("--salt-per-key", action="store_true", help="isolate each API key's cache from the others'")
    p.add_argument("--threads", type=thread_count, metavar="N",
                   help="torch threads of the model worker (default: $PML_THREADS, else free cores by the load average "
                        "less one left to the HTTP front end, at least 1)")
    p.add_argument("--semantic-cache", type=similarity, metavar="THRESHOLD",
                   help="answer a question whose embedding is at least THRESHOLD cosine-similar to an earlier one "
                        "in the same context and tenant from that earlier answer, without the model (off by default; "
                        "0.95 is the measured default, see docs/RESULTS.md); responses carry x-semantic-cache")
    p.add_argument("--max-batch", type=positive, default=DEFAULT_MAX_BATCH, metavar="N",
                   help="PML requests waiting at the same time (same tenant and settings) are answered together, "
                        "N at most, one forward per step for all (default: %(default)s; 1: one by one)")
    p.add_argument("--no-cache", action="store_true", help="compute every prompt in full; store nothing (baseline)")
    p.add_argument("--min-prefix", type=count, default=1024,
                   help="shortest prefix served from the cache (default: %(default)s, as OpenAI and Anthropic)")
    p.add_argument("--block-size", type=positive, default=16, help="tokens per cached block (default: %(default)s)")
    p.add_argument("--granularity", type=positive, default=128,
                   help="OpenAI usage reports cached tokens in multiples of this (default: %(default)s, as OpenAI)")
    p.add_argument("--max-body-bytes", type=positive, default=4 << 20)
    p.add_argument("--max-prompt-tokens", type=positive, default=32768)
    p.add_argument("--max-completion-tokens", type=positive, default=4096)
    p.set_defaults(func=cmd_serve)


def _fail(message: str) -> int:
    print(f"pml: error: {message}", file=sys.stderr)
    return 2


def cmd_serve(args) -> int:
    from attention_store.kernels import KernelError
    from attention_store.store import StoreMismatch
    from pml.errors import PMLError
    from prompt_cache.models import UnknownModel
    from prompt_cache.prefix import PrefixConfig
    from serving.app import Limits
    from serving.server import ServeConfig, build_worker, serve

    logging.basicConfig(level=logging.INFO, format="pml serve: %(message)s", stream=sys.stderr)
    for path in args.schema:
        if not Path(path).is_file():
            return _fail(f"no such schema file: {path}")
    try:  # before loading the model: a busy port should fail in a second, not after the load
        with socket.create_server((args.host, args.port)):
            pass
    except OSError as e:
        return _fail(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}")
    try:
        config = ServeConfig(
            model=args.model, store=args.store, host=args.host, port=args.port, schemas=tuple(args.schema),
            api_keys=tuple(args.api_key), salt_per_key=args.salt_per_key, threads=args.threads,
            use_cache=not args.no_cache, semantic_threshold=args.semantic_cache,
            max_batch=args.max_batch,
            prefix=PrefixConfig(block_size=args.block_size, min_prefix=args.min_prefix, granularity=args.granularity),
            limits=Limits(args.max_body_bytes, args.max_prompt_tokens, args.max_completion_tokens))
        worker = build_worker(config)
    except (ValueError, UnknownModel, OSError, StoreMismatch, KernelError) as e:
        return _fail(str(e))
    except PMLError as e:
        return _fail(str(e))
    serve(config, worker)
    return 0
