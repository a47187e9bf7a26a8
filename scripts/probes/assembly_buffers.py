"""Assembly in a warm process: one buffer per layer (what `adapter.buffered_cache` does) against one
huge-page allocation for all layers (tried, and reverted), interleaved.

The speed benchmark's setup (one module of `--context` tokens, its question), encoded once; then
`PromptCache.assemble` of the prompt, alternating the two ways of allocating the K/V buffers. Per
layer, the buffers (about 3 MiB each at 4,000 tokens) come back from the heap once freed; one
allocation of them all is a fresh mapping every time, so it pays its page faults on every
assembly.

    python scripts/probes/assembly_buffers.py [--context 4000] [--repeats 8]
"""

import argparse
import math

import _setup


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=4000)
    ap.add_argument("--repeats", type=int, default=8)
    args = ap.parse_args()

    import torch

    from attention_store import adapter
    from attention_store.buffers import empty_tensor
    from prompt_cache.timing import Clock

    def one_allocation(key_parts, value_parts, reserve, dtype, devices):
        """`buffered_cache` with every layer's keys and values carved from one huge-page allocation (CPU only)."""
        shapes = [(*k[0].shape[:-2], sum(p.shape[-2] for p in k) + reserve, k[0].shape[-1]) for k in key_parts]
        slab, at = empty_tensor((2 * sum(math.prod(s) for s in shapes),), dtype), 0
        cache = adapter.new_cache(reserve=reserve)
        for k, v, shape in zip(key_parts, value_parts, shapes):
            layer, size = adapter.BufferedLayer(reserve), math.prod(shape)
            layer._k, layer._v = slab[at:at + size].view(shape), slab[at + size:at + 2 * size].view(shape)
            layer.dtype, layer.device, layer.is_initialized = dtype, torch.device("cpu"), True
            at += 2 * size
            for kp, vp in zip(k, v):
                m = kp.shape[-2]
                layer._k[:, :, layer.length:layer.length + m].copy_(kp)
                layer._v[:, :, layer.length:layer.length + m].copy_(vp)
                layer.length += m
            layer._views()
            cache.layers.append(layer)
        return cache

    pc, _, prompt = _setup.speed_prompt(args.context)  # one torch thread
    s, bound = pc.bind(prompt)
    ways = {"one buffer per layer": adapter.buffered_cache, "one allocation for all": one_allocation}
    ms = {w: [] for w in ways}
    clock = Clock()
    try:
        for r in range(args.repeats):
            for way in (ways if r % 2 == 0 else list(ways)[::-1]):
                adapter.buffered_cache = ways[way]
                t = clock.now()
                ready = pc.assemble(s, bound, room=1)
                ms[way].append(clock.ms_since(t))
                del ready
    finally:
        adapter.buffered_cache = ways["one buffer per layer"]
    for way, v in ms.items():
        print(f"{way:24s} ms: {' '.join(f'{x:.0f}' for x in v)}")


if __name__ == "__main__":
    main()
