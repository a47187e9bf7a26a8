"""Quality experiment: task scores with and without the cache, per encoding policy, plus fidelity measures.

For each item: the baseline answer (full prefill, `use_cache=False`) and, per policy, the cached
answer, all greedy. Fidelity a small model can show: greedy output identical to the baseline,
first-token agreement, and the mean KL(baseline || cached) of the next-token distributions along
the baseline's own answer. Schema encoding is excluded from the timed answer (as in the paper), but
every answer's TTFT is recorded.

Output under `--out` (default `runs/quality/<model>`): `<task>/items.jsonl` (resumable),
`summary.csv`, `quality_delta.png`, `report.md`.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from experiments import cli, distributed, metrics, outputs, workloads
from experiments.data import data_dir
from prompt_cache import DEFAULT_MODEL

log = logging.getLogger(__name__)

POLICIES = ("independent", "schema")
DEFAULT_TASKS = "longbench/multi_news,longbench/qmsum,longbench_mini/*,musique"
STORE_BUDGET = 2 << 30  # bytes of KV held per item group (cleared between groups)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", default=DEFAULT_TASKS,
                   help="comma-separated: longbench/<name>, longbench_mini/<name>, leval/<name>, musique; "
                        "folder/* selects a whole folder; name:N limits that task to N items "
                        f"(default: {DEFAULT_TASKS})")
    p.add_argument("--limit", type=cli.positive, help="items per task without its own :N (default: all)")
    p.add_argument("--policy", nargs="+", type=policy_spec, default=list(POLICIES), metavar="POLICY",
                   help="encoding policies to compare with the baseline: independent, independent:nosink, schema, "
                        "blend:R, link:K (default: independent schema)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="registry name (smollm2-135m, gemma3-270m), model folder, or tiny:<arch> for smoke tests")
    cli.add_run_arguments(p, "quality/<model>")
    p.add_argument("--max-context-tokens", type=cli.positive, default=2048,
                   help="contexts longer than this are truncated, explicitly and reported (default 2048)")
    p.add_argument("--max-new-tokens", type=cli.positive, help="override every task's max new tokens")
    p.add_argument("--no-kl", action="store_true", help="skip the KL fidelity measure (saves a prefill per item)")
    p.add_argument("--kl-tokens", type=cli.positive, default=32,
                   help="KL over at most the first N tokens of the baseline answer (default 32; bounds CPU time)")
    cli.add_threads_argument(p, default=None)
    cli.add_device_arguments(p)
    p.add_argument("--storage-dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="dtype of the stored module states (default: %(default)s; fp16 halves them on a GPU)")
    p.add_argument("--rerun-identical", action="store_true",
                   help="encode and answer every policy even where the policies' encoding masks are identical "
                        "(default: such items reuse the first policy's answer, marked `reused_from`)")


def _slug(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("_")


def policy_spec(spec: str) -> str:
    """argparse type: a registered encoding policy spec."""
    from attention_store.policies import get_policy

    try:
        return get_policy(spec).spec
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def policies_identical(layout, policies: list[str]) -> bool:
    """Whether every policy gives every module the same attention context and does nothing at
    assembly (so identical states and answers)."""
    from attention_store import encoder
    from attention_store.policies import get_policy

    if any(get_policy(p).needs_assembly for p in policies):
        return False
    plans = [encoder.plan(layout, p) for p in policies]
    return all(bool((a.context(u) == plans[0].context(u)).all()) for a in plans[1:] for u in a.units)


class Runner:
    """One PromptCache per policy over one model and one in-memory store, cleared between schemas."""

    def __init__(self, lm, policies: list[str], kl_tokens: int, rerun_identical: bool = False,
                 storage_dtype: str = "fp32"):
        from prompt_cache.engine import PromptCache
        from attention_store.store import AttentionStore
        from attention_store.tiers import MemoryTier

        self.lm = lm
        self.store = AttentionStore(MemoryTier(STORE_BUDGET), None)
        self.caches = {p: PromptCache(lm, self.store, policy=p, storage_dtype=storage_dtype) for p in policies}
        self.kl_tokens = kl_tokens  # 0: no KL
        self.rerun_identical = rerun_identical
        self.group: str | None = None

    def _enter(self, item: workloads.Item) -> tuple[bool, float]:
        """Add (and encode) the item's schema unless it is the current one; returns (identical, encode_ms)."""
        if item.group == self.group:
            return self._identical, 0.0
        for pc in self.caches.values():
            pc.schemas.clear()  # layouts and plans of finished items would pile up otherwise
        for row in self.store.entries():
            self.store.delete(row.meta.key)
        clock = next(iter(self.caches.values())).clock
        t = clock.now()
        layouts = [pc.add_schema(item.schema) for pc in self.caches.values()]
        self.group = item.group
        self._identical = len(self.caches) > 1 and policies_identical(layouts[0], list(self.caches))
        for i, pc in enumerate(self.caches.values()):
            if i == 0 or self.rerun_identical or not self._identical:
                pc.encode(layouts[0].schema_name)
        return self._identical, clock.ms_since(t)

    def run(self, item: workloads.Item, max_new_tokens: int) -> dict:
        from prompt_cache.generation import GenerationConfig

        clock = next(iter(self.caches.values())).clock
        t0 = clock.now()
        identical, encode_ms = self._enter(item)
        cfg = GenerationConfig(max_new_tokens=max_new_tokens)
        first = next(iter(self.caches.values()))
        base, base_lp = first.answer_scored(item.prompt, use_cache=False, config=cfg, limit=self.kl_tokens)
        base_score = metrics.score_item(item.metric, base.text, item.answers, item.all_classes, item.first_line)
        row = {"id": item.id, "task": item.task, "metric": item.metric, "answers": list(item.answers),
               "max_new_tokens": max_new_tokens, "modules": item.modules,
               "context_tokens": item.context_tokens, "original_tokens": item.original_tokens,
               "truncated": item.truncated, "truncation": item.note, "policies_identical": identical,
               "encode_ms": encode_ms,
               "baseline": {"text": base.text, "score": base_score, "tokens": len(base.token_ids),
                            "ttft_ms": base.timing.ttft_ms, "prompt_tokens": base.usage.prompt_tokens,
                            "finish_reason": base.finish_reason}}
        forced = list(base.token_ids[: self.kl_tokens])  # empty when kl_tokens is 0: no scoring
        for i, (policy, pc) in enumerate(self.caches.items()):
            if i > 0 and identical and not self.rerun_identical:
                # Same tokens, positions and masks as the first policy: the same states, so the same answer.
                first_policy = next(iter(self.caches))
                row[policy] = {**row[first_policy], "reused_from": first_policy}
                continue
            res, lp = pc.answer_scored(item.prompt, forced, use_cache=True, config=cfg)
            out = {"text": res.text,
                   "score": metrics.score_item(item.metric, res.text, item.answers, item.all_classes, item.first_line),
                   "tokens": len(res.token_ids), "identical": res.token_ids == base.token_ids,
                   "first_token_same": res.token_ids[:1] == base.token_ids[:1],
                   "ttft_ms": res.timing.ttft_ms, "cache_ms": res.timing.cache_ms, "prefill_ms": res.timing.prefill_ms,
                   "prompt_tokens": res.usage.prompt_tokens, "cached_tokens": res.usage.cached_tokens,
                   "recomputed_tokens": res.usage.recomputed_tokens, "recompute_ms": res.timing.recompute_ms,
                   "finish_reason": res.finish_reason, "kl": None}
            if base_lp is not None:
                out["kl"] = metrics.mean_kl(base_lp, lp)
            row[policy] = out
        row["wall_s"] = clock.now() - t0
        return row


# --------------------------------------------------------------------------- summary and report


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else float("nan")


def summarize(task: str, metric: str, rows: list[dict], policies: list[str]) -> dict:
    """One summary.csv row for a task (scores x100, percentages 0..100)."""
    out = {"task": task, "metric": metric, "n": len(rows)}
    base = metrics.task_score([r["baseline"]["score"] for r in rows])
    out["baseline"] = round(base, 2)
    for p in policies:
        got = [r[p] for r in rows if p in r]
        cached = metrics.task_score([g["score"] for g in got])
        out[f"cached_{p}"] = round(cached, 2)
        out[f"delta_{p}"] = round(cached - base, 2)
        out[f"identical_%_{p}"] = round(100 * _mean([g["identical"] for g in got]), 1)
        out[f"first_token_%_{p}"] = round(100 * _mean([g["first_token_same"] for g in got]), 1)
        out[f"mean_kl_{p}"] = round(_mean([g["kl"] for g in got]), 5)
    out["truncated"] = sum(r["truncated"] for r in rows)
    out["policies_identical"] = sum(r["policies_identical"] for r in rows)
    out["ttft_baseline_ms"] = round(_mean([r["baseline"]["ttft_ms"] for r in rows]), 1)
    for p in policies:
        out[f"ttft_{p}_ms"] = round(_mean([r[p]["ttft_ms"] for r in rows if p in r]), 1)
    return out


def plot(path: Path, summary: list[dict], policies: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [r["task"] for r in summary]
    width = 0.8 / max(len(policies), 1)
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(tasks) + 2), 4.5))
    for i, p in enumerate(policies):
        xs = [j + (i - (len(policies) - 1) / 2) * width for j in range(len(tasks))]
        ax.bar(xs, [r[f"delta_{p}"] for r in summary], width, label=p)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels(tasks, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("cached - baseline (score points)")
    ax.set_title("Quality change from the cache, per task")
    ax.legend(title="policy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _paper_rows(summary: list[dict], policies: list[str]) -> list[dict]:
    """Our tasks beside the authors' Llama-2-7B numbers (shared/reference/paper_results.md), if present."""
    from experiments import paper_reference as reference

    try:
        paper = {r.task: r for r in reference.load() if r.model == "Llama-2-7B"}
    except (FileNotFoundError, ValueError) as e:
        log.warning("paper reference numbers left out of the report: %s", e)
        return []
    rows = []
    for r in summary:
        folder, _, name = r["task"].rpartition("/")
        if folder.startswith("longbench") and name in paper:  # same LongBench task (not MuSiQue train)
            ref = paper[name]
            row = {"task": r["task"], "ours n": r["n"], "ours baseline": r["baseline"]}
            row.update({f"ours cached ({p})": r[f"cached_{p}"] for p in policies})
            row.update({"paper n": ref.n, "paper baseline": ref.baseline, "paper cached": ref.cached,
                        "paper delta": ref.delta})
            rows.append(row)
    return rows


def write_report(root: Path, summary: list[dict], all_rows: dict[str, list[dict]], args, lm,
                 policies: list[str], placement: str | None = None,
                 world: distributed.World = distributed.World()) -> None:
    cols = ["task", "metric", "n", "baseline"]
    for p in policies:
        cols += [f"cached_{p}", f"delta_{p}", f"identical_%_{p}", f"first_token_%_{p}", f"mean_kl_{p}"]
    cols += ["truncated", "policies_identical"]
    trunc = []
    for t, rows in all_rows.items():
        cut = [r for r in rows if r["truncated"]]
        if cut:
            orig = sorted(r["original_tokens"] for r in cut)
            trunc.append(f"- {t}: {len(cut)} of {len(rows)} items truncated (original context "
                         f"{orig[0]}-{orig[-1]} tokens, median {orig[len(orig) // 2]}); e.g. `{cut[0]['id']}`: "
                         f"{cut[0]['truncation']}")
    ident = sum(bool(s["policies_identical"]) for s in summary)
    tasks = ", ".join(f"{s['task']} (n={s['n']})" for s in summary)
    setup = (
        f"- tasks: {tasks}\n"
        f"- policies: {', '.join(policies)}; greedy decoding; max context {args.max_context_tokens} tokens"
        f"{'; max new tokens ' + str(args.max_new_tokens) if args.max_new_tokens else ''}\n"
        f"- max new tokens per task as LongBench, except summaries (gov_report, qmsum, multi_news, samsum, "
        f"L-Eval rouge tasks) capped at {workloads.SUMMARY_CAP} instead of 512, for CPU time\n"
        "- prompt: LongBench's English template split at {context}: text before = schema root text, context = "
        "one module (one module per passage for hotpotqa/2wikimqa/musique), text after with the question = "
        "`<user>` turn (plain text for trec/triviaqa/samsum, which LongBench runs without a chat template)\n"
        "- metrics: LongBench's definitions; ROUGE-L from the `rouge_score` package (LongBench used `rouge` "
        "on whitespace tokens), so summary scores are not digit-comparable with LongBench's\n"
        "- schema encoding time is excluded from the answers' TTFT (as in the paper); the two policies are "
        "compared on the same items, with one shared baseline per item\n")
    honesty = (
        f"In {ident} of {len(summary)} tasks, items have schemas for which both policies give every module the same "
        "attention context (column `policies_identical` counts items): one context module preceded only by "
        "root text. There `independent` and `schema` produce identical states by construction, so their "
        "columns must agree; the policies differ only on multi-passage items. "
        + ("Every policy was nevertheless encoded and answered on its own (`--rerun-identical`).\n"
           if args.rerun_identical else
           "To save CPU time such items were encoded and answered once, with the first policy, and that "
           "answer is recorded for the others (`reused_from` in items.jsonl); rerun with `--rerun-identical` "
           "to compute each policy separately.\n"))
    sections = [
        ("Setup", setup),
        ("Results", outputs.markdown_table(summary, cols)
         + "\nScores are x100 (mean of max over gold answers). `identical_%`: greedy output equal to the "
           "baseline's; `first_token_%`: same first token; `mean_kl`: mean KL(baseline || cached) in nats "
           f"per step along the first {args.kl_tokens} tokens of the baseline's answer.\n\n"
           "![quality delta](quality_delta.png)\n"),
        ("Policies", honesty),
        ("Truncation", ("\n".join(trunc) + "\n\nEvery item's `truncated`, `original_tokens`, `context_tokens` "
                        "and `truncation` are in its items.jsonl.\n") if trunc else "No context was truncated.\n"),
        ("Paper reference (Llama-2-7B, authors' per-sample outputs)",
         outputs.markdown_table(_paper_rows(summary, policies))
         + "\nThe paper's model is 50x larger and ran the full 200 items per task; compare the size of the "
           "delta, not the absolute scores.\n"),
    ]
    outputs.write_report(root / "report.md", "Quality: with and without the prompt cache", model=lm.name,
                         dtype=str(lm.dtype).replace("torch.", ""), sections=sections,
                         placement=placement, processes=world.describe())


# --------------------------------------------------------------------------- entry point


def run(args: argparse.Namespace) -> int:
    """One process, or one of several under `accelerate launch` (see experiments/distributed.py)."""
    from tqdm import tqdm

    cli.apply_threads(args)
    world = distributed.world()
    root_data = data_dir(args.data)
    tasks = workloads.expand_tasks(args.tasks, root_data)
    policies = list(dict.fromkeys(args.policy))
    from prompt_cache.models import describe_placement, load_model

    state = distributed.start(world)
    lm = load_model(args.model, cli.model_dtype(args), **distributed.placement(args, world, state))
    root = outputs.run_dir(f"quality/{_slug(args.model)}", args.out)
    plan, work = [], []
    for task, limit in tasks:
        items = workloads.load_items(task, root_data, lm.tokenizer, args.max_context_tokens,
                                     args.limit if limit is None else limit)
        tdir = root / task
        tdir.mkdir(parents=True, exist_ok=True)
        merged = tdir / "items.jsonl"
        own = distributed.shard_path(merged, world)
        log_ = outputs.ItemLog(own, also_read=[p for p in [merged, *distributed.shard_files(merged)] if p != own])
        plan.append((task, items, log_))
        work += [(task, item, log_) for item in items]
    # Split the full item list, not what is left: every process computes the same split whatever
    # the others have written meanwhile.
    mine = distributed.share(work, world)
    todo = sum(not log_.done(it.id) for _, it, log_ in mine)
    where = f", process {world.rank} of {world.size}" if world.size > 1 else ""
    print(f"quality: {len(tasks)} tasks, {len(mine)} items ({len(mine) - todo} already done), "
          f"policies {', '.join(policies)}, model {lm.name}, output {root}{where}", file=sys.stderr)
    runner = Runner(lm, policies, 0 if args.no_kl else args.kl_tokens, args.rerun_identical, args.storage_dtype)
    with tqdm(total=todo, desc="quality" + (f" [{world.rank}]" if world.size > 1 else ""), unit="item",
              file=sys.stderr, position=world.rank) as bar:
        for task, item, log_ in mine:
            if log_.done(item.id):
                continue
            bar.set_postfix_str(task)
            log_.add(runner.run(item, args.max_new_tokens or item.max_new_tokens))
            bar.update(1)
    distributed.barrier(state)
    if not world.is_main:
        return 0
    summary, all_rows = [], {}
    for task, items, _ in plan:
        merged = root / task / "items.jsonl"
        distributed.merge_shards(merged)
        log_ = outputs.ItemLog(merged)
        rows = [log_.rows[it.id] for it in items if log_.done(it.id)]
        all_rows[task] = rows
        if rows:
            summary.append(summarize(task, items[0].metric, rows, policies))
    placement = describe_placement(lm.model)
    for row in summary:  # where it ran, at the end so the score columns keep their places
        row.update(placement=placement, world_size=world.size)
    outputs.write_csv(root / "summary.csv", summary)
    if summary:
        plot(root / "quality_delta.png", summary, policies)
    write_report(root, summary, all_rows, args, lm, policies, placement, world)
    cols = ["task", "n", "baseline"] + [c for p in policies for c in (f"cached_{p}", f"delta_{p}", f"identical_%_{p}")]
    print(outputs.markdown_table(summary, cols))
    print(f"wrote {root / 'summary.csv'}, {root / 'report.md'}")
    return 0


if __name__ == "__main__":
    from experiments.cli import main

    raise SystemExit(main(["quality", *sys.argv[1:]]))
