"""`pml bench batch`: tokens/s of a packed batch of prompts over one schema against answering them one by one.

One schema with one module of exactly `--context` tokens of real text (as the speed benchmark) and
`--batch` different questions. Per repeat, in alternating order: the prompts answered one by one
with `PromptCache.answer`, and all of them with `PromptCache.answer_batch` (one packed forward
per step). Throughput = generated tokens / wall time of the whole set, prefill included. The greedy
outputs of the two ways are compared prompt by prompt. `--contention N` runs N competing PyTorch
processes (the speed benchmark's) through the timed repeats.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from experiments import cli, outputs, speed_extras
from experiments.common import document_pool, exact_text, module_tokens
from experiments.data import data_dir
from experiments.workloads import prompt_xml, schema_xml
from prompt_cache import DEFAULT_MODEL

QUESTIONS = (
    "Which people are named in these reports, and what did each of them do?",
    "Summarize the main event described in the articles in two sentences.",
    "Which organizations are mentioned, and what role does each one play?",
    "What dates or times are given in the reports, and what happened then?",
    "Which places are mentioned, and why are they important to the story?",
    "What numbers or amounts appear in the articles, and what do they measure?",
    "What are the main disagreements or conflicts described in these reports?",
    "What is likely to happen next, according to the people quoted in the articles?",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="registry name, model dir or tiny:<arch> (default: %(default)s)")
    p.add_argument("--batch", type=cli.positive, default=8, help="prompts per batch, at most %d (default: %%(default)s)" % len(QUESTIONS))
    p.add_argument("--context", type=cli.positive, default=4000, help="tokens in the cached module (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=cli.positive, default=32, help="greedy tokens per prompt, EOS ignored (default: %(default)s)")
    p.add_argument("--repeats", type=cli.positive, default=3, help="timed repeats of each way (default: %(default)s)")
    cli.add_threads_argument(p)
    p.add_argument("--contention", type=cli.count, default=0, metavar="N",
                   help="run N competing PyTorch processes (as `pml bench speed --contention`) during the timed "
                        "repeats (default: %(default)s)")
    cli.add_run_arguments(p, "batch/<model>")
    cli.add_device_arguments(p)


def run(args: argparse.Namespace) -> int:
    import torch

    from attention_store.store import AttentionStore
    from attention_store.tiers import MemoryTier
    from prompt_cache.engine import PromptCache
    from prompt_cache.generation import GenerationConfig
    from prompt_cache.models import describe_placement, load_model

    if not 1 <= args.batch <= len(QUESTIONS):
        raise SystemExit(f"pml bench batch: error: --batch must be between 1 and {len(QUESTIONS)}")
    cli.apply_threads(args)
    out = outputs.run_dir(f"batch/{args.model.replace(':', '-').replace('/', '_')}", args.out)
    lm = load_model(args.model, cli.model_dtype(args), device=args.device, device_map=args.device_map)
    text, _ = exact_text(lm.tokenizer, document_pool(data_dir(args.data), lm.tokenizer, args.context), args.context)
    pc = PromptCache(lm, AttentionStore(MemoryTier(8 << 30), None))
    layout = pc.add_schema(schema_xml("batch", [text]))
    assert module_tokens(layout) == args.context, f"module holds {module_tokens(layout)} tokens, not {args.context}"
    pc.encode("batch")
    prompts = [prompt_xml("batch", 1, q) for q in QUESTIONS[:args.batch]]
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, eos_ids=())
    clock = pc.clock

    def one_by_one():
        return [pc.answer(p, config=cfg) for p in prompts]

    def packed():
        return pc.answer_batch(prompts, config=cfg)

    ways = {"one_by_one": one_by_one, "batch": packed}
    rates: dict[str, list[float]] = {w: [] for w in ways}
    answers: dict[str, list] = {}
    packed()  # warm-up, untimed
    with speed_extras.Contention(args.contention) as contention:
        for r in range(args.repeats):
            for way in (ways if r % 2 == 0 else reversed(list(ways))):
                t = clock.now()
                got = ways[way]()
                seconds = clock.now() - t
                rates[way].append(sum(len(x.token_ids) for x in got) / seconds)
                answers[way] = got
                print(f"  repeat {r} {way:10s} {rates[way][-1]:7.2f} tokens/s", flush=True)
        competing = contention.alive()
    if args.contention and competing < args.contention:
        print(f"warning: only {competing} of {args.contention} competitors were still running at the end", file=sys.stderr)
    same = [a.token_ids == b.token_ids for a, b in zip(answers["one_by_one"], answers["batch"])]
    med = {w: statistics.median(v) for w, v in rates.items()}
    ratio = med["batch"] / med["one_by_one"]
    table = [{"way": w, "prompts": args.batch, "tokens_per_prompt": args.max_new_tokens,
              "tokens_s_median": med[w], "tokens_s_min": min(v), "tokens_s_max": max(v),
              "ttft_ms": statistics.median(x.timing.ttft_ms for x in answers[w])} for w, v in rates.items()]
    result = "PASS" if ratio >= 3 else "FAIL"
    outputs.write_csv(out / "summary.csv", table)
    outputs.write_report(out / "report.md", "Batched answering: packed batch vs one by one", model=args.model,
                         dtype=str(next(lm.model.parameters()).dtype).removeprefix("torch."), sections=[
                             ("Setup", f"- one module of {args.context} tokens; {args.batch} questions; "
                                       f"{args.max_new_tokens} greedy tokens each (EOS ignored); torch threads "
                                       f"{torch.get_num_threads()}; {args.repeats} repeats, alternating order\n"
                                       f"- competing processes: {args.contention} (PyTorch matmuls at torch's default "
                                       f"thread count, running through every timed repeat)\n"
                                       f"- rerun: `python -m experiments.batch --model {args.model} --batch {args.batch} "
                                       f"--context {args.context} --threads {args.threads} --contention {args.contention}`\n"),
                             ("Throughput", outputs.markdown_table(table)
                              + f"\nbatch / one by one = {ratio:.2f}x (goal >= 3x: {result}); greedy outputs identical "
                                f"for {sum(same)} of {len(same)} prompts.\n")],
                         placement=describe_placement(lm.model), processes="1 (single process)")
    print(outputs.markdown_table(table))
    print(f"{result}: batch / one by one = {ratio:.2f}x tokens/s (goal >= 3); identical outputs {sum(same)}/{len(same)}")
    print(f"report: {out / 'report.md'}")
    return 0 if result == "PASS" else 1


if __name__ == "__main__":
    from experiments.cli import main

    raise SystemExit(main(["batch", *sys.argv[1:]]))
