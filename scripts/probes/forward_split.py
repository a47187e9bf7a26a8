"""Where the bare cached forward of the speed benchmark goes: attention kernels, F.linear, the rest.

The speed benchmark's setup (one module of `--context` tokens of real text, its question), encoded
once; then per repeat, with the C kernels on and off alternating, the prompt's cache is assembled
(untimed) and `generation.prefill` of the fresh tokens timed, with the time inside the C attention
kernels, inside `F.linear` (the projections of more than 16 rows) and the rest (norms, RoPE,
residuals, Python) split out. One torch thread. The physical-limit line of the speed report is
FLOPs over the machine's matmul throughput; this says which part sits above it.

    python scripts/probes/forward_split.py [--context 4000] [--repeats 5]
"""

import argparse

import _setup


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=4000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    from attention_store import kernels
    from attention_store.kernels import ops
    from prompt_cache import generation
    from prompt_cache.timing import Clock

    pc, _, prompt = _setup.speed_prompt(args.context)  # one torch thread
    lm = pc.lm
    s, bound = pc.bind(prompt)
    clock = Clock()
    spent = {"attention": 0.0, "linear": 0.0}

    def timed(fn, part):
        def wrapper(*a, **k):
            t = clock.now()
            out = fn(*a, **k)
            spent[part] += clock.ms_since(t)
            return out
        return wrapper

    for name in ("decode_attention", "flash_attention"):
        setattr(ops, name, timed(getattr(ops, name), "attention"))
    sdpa, linear = F.scaled_dot_product_attention, F.linear
    F.scaled_dot_product_attention = timed(sdpa, "attention")  # what runs with the kernels off
    F.linear = timed(linear, "linear")
    print(f"{'kernels':8s} {'forward':>8s} {'attention':>10s} {'F.linear':>9s} {'rest':>6s}  (ms)")
    try:
        for _ in range(args.repeats):
            for on in (True, False):
                ready = pc.assemble(s, bound, room=1)
                spent.update(attention=0.0, linear=0.0)
                with kernels.disabled() if not on else torch.inference_mode():
                    t = clock.now()
                    generation.prefill(lm, ready.cache, ready.cache_positions, ready.fresh_ids, ready.fresh_positions,
                                       ready.next_position)
                    total = clock.ms_since(t)
                rest = total - spent["attention"] - spent["linear"]
                print(f"{'on' if on else 'off':8s} {total:8.0f} {spent['attention']:10.0f} {spent['linear']:9.0f} {rest:6.0f}",
                      flush=True)
    finally:
        F.scaled_dot_product_attention, F.linear = sdpa, linear


if __name__ == "__main__":
    main()
