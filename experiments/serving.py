"""`pml bench serving`: TTFT of a repeated long prompt over the API, and throughput of concurrent clients.

Two `pml serve` processes run on free 127.0.0.1 ports (one caching, one `--no-cache`), with the
providers' default caching rules (minimum prefix 1,024 tokens, 16-token blocks).

- `repeat`: a system prompt of `--system-tokens` tokens of real text (a different text per repeat,
  so the first send is cold) and a short question, sent twice through the `openai` client with
  streaming; TTFT is client-side, to the first text piece. Target: the second send reports
  `cached_tokens >= 1,024` and its TTFT is >= 15x lower.
- `concurrent`: `--clients` threads, each sending `--requests` PML prompts over one shared schema
  (each prompt picks 3 of `--modules` passages and asks its own question), against the caching
  server, the same server with `--max-batch 1` (no packing of waiting requests) and the no-cache
  one: requests/s, completion tokens/s, p50/p95 TTFT, and `batching_speedup` (requests/s packed
  over one by one, measured side by side).
"""

from __future__ import annotations

import argparse
import contextlib
import concurrent.futures
import json
import statistics
import threading
import time
from types import SimpleNamespace

from experiments import outputs, speed_extras
from experiments import cli
from experiments.data import data_dir
from experiments.common import document_pool, exact_text, reset_store_dir
from prompt_cache import DEFAULT_MODEL

QUESTION = "In one sentence: what is the main event described above?"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="registry name, model dir or tiny:<arch> (default: %(default)s)")
    parser.add_argument("--system-tokens", type=cli.positive, default=1500, help="(default: %(default)s)")
    parser.add_argument("--repeats", type=cli.positive, default=3, help="cold/warm pairs, each with another text (default: %(default)s)")
    parser.add_argument("--clients", type=cli.positive, default=8, help="concurrent clients (default: %(default)s)")
    parser.add_argument("--requests", type=cli.positive, default=3, help="requests per client (default: %(default)s)")
    parser.add_argument("--modules", type=cli.positive, default=10, help="passages in the shared schema (default: %(default)s)")
    parser.add_argument("--max-tokens", type=cli.positive, default=4, help="tokens generated per request (default: %(default)s)")
    parser.add_argument("--min-prefix", type=cli.count, default=1024, help="(default: %(default)s)")
    parser.add_argument("--block-size", type=cli.positive, default=16, help="prefix cache block (default: %(default)s)")
    cli.add_threads_argument(parser, engines="each server's model", chooser="pml serve")
    parser.add_argument("--contention", type=cli.count, default=0, metavar="N",
                        help="run N competing PyTorch processes (as `pml bench speed --contention`) while the "
                             "servers answer (default: %(default)s)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: repeat, concurrent")
    cli.add_run_arguments(parser, "serving/<model>")


def run(args: argparse.Namespace) -> int:
    import openai

    from experiments.cost import _tokenizer, musique_passages
    from experiments.live import live_server
    from prompt_cache.models import load_tokenizer

    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    out = outputs.run_dir(f"serving/{args.model.replace(':', '-').replace('/', '_')}", args.out)
    data = data_dir(args.data)
    tokenizer = _tokenizer(args.model, load_tokenizer)
    flags = ["--min-prefix", str(args.min_prefix), "--block-size", str(args.block_size)]
    args.threads = cli.bench_threads(args)  # 0: each server chooses (leaving a core to its front end)
    flags += ["--threads", str(args.threads)] if args.threads else []
    result: dict = {"model": args.model}
    with contextlib.ExitStack() as servers:
        def start(name: str, *more: str) -> str:
            return servers.enter_context(live_server(args.model, *more, "--store",
                                                     str(reset_store_dir(out / f"store-{name}")), *flags,
                                                     log=out / f"server-{name}.log"))

        on, off = SimpleNamespace(url=start("cache")), SimpleNamespace(url=start("nocache", "--no-cache"))
        # The same caching server answering one request at a time: what packing concurrent PML requests buys.
        alone = start("cache-one-by-one", "--max-batch", "1") if "concurrent" not in skip else None
        client = {u: openai.OpenAI(base_url=u + "/v1", api_key="none", max_retries=0, timeout=900)
                  for u in (on.url, off.url, alone) if u}
        servers.enter_context(speed_extras.Contention(args.contention))  # started once the servers are up
        result["contention"] = args.contention

        def send(url: str, **kw) -> tuple[float, dict]:
            t0 = time.perf_counter()
            stream = client[url].chat.completions.create(model=args.model, max_tokens=args.max_tokens, temperature=0,
                                                         stream=True, stream_options={"include_usage": True}, **kw)
            first, usage = None, None
            for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter()
                if chunk.usage is not None:
                    usage = chunk.usage.model_dump()
            return ((first or time.perf_counter()) - t0) * 1e3, usage

        if "repeat" not in skip:
            pool = document_pool(data, tokenizer, args.system_tokens * args.repeats + 64)
            pairs = []
            for r in range(args.repeats):
                text, _ = exact_text(tokenizer, pool[r * args.system_tokens:], args.system_tokens)
                msgs = [{"role": "system", "content": text}, {"role": "user", "content": QUESTION}]
                cold, u1 = send(on.url, messages=msgs)
                warm, u2 = send(on.url, messages=msgs)
                pairs.append({"repeat": r, "prompt_tokens": u2["prompt_tokens"],
                              "cached_tokens_first": u1["prompt_tokens_details"]["cached_tokens"],
                              "cached_tokens_second": u2["prompt_tokens_details"]["cached_tokens"],
                              "ttft_ms_first": round(cold, 1), "ttft_ms_second": round(warm, 1),
                              "ratio": round(cold / warm, 2)})
            result["repeat"] = {"pairs": pairs, "median_ratio": statistics.median(p["ratio"] for p in pairs)}

        if "concurrent" not in skip:
            from pml.builder import PromptBuilder, SchemaBuilder

            passages = musique_passages(data, args.modules)
            b = SchemaBuilder("shared")
            b.system("Answer the question from the passages you are given.")
            for i, text in enumerate(passages):
                b.module(f"p{i}", text=text)
            schema = b.to_xml()
            prompts = []
            for c in range(args.clients):
                for k in range(args.requests):
                    n = len(passages)
                    pick = sorted({(c + k) % n, (c + 2 * k + 3) % n, (3 * c + k + 5) % n})
                    p = PromptBuilder("shared")
                    for i in pick:
                        p.use(f"p{i}")
                    prompts.append((c, p.user(f"Question {c}.{k}: which places are named, and when?").to_xml()))
            result["concurrent"] = {}
            for name, url in (("cache", on.url), ("cache-one-by-one", alone), ("no-cache", off.url)):
                client[url]._client.post(url + "/v1/schemas", json={"pml": schema, "pin": True}).raise_for_status()
                ttfts, tokens, lock = [], [0], threading.Lock()

                def session(c: int) -> None:
                    for cc, xml in prompts:
                        if cc == c:
                            t, usage = send(url, messages=[], extra_body={"pml": xml})
                            with lock:
                                ttfts.append(t)
                                tokens[0] += usage["completion_tokens"]

                t0 = time.perf_counter()
                with concurrent.futures.ThreadPoolExecutor(args.clients) as ex:
                    list(ex.map(session, range(args.clients)))
                wall = time.perf_counter() - t0
                q = statistics.quantiles(ttfts, n=20)
                result["concurrent"][name] = {"requests": len(ttfts), "wall_s": round(wall, 2),
                                              "requests_per_s": round(len(ttfts) / wall, 3),
                                              "ttft_ms_p50": round(statistics.median(ttfts), 1),
                                              "ttft_ms_p95": round(q[18], 1),
                                              "completion_tokens_per_s": round(tokens[0] / wall, 2),
                                              "batched_requests": client[url]._client.get(url + "/v1/usage")
                                              .json()["batched_requests"]}
            c = result["concurrent"]
            c["batching_speedup"] = round(c["cache"]["requests_per_s"] / c["cache-one-by-one"]["requests_per_s"], 2)
    (out / "summary.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    import sys

    from experiments.cli import main

    raise SystemExit(main(["serving", *sys.argv[1:]]))
