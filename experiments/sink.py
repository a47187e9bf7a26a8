"""Does the `independent` policy need the leading root text as an attention sink? Measure it.

For each item, the baseline (full prefill) answers greedily; then the same prompt is answered from
states encoded with the `independent` policy twice: with the sink (each module also attends to the
schema's leading root text, the default) and without it (each module attends to itself alone).
Fidelity to the baseline: first-token agreement, identical greedy output, and mean KL(baseline ||
cached) of the next-token distributions along the baseline's own answer.

    python -m experiments.sink --tasks musique,longbench_mini/hotpotqa --limit 6
"""

from __future__ import annotations

import argparse
import statistics
import sys

from tqdm import tqdm

from experiments import data as D
from experiments import cli, metrics, outputs
from experiments.workloads import load_items
from prompt_cache import DEFAULT_MODEL


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--tasks", default="musique,longbench_mini/hotpotqa,longbench_mini/multifieldqa_en")
    p.add_argument("--limit", type=cli.positive, default=6, help="items per task")
    p.add_argument("--max-context-tokens", type=cli.positive, default=2048)
    p.add_argument("--max-new-tokens", type=cli.positive, default=24)
    cli.add_run_arguments(p, "sink/<model>")
    cli.add_threads_argument(p, default=None)
    cli.add_device_arguments(p)


def run(args) -> int:
    from prompt_cache.engine import PromptCache
    from prompt_cache.generation import GenerationConfig
    from prompt_cache.models import describe_placement, load_model

    cli.apply_threads(args)
    lm = load_model(args.model, cli.model_dtype(args), device=args.device, device_map=args.device_map)
    root = D.data_dir(args.data)
    out = outputs.run_dir(f"sink/{lm.name}", args.out)
    log = outputs.ItemLog(out / "items.jsonl")
    items = [it for task in args.tasks.split(",") for it in
             load_items(task, root, lm.tokenizer, args.max_context_tokens, args.limit)]
    variants = {"sink": "independent", "no_sink": "independent:nosink"}
    for item in tqdm(items, desc="items", file=sys.stderr):
        if log.done(item.id):
            continue
        config = GenerationConfig(max_new_tokens=min(args.max_new_tokens, item.max_new_tokens))
        base_pc = PromptCache(lm)
        base_pc.add_schema(item.schema)
        base, ref = base_pc.answer_scored(item.prompt, use_cache=False, config=config)
        row = {"id": item.id, "task": item.task, "modules": item.modules, "baseline": base.text}
        continuation = list(base.token_ids)
        for name, policy in variants.items():
            pc = PromptCache(lm, policy=policy)
            pc.add_schema(item.schema)
            got, lp = pc.answer_scored(item.prompt, continuation, config=config)
            row[f"{name}_identical"] = got.token_ids == base.token_ids
            row[f"{name}_first_token"] = got.token_ids[:1] == base.token_ids[:1]
            if continuation:
                row[f"{name}_kl"] = metrics.mean_kl(ref, lp)
        log.add(row)
    rows = list(log.rows.values())
    summary = []
    for task in dict.fromkeys(r["task"] for r in rows):
        rs = [r for r in rows if r["task"] == task]
        line = {"task": task, "n": len(rs)}
        for name in variants:
            line[f"{name}_first_token_%"] = 100 * statistics.mean(r[f"{name}_first_token"] for r in rs)
            line[f"{name}_identical_%"] = 100 * statistics.mean(r[f"{name}_identical"] for r in rs)
            kls = [r[f"{name}_kl"] for r in rs if f"{name}_kl" in r]
            line[f"{name}_mean_kl"] = statistics.mean(kls) if kls else float("nan")
        summary.append(line)
    outputs.write_csv(out / "summary.csv", summary)
    table = outputs.markdown_table(summary)
    outputs.write_report(out / "report.md", "Attention sink for the independent policy", model=lm.name,
                         dtype=str(lm.dtype).removeprefix("torch."), sections=[("Fidelity to the full prefill", table)],
                         placement=describe_placement(lm.model), processes="1 (single process)")
    print(table)
    print(f"wrote {out}/report.md")
    return 0


if __name__ == "__main__":  # python -m experiments.sink: the same parser as `pml bench sink`
    from experiments.cli import main

    raise SystemExit(main(["sink", *sys.argv[1:]]))
