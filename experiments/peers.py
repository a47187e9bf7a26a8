"""`pml bench peers`: our TTFT beside llama.cpp's on the same GGUF, the same token ids, the same threads.

An optional benchmark (`pip install -e '.[peers]'`: llama-cpp-python has no wheel on PyPI, so pip
builds llama.cpp from source, about 20 minutes on 2 cores); not part of the tests or CI.

llama.cpp (through llama-cpp-python) runs the registry model's own GGUF file (SmolLM2's Q4_1
weights); we run the weights converted from it (fp32 by default). Both get exactly the same token
ids: ours, from the bound PML prompt (`assembler.baseline_tokens`). Three cases, each timed to the
first token (prefill + greedy pick), in an order rotated between repeats:

- `full`: the whole prompt (a `--context`-token document and a ~30-token question) as one prefill;
  llama.cpp starts from an empty KV cache, we answer with `use_cache=False`.
- `prefix`: the document is cached, the question is new. llama.cpp's in-memory prefix reuse: its KV
  cache holds the document and only the question is evaluated (what its server does for a repeated
  prefix); ours: the document module's states in the memory tier.
- `modular`: a prompt of the document's 2nd and 4th quarters and the question (two non-adjacent
  pieces). llama.cpp reuses the longest common prefix with what its cache holds (the document:
  nothing in common), so it evaluates the whole prompt; ours: the two quarter modules from the
  memory tier, at their reserved positions.
"""

from __future__ import annotations

import argparse
import statistics

from experiments import cli, outputs
from experiments.common import document_pool, exact_text, piece_sizes, rotated, split_exact
from experiments.data import data_dir
from experiments.speed import QUESTION
from prompt_cache import DEFAULT_MODEL

CASES = ("full", "prefix", "modular")
INSTALL = ("pml bench peers needs llama-cpp-python, an optional extra: pip install -e '.[peers]' (pip builds "
           "llama.cpp from source: about 20 minutes on 2 cores, with a C++ compiler and cmake)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="a registry model with a GGUF file (default: %(default)s)")
    p.add_argument("--context", type=cli.positive, default=4000, help="tokens in the document (default: %(default)s)")
    p.add_argument("--repeats", type=cli.positive, default=3, help="timed repeats of each case and engine (default: %(default)s)")
    cli.add_threads_argument(p, engines="both engines' (torch intra-op, llama.cpp n_threads and n_threads_batch)")
    cli.add_run_arguments(p, "peers/<model>")


class LlamaCpp:
    """llama.cpp on a GGUF file, fed token ids, keeping its KV cache between calls (prefix reuse)."""

    def __init__(self, gguf, n_ctx: int, threads: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                         n_batch=512, logits_all=False, verbose=False)
        self.cached: list[int] = []  # the token ids whose states the KV cache holds

    def first_token(self, ids: list[int], keep: int | None = None) -> int:
        """Evaluate `ids` after the longest common prefix with the cache (or after exactly `keep`
        cached tokens, which must be a prefix of `ids`); the greedy next token."""
        import numpy as np

        common = 0
        while common < min(len(ids) - 1, len(self.cached)) and ids[common] == self.cached[common]:
            common += 1
        if keep is not None:
            assert keep <= common, "the tokens to keep are not in the cache"
            common = keep
        self.llm.n_tokens = common  # `eval` drops the cache's states after n_tokens, then appends
        self.llm.eval(ids[common:])
        self.cached = list(ids)
        logits = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))
        return int(np.argmax(logits))


def run(args: argparse.Namespace) -> int:
    from attention_store.store import AttentionStore
    from attention_store.tiers import MemoryTier
    from pml.builder import PromptBuilder, SchemaBuilder
    from prompt_cache import assembler
    from prompt_cache.engine import PromptCache
    from prompt_cache.generation import GenerationConfig
    from prompt_cache.models import load_model, model_spec

    try:
        gguf = model_spec(args.model).locate_gguf()
    except KeyError:
        raise SystemExit(f"error: {args.model!r} is not a registry model with a GGUF file") from None
    except RuntimeError as e:  # its package is not installed: the message says what to install
        raise SystemExit(f"error: {e}") from None
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit(f"error: {INSTALL}") from None
    cli.apply_threads(args)
    out = outputs.run_dir(f"peers/{args.model}", args.out)
    lm = load_model(args.model)
    pool = document_pool(data_dir(args.data), lm.tokenizer, args.context)
    text, _ = exact_text(lm.tokenizer, pool, args.context)
    quarters = split_exact(lm.tokenizer, pool, piece_sizes(args.context, 4))

    pc = PromptCache(lm, AttentionStore(MemoryTier(8 << 30), None))
    b = SchemaBuilder("whole")
    b.module("doc", text=text)
    pc.add_schema(b.to_xml())
    b = SchemaBuilder("quarters")
    for i, piece in enumerate(quarters):
        b.module(f"q{i}", text=piece)
    pc.add_schema(b.to_xml())
    pc.encode("whole")
    pc.encode("quarters")
    whole = PromptBuilder("whole").use("doc").user(QUESTION).to_xml()
    modular = PromptBuilder("quarters").use("q1").use("q3").user(QUESTION).to_xml()
    ids = {}
    for case, prompt in (("whole", whole), ("modular", modular)):
        s, bound = pc.bind(prompt)
        ids[case] = assembler.baseline_tokens(s.layout, bound)
    s, bound = pc.bind(whole)
    fresh = len(assembler.fresh_tokens(s.layout, bound)[0])
    document = ids["whole"][:-fresh]
    assert ids["whole"][-fresh:] == assembler.fresh_tokens(s.layout, bound)[0], "the question is not the prompt's end"

    peer = LlamaCpp(gguf, n_ctx=len(ids["whole"]) + 64, threads=args.threads)
    one = GenerationConfig(max_new_tokens=1)
    clock = pc.clock

    def ours(case: str) -> tuple[float, int]:
        r = pc.answer(modular if case == "modular" else whole, use_cache=case != "full", config=one)
        return r.timing.ttft_ms, r.token_ids[0]

    def theirs(case: str) -> tuple[float, int]:
        if case == "prefix" and peer.cached[:len(document)] != document:
            peer.first_token(ids["whole"], keep=0)  # untimed: the document into llama.cpp's cache
        t = clock.now()
        if case == "full":
            token = peer.first_token(ids["whole"], keep=0)
        elif case == "prefix":
            token = peer.first_token(ids["whole"], keep=len(document))
        else:
            token = peer.first_token(ids["modular"])
        return clock.ms_since(t), token

    engines = {"pml": ours, "llama.cpp": theirs}
    for engine in engines.values():  # warm-up, untimed
        engine("prefix")
    rows = []
    runs = [(e, c) for c in CASES for e in engines]
    for r in range(args.repeats):
        for engine, case in rotated(runs, r):
            ms, token = engines[engine](case)
            rows.append({"engine": engine, "case": case, "repeat": r, "ttft_ms": ms, "first_token": token})
            print(f"  repeat {r} {engine:9s} {case:8s} {ms:9.1f} ms", flush=True)
    outputs.write_csv(out / "items.csv", rows)
    med = {(e, c): statistics.median(x["ttft_ms"] for x in rows if (x["engine"], x["case"]) == (e, c))
           for e in engines for c in CASES}
    table = []
    for c in CASES:
        tokens = len(ids["modular"] if c == "modular" else ids["whole"])
        computed = {"full": tokens, "prefix": fresh, "modular": fresh}[c]
        agree = all(x["first_token"] == y["first_token"] for x in rows for y in rows
                    if x["case"] == y["case"] == c and x["engine"] == "pml" and y["engine"] == "llama.cpp")
        table.append({"case": c, "prompt_tokens": tokens, "pml_computes": computed,
                      "llama.cpp_computes": {"full": tokens, "prefix": fresh, "modular": tokens}[c],
                      "pml_ms": med[("pml", c)], "llama.cpp_ms": med[("llama.cpp", c)],
                      "llama.cpp / pml": med[("llama.cpp", c)] / med[("pml", c)], "same_first_token": agree})
    prefix_ok = med[("pml", "prefix")] <= med[("llama.cpp", "prefix")]
    verdict = (f"prefix reuse: pml {med[('pml', 'prefix')]:.0f} ms vs llama.cpp {med[('llama.cpp', 'prefix')]:.0f} ms "
               f"({'PASS' if prefix_ok else 'FAIL'}: goal no slower than llama.cpp's in-memory prefix reuse)")
    figure = _plot(out / "peers_ttft.png", med, args)
    outputs.write_csv(out / "summary.csv", table)
    outputs.write_report(out / "report.md", "TTFT beside llama.cpp (same GGUF, same token ids, same threads)",
                         model=args.model, dtype=str(next(lm.model.parameters()).dtype).removeprefix("torch."),
                         sections=[
                             ("Setup", f"- llama.cpp: llama-cpp-python {llama_cpp.__version__} on `{gguf.name}`; "
                                       f"pml: the weights converted from it\n"
                                       f"- document {args.context} tokens, question {fresh} tokens; modular: quarters "
                                       f"2 and 4 of the document + the question\n"
                                       f"- threads {args.threads} (both); {args.repeats} repeats, medians\n"),
                             ("TTFT", outputs.markdown_table(table) + f"\n{verdict}\n\n![TTFT]({figure.name})\n")],
                         processes="1 (single process)")
    print(outputs.markdown_table(table))
    print(verdict)
    print(f"report: {out / 'report.md'}")
    return 0 if prefix_ok else 1


def _plot(path, med: dict, args):
    from experiments.plots import bar_plot

    return bar_plot(path, CASES, {e: [med[(e, c)] / 1e3 for c in CASES] for e in ("pml", "llama.cpp")},
                    ylabel="TTFT (s, log scale)", logy=True,
                    title=f"{args.model}, {args.context}-token document, {args.threads} thread(s)")


if __name__ == "__main__":
    import sys

    from experiments.cli import main

    raise SystemExit(main(["peers", *sys.argv[1:]]))
