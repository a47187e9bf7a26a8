"""`pml bench cost`: replay three API workloads against live servers, with and without caching, and price them.

Two `pml serve` processes run on free 127.0.0.1 ports: one caching (prefix blocks and PML modules,
in a scratch store) and one `--no-cache`. Every request goes to the caching
server and then, the same request, to the no-cache one (side by side, so machine noise hits both),
through the providers' own Python clients with streaming; TTFT is measured at the client, to the
first text piece. Token counts come from the servers' usage (the model's tokenizer), never from
characters. Scenarios:

- `agent`: a multi-turn agent chat (OpenAI chat API): a fixed system prompt (instructions, a JSON
  tool list, a real policy text) of `--system-tokens` tokens; each turn appends the model's answer
  and a new user message. Automatic prefix caching reuses the whole conversation so far.
- `document`: many questions over one L-Eval document of `--doc-tokens` tokens (Anthropic Messages
  API, the document in a system block with `cache_control`).
- `pml`: a PML schema of `--modules` pieces of real meeting transcripts (LongBench qmsum) of
  `--module-tokens` tokens each, one module each; every prompt picks another subset of 3
  (OpenAI chat API with the `pml` extension field). Also sent as plain chat with the same passages,
  where prefix caching misses whenever the first passage differs: that row shows the difference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from experiments import cli, outputs
from experiments.data import data_dir
from experiments.common import document_pool, exact_text, reset_store_dir, split_exact
from prompt_cache import DEFAULT_MODEL

# USD per million tokens. Sources (read 2025; prices change, override with --prices FILE):
# OpenAI https://openai.com/api/pricing: gpt-4o-mini input 0.15, cached input 0.075 (50%), output 0.60.
# Anthropic https://www.anthropic.com/pricing and the prompt-caching docs
# (docs.anthropic.com/en/docs/build-with-claude/prompt-caching): Claude 3.5 Haiku input 0.80,
# cache writes 1.25x input for the 5-minute TTL (1.00) and 2x for 1 hour (1.60), reads 0.1x (0.08),
# output 4.00.
PRICES = {
    "openai": {"model": "gpt-4o-mini", "input": 0.15, "cached_input": 0.075, "output": 0.60},
    "anthropic": {"model": "claude-3-5-haiku", "input": 0.80, "cache_write_5m": 1.00, "cache_write_1h": 1.60,
                  "cache_read": 0.08, "output": 4.00},
}
SCENARIOS = ("agent", "document", "pml")
AGENT_TURNS = [
    "Find the three most recent invoices for customer 4411 and tell me their totals.",
    "Open the second one and check whether the tax rate matches the customer's region.",
    "Draft a short email to the customer explaining the correction you would make.",
    "Schedule a follow-up reminder for next Tuesday at 10:00.",
    "Summarize everything you did in this session in two sentences.",
    "Which tool calls would you repeat if the customer replies?",
]
TOOLS = ["search_invoices", "open_invoice", "get_customer", "tax_rate_for_region", "send_email", "draft_email",
         "schedule_reminder", "list_reminders", "cancel_reminder", "refund_payment", "escalate_ticket", "log_note"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="registry name, model dir or tiny:<arch> (default: %(default)s)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset of %(default)s")
    parser.add_argument("--system-tokens", type=cli.positive, default=1500, help="agent system prompt tokens (default: %(default)s)")
    parser.add_argument("--tools", type=cli.count, default=len(TOOLS), help="tools in the agent's tool list (default: %(default)s)")
    parser.add_argument("--turns", type=cli.positive, default=5, help="agent turns (default: %(default)s)")
    parser.add_argument("--doc-tokens", type=cli.positive, default=2000, help="document tokens (default: %(default)s)")
    parser.add_argument("--questions", type=cli.positive, default=5, help="questions over the document (default: %(default)s)")
    parser.add_argument("--modules", type=cli.positive, default=8, help="PML modules (default: %(default)s)")
    parser.add_argument("--module-tokens", type=cli.positive, default=400,
                        help="tokens per PML module: 3 per prompt, so prompts pass the 1,024-token minimum "
                             "prefix (default: %(default)s)")
    parser.add_argument("--prompts", type=cli.positive, default=6, help="PML prompts, 3 modules each (default: %(default)s)")
    parser.add_argument("--max-tokens", type=cli.positive, default=8, help="tokens generated per request (default: %(default)s)")
    parser.add_argument("--min-prefix", type=cli.count, default=1024, help="the caching server's minimum prefix (default: %(default)s)")
    cli.add_threads_argument(parser, engines="each server's model", chooser="pml serve")
    parser.add_argument("--prices", help="JSON file overriding PRICES (same shape: provider -> field -> USD per Mtok)")
    cli.add_run_arguments(parser, "cost/<model>")


def run(args: argparse.Namespace) -> int:
    from experiments.live import live_server
    from prompt_cache.models import load_tokenizer

    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        raise ValueError(f"unknown scenarios {sorted(unknown)}: choose from {', '.join(SCENARIOS)}")
    prices = load_prices(args.prices)
    out = outputs.run_dir(f"cost/{args.model.replace(':', '-').replace('/', '_')}", args.out)
    data = data_dir(args.data)
    tokenizer = _tokenizer(args.model, load_tokenizer)
    args.threads = cli.bench_threads(args)  # 0: each server chooses (leaving a core to its front end)
    flags = ["--min-prefix", str(args.min_prefix)] + (["--threads", str(args.threads)] if args.threads else [])
    rows = []
    with live_server(args.model, "--store", str(reset_store_dir(out / "store-scratch")), *flags,
                     log=out / "server-cache.log") as on, \
            live_server(args.model, "--no-cache", "--store", str(reset_store_dir(out / "store-nocache")), *flags,
                        log=out / "server-nocache.log") as off:
        bench = Bench(on, off, args.model, args.max_tokens)
        for name in scenarios:
            if name == "agent":
                rows.append(bench.agent(system_prompt(tokenizer, data, args.system_tokens, args.tools), args.turns,
                                        prices))
            elif name == "document":
                doc, questions = document(tokenizer, data, args.doc_tokens, args.questions)
                rows.append(bench.document(doc, questions, prices))
            else:
                pool = document_pool(data, tokenizer, args.modules * args.module_tokens + 64,
                                     source="longbench/qmsum.jsonl")
                rows += bench.pml(split_exact(tokenizer, pool, [args.module_tokens] * args.modules), args.prompts,
                                  prices)
        health = bench.http.get(on + "/health").json()
    (out / "summary.json").write_text(json.dumps({"rows": rows, "prices": prices}, indent=1))
    outputs.write_csv(out / "summary.csv", rows)
    columns = ["scenario", "api", "requests", "prompt_tokens", "computed", "cached", "written", "hit_rate",
               "ttft_ms_cache", "ttft_ms_nocache", "ttft_ratio", "cost_usd_cache", "cost_usd_nocache", "saving"]
    table = outputs.markdown_table(rows, columns)
    outputs.write_report(out / "report.md", "Cost benchmark", model=f"{args.model} ({health['model']})",
                         dtype=health["dtype"],
                         sections=[("Scenarios", table), ("Prices (USD per million tokens)",
                                                          "```json\n" + json.dumps(prices, indent=1) + "\n```\n")])
    print(table, end="")
    print(f"report: {out / 'report.md'}")
    return 0


def _tokenizer(model: str, load_tokenizer):
    """The served model's tokenizer, for building prompts of exact token lengths (no weights loaded)."""
    if model.startswith("tiny:"):
        from prompt_cache.tiny import ByteTokenizer

        return ByteTokenizer()
    return load_tokenizer(model)


def load_prices(path: str | None) -> dict:
    prices = json.loads(json.dumps(PRICES))
    if path:
        for provider, fields in json.loads(Path(path).read_text()).items():
            if provider not in prices:
                raise ValueError(f"--prices: unknown provider {provider!r} (known: {', '.join(prices)})")
            prices[provider].update(fields)
    return prices


# -- workloads from the shared data ----------------------------------------------------------------
def system_prompt(tokenizer, data: Path, n_tokens: int, n_tools: int = len(TOOLS)) -> str:
    """Instructions, a JSON tool list and a real text (multi_news) as policy, `n_tokens` tokens in all."""
    tools = [{"type": "function", "function": {"name": t, "description": f"{t.replace('_', ' ')} for the back office",
                                                "parameters": {"type": "object", "properties": {"id": {"type": "string"}}}}}
             for t in TOOLS[:n_tools]]
    head = ("You are a back-office agent for an invoicing company. Use the tools below; answer briefly.\n"
            f"Tools: {json.dumps(tools)}\nCompany policy:\n")
    rest = n_tokens - len(tokenizer.encode(head))
    if rest < 16:
        raise ValueError(f"--system-tokens {n_tokens} is too small for the instructions and tool list")
    text, _ = exact_text(tokenizer, document_pool(data, tokenizer, rest), rest)
    return head + text


def document(tokenizer, data: Path, n_tokens: int, questions: int) -> tuple[str, list[str]]:
    """The first L-Eval financial_qa document cut to `n_tokens` tokens, and its own questions."""
    path = data / "leval" / "financial_qa.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass --data DIR")
    record = json.loads(path.read_text().splitlines()[0])
    ids = tokenizer.encode(record["input"])
    text, _ = exact_text(tokenizer, ids, n_tokens)
    return text, record["instructions"][:questions]


def musique_passages(data: Path, n: int) -> list[str]:
    path = data / "multidoc" / "musique_train100_longbench_style.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass --data DIR")
    record = json.loads(path.read_text().splitlines()[0])
    return [f"{p['title']}\n{p['text']}" for p in record["passages"][:n]]


# -- the client side ---------------------------------------------------------------------------------
class Bench:
    def __init__(self, url_cache: str, url_nocache: str, model: str, max_tokens: int):
        import anthropic
        import httpx
        import openai

        self.urls = (url_cache, url_nocache)
        self.model, self.max_tokens = model, max_tokens
        self.oai = [openai.OpenAI(base_url=u + "/v1", api_key="none", max_retries=0, timeout=600) for u in self.urls]
        self.ant = [anthropic.Anthropic(base_url=u, api_key="none", max_retries=0, timeout=600) for u in self.urls]
        self.http = httpx.Client(timeout=600)

    def totals(self) -> dict:
        return self.http.get(self.urls[0] + "/v1/usage").json()

    def chat(self, i: int, messages: list[dict], **extra) -> tuple[str, dict, float]:
        """Stream one chat request to server i: (text, usage, ttft_ms)."""
        t0 = time.perf_counter()
        stream = self.oai[i].chat.completions.create(model=self.model, messages=messages, max_tokens=self.max_tokens,
                                                     temperature=0, stream=True,
                                                     stream_options={"include_usage": True}, extra_body=extra or None)
        text, usage, first = "", None, None
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                text += chunk.choices[0].delta.content
            if chunk.usage is not None:
                usage = chunk.usage.model_dump()
        return text, usage, ((first or time.perf_counter()) - t0) * 1e3

    def message(self, i: int, system: list[dict], question: str) -> tuple[str, dict, float]:
        t0 = time.perf_counter()
        first = None
        with self.ant[i].messages.stream(model=self.model, max_tokens=self.max_tokens, system=system,
                                         messages=[{"role": "user", "content": question}],
                                         extra_body={"temperature": 0}) as stream:
            for piece in stream.text_stream:
                if piece:
                    first = first or time.perf_counter()
            final = stream.get_final_message()
        return final.content[0].text if final.content else "", final.usage.model_dump(), \
            ((first or time.perf_counter()) - t0) * 1e3

    # -- scenarios -------------------------------------------------------------------------------
    def agent(self, system: str, turns: int, prices: dict) -> dict:
        before = self.totals()
        messages = [{"role": "system", "content": system}]
        usages, ttft = [], ([], [])
        for turn in AGENT_TURNS[:turns]:
            messages.append({"role": "user", "content": turn})
            text, usage, t = self.chat(0, messages)
            ttft[0].append(t)
            ttft[1].append(self.chat(1, messages)[2])
            usages.append(usage)
            messages.append({"role": "assistant", "content": text})
        return self._row("agent", "openai chat", usages, ttft, before, prices)

    def document(self, doc: str, questions: list[str], prices: dict) -> dict:
        before = self.totals()
        system = [{"type": "text", "text": "Answer questions about this document.\n" + doc,
                   "cache_control": {"type": "ephemeral"}}]
        usages, ttft = [], ([], [])
        for q in questions:
            _, usage, t = self.message(0, system, q)
            ttft[0].append(t)
            ttft[1].append(self.message(1, system, q)[2])
            usages.append(usage)
        return self._row("document", "anthropic messages", usages, ttft, before, prices)

    def pml(self, passages: list[str], prompts: int, prices: dict) -> list[dict]:
        from pml.builder import PromptBuilder, SchemaBuilder

        b = SchemaBuilder("passages")
        b.system("Answer the question from the passages you are given.")  # root text: the attention sink
        for i, text in enumerate(passages):
            b.module(f"p{i}", text=text)
        schema = b.to_xml()
        for url in self.urls:
            r = self.http.post(url + "/v1/schemas", json={"pml": schema, "pin": True})
            r.raise_for_status()
        n = len(passages)
        picks = [sorted({(3 * k) % n, (3 * k + 1) % n, (5 * k + 2) % n}) for k in range(prompts)]
        question = "Which passages mention a date, and what happened then?"
        rows = []
        for api in ("pml", "chat"):
            before = self.totals()
            usages, ttft = [], ([], [])
            for pick in picks:
                if api == "pml":
                    p = PromptBuilder("passages")
                    for i in pick:
                        p.use(f"p{i}")
                    kw = {"messages": [], "pml": p.user(question).to_xml()}
                else:
                    ctx = "Answer the question from the passages you are given.\n" + "\n".join(passages[i] for i in pick)
                    kw = {"messages": [{"role": "system", "content": ctx}, {"role": "user", "content": question}]}
                msgs = kw.pop("messages")
                _, usage, t = self.chat(0, msgs, **kw)
                ttft[0].append(t)
                ttft[1].append(self.chat(1, msgs, **kw)[2])
                usages.append(usage)
            rows.append(self._row("pml-schema", "openai chat + pml" if api == "pml" else "openai chat (same text)",
                                  usages, ttft, before, prices))
        return rows

    def _row(self, name: str, api: str, usages: list[dict], ttft, before: dict, prices: dict) -> dict:
        after = self.totals()
        d = {k: after[k] - before[k] for k in ("prompt_tokens", "cached_tokens", "cache_written_tokens",
                                               "completion_tokens")}
        cost_on, cost_off = price(api, usages, prices)
        on, off = statistics.median(ttft[0]), statistics.median(ttft[1])
        return {"scenario": name, "api": api, "requests": len(usages), "prompt_tokens": d["prompt_tokens"],
                "computed": d["prompt_tokens"] - d["cached_tokens"], "cached": d["cached_tokens"],
                "written": d["cache_written_tokens"],
                "hit_rate": round(d["cached_tokens"] / d["prompt_tokens"], 3) if d["prompt_tokens"] else 0.0,
                "ttft_ms_cache": int(on), "ttft_ms_nocache": int(off), "ttft_ratio": round(off / on, 2),
                "cost_usd_cache": round(cost_on, 6), "cost_usd_nocache": round(cost_off, 6),
                "saving": round(1 - cost_on / cost_off, 3) if cost_off else 0.0}


def price(api: str, usages: list[dict], prices: dict) -> tuple[float, float]:
    """(cost with the cache, cost if nothing were cached) in USD, from the usage each response reported."""
    on = off = 0.0
    if api.startswith("anthropic"):
        p = prices["anthropic"]
        for u in usages:
            total_in = u["input_tokens"] + u["cache_creation_input_tokens"] + u["cache_read_input_tokens"]
            on += (u["input_tokens"] * p["input"] + u["cache_creation_input_tokens"] * p["cache_write_5m"]
                   + u["cache_read_input_tokens"] * p["cache_read"] + u["output_tokens"] * p["output"])
            off += total_in * p["input"] + u["output_tokens"] * p["output"]
    else:
        p = prices["openai"]
        for u in usages:
            hit = (u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
            on += ((u["prompt_tokens"] - hit) * p["input"] + hit * p["cached_input"]
                   + u["completion_tokens"] * p["output"])
            off += u["prompt_tokens"] * p["input"] + u["completion_tokens"] * p["output"]
    return on / 1e6, off / 1e6


if __name__ == "__main__":
    import sys

    from experiments.cli import main

    raise SystemExit(main(["cost", *sys.argv[1:]]))
