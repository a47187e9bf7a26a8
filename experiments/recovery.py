"""`pml bench recovery`: what the recovery policies buy back, against what they cost in TTFT.

Runs the quality experiment (same items, baseline, metrics, resume, output files) with the
`independent` policy, `schema`, `blend:R` and `link:K` settings on multi-passage items, then adds
one table across all items per setting (TTFT relative to `independent`, mean KL, first-token
agreement, identical share, task score, recomputed share) and Pareto plots of fidelity against TTFT.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from experiments import distributed, outputs, quality

DEFAULT_TASKS = "musique,longbench_mini/hotpotqa,longbench_mini/2wikimqa,longbench_mini/musique"
DEFAULT_POLICIES = ["independent", "schema", "blend:0.05", "blend:0.15", "blend:0.3", "link:4", "link:16", "link:32"]
GOAL = "at most 2x the independent TTFT, mean KL at most a third of independent's, twice as many identical answers"


def add_arguments(p: argparse.ArgumentParser) -> None:
    quality.add_arguments(p)
    p.set_defaults(tasks=DEFAULT_TASKS, policy=DEFAULT_POLICIES)


def summarize(rows: list[dict], policies: list[str]) -> list[dict]:
    """One row per setting over all items (scores x100, shares in %)."""
    base_ttft = statistics.mean(r["independent"]["ttft_ms"] for r in rows) if "independent" in policies else None
    out = []
    for p in policies:
        got = [r[p] for r in rows]
        ttft = statistics.mean(g["ttft_ms"] for g in got)
        kls = [g["kl"] for g in got if g["kl"] is not None]
        recomputed = [g.get("recomputed_tokens", 0) / max(g["cached_tokens"] + g.get("recomputed_tokens", 0), 1)
                      for g in got]
        out.append({
            "setting": p, "n": len(got),
            "ttft_ms": round(ttft, 1),
            "ttft_vs_independent": round(ttft / base_ttft, 2) if base_ttft else None,
            "mean_kl": (round(statistics.mean(kls), 5) or 0.0) if kls else None,  # no "-0" from rounding
            "first_token_%": round(100 * statistics.mean(g["first_token_same"] for g in got), 1),
            "identical_%": round(100 * statistics.mean(g["identical"] for g in got), 1),
            "score": round(100 * statistics.mean(g["score"] for g in got), 2),
            "recomputed_%": round(100 * statistics.mean(recomputed), 1),
        })
    return out


def goal_check(table: list[dict]) -> list[str]:
    """Which settings meet the issue's goal against `independent` (lines for the report)."""
    ind = next((r for r in table if r["setting"] == "independent"), None)
    if ind is None or ind["mean_kl"] is None:
        return ["(no independent row with KL: goal not checked)"]
    lines = []
    for r in table:
        if r["setting"] in ("independent", "schema") or r["mean_kl"] is None:
            continue
        ok = (r["ttft_vs_independent"] <= 2 and r["mean_kl"] <= ind["mean_kl"] / 3
              and r["identical_%"] >= 2 * ind["identical_%"])
        lines.append(f"- {r['setting']}: TTFT {r['ttft_vs_independent']}x, KL {r['mean_kl']} "
                     f"(independent {ind['mean_kl']}), identical {r['identical_%']}% (independent "
                     f"{ind['identical_%']}%): {'meets' if ok else 'misses'} the goal")
    return lines


def pareto_plot(path: Path, table: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, key, label in ((axes[0], "mean_kl", "mean KL(baseline || cached), nats/step"),
                           (axes[1], "identical_%", "identical greedy answers, %")):
        pts = [r for r in table if r[key] is not None]
        ax.scatter([r["ttft_ms"] for r in pts], [r[key] for r in pts])
        for r in pts:
            ax.annotate(r["setting"], (r["ttft_ms"], r[key]), fontsize=8, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("mean TTFT, ms (cached path)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_title("fidelity vs TTFT (lower left is better)")
    axes[1].set_title("identical answers vs TTFT (upper left is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    if args.out is None:
        args.out = str(outputs.run_dir(f"recovery/{quality._slug(args.model)}", None))
    code = quality.run(args)
    if code or not distributed.world().is_main:  # the main process writes the summary, once
        return code
    root = Path(args.out)
    rows = [row for f in sorted(root.rglob("items.jsonl")) for row in outputs.ItemLog(f).rows.values()]
    policies = list(dict.fromkeys(args.policy))
    rows = [r for r in rows if all(p in r for p in policies)]
    if not rows:
        return 0
    table = summarize(rows, policies)
    outputs.write_csv(root / "recovery.csv", table)
    pareto_plot(root / "recovery_pareto.png", table)
    sections = [
        ("Settings", outputs.markdown_table(table)
         + f"\nn = {len(rows)} items over {args.tasks}. TTFT is the cached path's (lookup, assembly, the "
           "recovery recompute, prefill of the new tokens); `recomputed_%` is the share of the assembled "
           "context recomputed; KL along the baseline's first answer tokens.\n\n![pareto](recovery_pareto.png)\n"),
        ("Goal", f"Goal ({GOAL}):\n\n" + "\n".join(goal_check(table)) + "\n"),
    ]
    outputs.write_report(root / "recovery.md", "Recovery policies: fidelity against TTFT", model=args.model,
                         dtype="float32", sections=sections)
    print(outputs.markdown_table(table))
    print(f"wrote {root / 'recovery.csv'}, {root / 'recovery.md'}, {root / 'recovery_pareto.png'}")
    return 0


def compare_policies(lm, store, schema, prompt, policies: list[str], max_new_tokens: int = 64,
                     kl_tokens: int = 32) -> dict:
    """One prompt under each policy against the full prefill: the per-prompt view for schema authors.

    `schema`, `prompt`: PML text or parsed objects. Returns {"baseline": {...}, "policies": [{...}]}.
    """
    from experiments import metrics
    from prompt_cache.engine import PromptCache
    from prompt_cache.generation import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=max_new_tokens)
    caches = {p: PromptCache(lm, store, policy=p) for p in policies}
    for pc in caches.values():
        pc.add_schema(schema)
    first = next(iter(caches.values()))
    base, base_lp = first.answer_scored(prompt, use_cache=False, config=cfg, limit=kl_tokens)
    forced = list(base.token_ids[:kl_tokens])
    out = {"baseline": {"text": base.text, "ttft_ms": round(base.timing.ttft_ms, 1),
                        "prompt_tokens": base.usage.prompt_tokens}, "policies": []}
    for p, pc in caches.items():
        pc.answer(prompt, config=GenerationConfig(max_new_tokens=1))  # encode what is missing, outside the timing
        r, lp = pc.answer_scored(prompt, forced, config=cfg)
        context = r.usage.cached_tokens + r.usage.recomputed_tokens
        out["policies"].append({
            "policy": p, "ttft_ms": round(r.timing.ttft_ms, 1), "recompute_ms": round(r.timing.recompute_ms, 1),
            "recomputed_tokens": r.usage.recomputed_tokens,
            "recomputed_%": round(100 * r.usage.recomputed_tokens / context, 1) if context else 0.0,
            "first_token_same": r.token_ids[:1] == base.token_ids[:1],
            "mean_kl": round(metrics.mean_kl(base_lp, lp), 5) if forced else None,
            "identical": r.token_ids == base.token_ids, "text": r.text})
    return out


if __name__ == "__main__":
    import sys

    from experiments.cli import main

    raise SystemExit(main(["recovery", *sys.argv[1:]]))
