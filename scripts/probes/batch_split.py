"""Where a packed batch's time goes, beside one prompt answered alone (smollm2-135m, fp32, one thread by default).

The speed benchmark's 4,000-token module, `pml bench batch`'s 8 questions, 32 greedy tokens each
(EOS ignored). Times the C kernels (packed matvec, decode attention, flash attention) and the
whole `adapter.forward` calls inside `answer_batch` and inside `answer` for the first question,
and prints them per decode step: what the kernels do not take is torch's other operators and
Python. One prompt's step is bound by reading the weights; a batch's step does 8x the attention
arithmetic (every prompt attends to the 4,000 cached keys), which packing cannot share.

    python scripts/probes/batch_split.py [--runs 2] [--threads 1]
"""

import argparse
import collections

import _setup


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=2, help="timed runs of each way (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    args = p.parse_args()

    from attention_store import adapter
    from attention_store.kernels import ops
    from experiments.batch import QUESTIONS
    from experiments.workloads import prompt_xml
    from prompt_cache.generation import GenerationConfig

    pc, _, _ = _setup.speed_prompt(threads=args.threads)
    clock = pc.clock
    prompts = [prompt_xml("speed", 1, q) for q in QUESTIONS]
    cfg = GenerationConfig(max_new_tokens=32, eos_ids=())
    spent: dict[str, float] = collections.defaultdict(float)

    def timed(owner, name):
        fn = getattr(owner, name)

        def wrapper(*a, **k):
            t = clock.now()
            try:
                return fn(*a, **k)
            finally:
                spent[name] += clock.ms_since(t)
        setattr(owner, name, wrapper)

    for name in ("matvec", "decode_attention", "flash_attention"):
        timed(ops, name)
    timed(adapter, "forward")  # the module-level name answer and answer_batch call through
    ways = {"batch of 8": lambda: pc.answer_batch(prompts, config=cfg), "one prompt": lambda: [pc.answer(prompts[0], config=cfg)]}
    for way in ways.values():
        way()  # untimed warm-up
    for r in range(args.runs):
        for way, fn in ways.items():
            spent.clear()
            t = clock.now()
            got = fn()
            total = clock.ms_since(t)
            prefill = got[0].timing.prefill_ms
            steps = cfg.max_new_tokens - 1
            decode = spent["forward"] - prefill  # the forwards after the prefill
            kernels = spent["matvec"] + spent["decode_attention"]
            tokens = sum(len(x.token_ids) for x in got)
            print(f"run {r} {way}: {total:.0f} ms for {tokens} tokens ({tokens / total * 1e3:.1f} tokens/s); "
                  f"prefill {prefill:.0f} ms (flash attention {spent['flash_attention']:.0f}); per decode step "
                  f"{decode / steps:.1f} ms = matvec {spent['matvec'] / steps:.1f} (prefill's LM head included) + "
                  f"decode attention {spent['decode_attention'] / steps:.1f} + the rest {(decode - kernels) / steps:.1f}")


if __name__ == "__main__":
    main()
