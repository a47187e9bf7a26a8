"""Speculative decoding benchmark: acceptance rate and decode tokens/s of prompt lookup vs plain greedy.

Per item (LongBench multi_news and qmsum by default): the context, cut to its first
`--context-tokens` tokens at a whitespace boundary, is the one cached module (LongBench's prompt
template around it); the answer is `--max-new-tokens` greedy tokens with the cache. Each mode
(plain, then `lookup:K` for every K in `--k`) answers the same item back to back, in an order
rotated between items, after one untimed warm-up answer; the outputs of every mode are compared
with plain decoding token for token (`same_as_plain`).

Decode tokens/s is `Timing.decode_tokens_per_s` (tokens after the first over the time after the
first token), so prefill is left out of both sides.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from experiments import cli, outputs
from experiments.data import data_dir, load_longbench
from experiments.common import rotated
from experiments.workloads import TEMPLATES, build_prompt, build_schema, schema_name
from prompt_cache import DEFAULT_MODEL

TASKS = ("multi_news", "qmsum")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="registry name, model dir or tiny:<arch> (default: %(default)s)")
    parser.add_argument("--tasks", default=",".join(TASKS), help="LongBench tasks under longbench/ (default: %(default)s)")
    parser.add_argument("--limit", type=cli.positive, default=5, help="items per task (default: %(default)s)")
    parser.add_argument("--context-tokens", type=cli.positive, default=1500, help="context cut to about this many tokens (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=cli.positive, default=64)
    parser.add_argument("--k", type=cli.listed(cli.positive), default="4,8", help="comma-separated draft lengths for lookup:K (default: %(default)s)")
    parser.add_argument("--max-ngram", type=cli.positive, default=3, help="lookup: longest n-gram matched (default: %(default)s)")
    cli.add_threads_argument(parser)
    cli.add_run_arguments(parser, "speculative/<model>")


def cut_at_whitespace(text: str, tokenizer, max_tokens: int) -> tuple[str, int, int]:
    """The longest whitespace-ended prefix of `text` within `max_tokens` tokens; (text, kept, original)."""
    ids = tokenizer.encode(text)
    if len(ids) <= max_tokens:
        return text, len(ids), len(ids)
    head = tokenizer.decode(ids[:max_tokens])
    cut = max(head.rfind(" "), head.rfind("\n"))
    head = head[:cut] if cut > 0 else head
    return head, len(tokenizer.encode(head)), len(ids)


def run(args: argparse.Namespace) -> int:
    from prompt_cache.engine import PromptCache
    from prompt_cache.generation import GenerationConfig
    from prompt_cache.models import load_model
    from prompt_cache.speculative import SpeculativeConfig

    ks = list(args.k)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for t in tasks:
        if t not in TEMPLATES:
            raise ValueError(f"no LongBench template for task {t!r}")
    cli.apply_threads(args)
    model_tag = args.model.replace(":", "-").replace("/", "_")
    out = outputs.run_dir(f"speculative/{model_tag}", args.out)
    (out / "items.jsonl").unlink(missing_ok=True)  # modes are compared within one run only
    log = outputs.ItemLog(out / "items.jsonl")
    lm = load_model(args.model)
    modes: list[tuple[str, SpeculativeConfig | None]] = [("plain", None)]
    modes += [(f"lookup:{k}", SpeculativeConfig(k=k, max_ngram=args.max_ngram)) for k in ks]
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens)
    pc = PromptCache(lm)
    rows = []
    n = 0
    for task in tasks:
        t = TEMPLATES[task]
        for rec in load_longbench(data_dir(args.data) / "longbench" / f"{task}.jsonl", args.limit):
            text, kept, original = cut_at_whitespace(rec.context, lm.tokenizer, args.context_tokens)
            name = schema_name(f"spec_{task}_{n}")
            schema, modules = build_schema(name, t.before, (text,))
            prompt = build_prompt(name, modules, t.after.format(input=rec.input), t.chat)
            pc.add_schema(schema)
            pc.encode(name)
            pc.speculative = None
            pc.answer(prompt, config=GenerationConfig(max_new_tokens=2))  # warm-up, untimed
            results = {}
            for label, spec in rotated(modes, n):
                pc.speculative = spec
                results[label] = pc.answer(prompt, config=cfg)
            base = results["plain"]
            for label, r in results.items():
                sp = r.speculative or {}
                row = {"id": f"{task}/{n}/{label}", "task": task, "item": n, "mode": label,
                       "context_tokens": kept, "original_tokens": original,
                       "generated": r.usage.completion_tokens,
                       "decode_tokens_per_s": r.timing.decode_tokens_per_s,
                       "proposed": sp.get("proposed", 0), "accepted": sp.get("accepted", 0),
                       "forwards": sp.get("forwards", max(r.usage.completion_tokens - 1, 0)),
                       "same_as_plain": r.token_ids == base.token_ids}
                log.add(row)
                rows.append(row)
            print(f"{task} item {n}: " + ", ".join(
                f"{m} {results[m].timing.decode_tokens_per_s:.1f} tok/s" for m, _ in modes), file=sys.stderr)
            n += 1
    summary = summarize(rows, [m for m, _ in modes])
    outputs.write_csv(out / "summary.csv", summary)
    write_report(out, summary, args, str(lm.dtype).removeprefix("torch."))
    print((out / "report.md").read_text())
    return 0


def summarize(rows: list[dict], modes: list[str]) -> list[dict]:
    """One row per (task, mode) and per mode over all tasks: acceptance, tokens/forward, speed vs plain."""
    out = []
    for task in sorted({r["task"] for r in rows}) + ["all"]:
        sel = [r for r in rows if task in ("all", r["task"])]
        plain = {r["item"]: r["decode_tokens_per_s"] for r in sel if r["mode"] == "plain"}
        for mode in modes:
            ms = [r for r in sel if r["mode"] == mode]
            proposed, accepted = sum(r["proposed"] for r in ms), sum(r["accepted"] for r in ms)
            forwards = sum(r["forwards"] for r in ms)
            after_first = sum(max(r["generated"] - 1, 0) for r in ms)
            ratios = [r["decode_tokens_per_s"] / plain[r["item"]] for r in ms if plain.get(r["item"])]
            out.append({
                "task": task, "mode": mode, "items": len(ms),
                "acceptance_rate": round(accepted / proposed, 3) if proposed else None,
                "tokens_per_forward": round(after_first / forwards, 3) if forwards else None,
                "decode_tokens_per_s_median": round(statistics.median(r["decode_tokens_per_s"] for r in ms), 1),
                "speedup_vs_plain_median": round(statistics.median(ratios), 2) if ratios else None,
                "same_as_plain": sum(r["same_as_plain"] for r in ms),
            })
    return out


def write_report(out: Path, summary: list[dict], args, dtype: str) -> None:
    setup = (f"tasks {args.tasks}, {args.limit} items each; context cut to at most {args.context_tokens} tokens "
             f"at a whitespace boundary (one cached module); {args.max_new_tokens} new tokens, greedy; "
             f"lookup max n-gram {args.max_ngram}; torch threads {args.threads}. `tokens_per_forward`: "
             f"tokens after the first per model forward while decoding (plain: 1). `speedup_vs_plain_median`: "
             f"median over items of decode tok/s divided by the same item's plain decode tok/s, same run.\n")
    outputs.write_report(out / "report.md", "Speculative decoding: prompt lookup vs plain greedy",
                         model=args.model, dtype=dtype,
                         sections=[("Setup", setup), ("Results", outputs.markdown_table(summary))])


if __name__ == "__main__":
    from experiments.cli import main

    raise SystemExit(main(["speculative", *sys.argv[1:]]))
