"""Where a decode step's time goes at 4,000 tokens of context (smollm2-135m, fp32, one thread).

Prints greedy decode tokens/s after the cached prefill (as `answer` decodes), the torch profiler's
table of 31 decode steps by operator, and the time of one bare decode step over a cache of 40 and
of 4,039 tokens (what does not grow with the context is weights and per-step overhead).

    python scripts/probes/decode_profile.py
"""

import _setup


def main() -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from attention_store import adapter
    from prompt_cache import generation
    from prompt_cache.generation import GenerationConfig

    pc, _, prompt = _setup.speed_prompt()
    s, bound = pc.bind(prompt)
    cfg = GenerationConfig(max_new_tokens=32, eos_ids=())

    def decode(prof=None):
        logits, state = pc.prefill(pc.assemble(s, bound, room=cfg.max_new_tokens))
        t = pc.clock.now()
        if prof is None:
            got = list(generation.decode(pc.lm, state, logits, cfg))
        else:
            with prof:
                got = list(generation.decode(pc.lm, state, logits, cfg))
        return (len(got) - 1) / (pc.clock.now() - t)

    print("decode tokens/s, 3 runs:", [round(decode(), 2) for _ in range(3)])
    prof = profile(activities=[ProfilerActivity.CPU])
    decode(prof)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    model = pc.lm.model
    for context in (40, 4039):
        cache = adapter.new_cache(reserve=64)
        adapter.forward(model, torch.randint(100, 1000, (context,)), torch.arange(context), cache, None, last_only=True)
        pos = torch.arange(context)

        def step():
            adapter.truncate(cache, context)
            adapter.forward(model, torch.tensor([5]), torch.tensor([context]), cache, pos)

        print(f"one decode step over {context} cached tokens: {_setup.median_ms(step, 20):.1f} ms (median)")


if __name__ == "__main__":
    main()
