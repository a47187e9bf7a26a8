"""Kernels for one decode step of smollm2-135m at 4,000 tokens of context, one thread, per step (30 layers).

Attention of 3 query rows (a group of query heads) per key/value head over 4,039 cached tokens,
each layer's K/V a distinct buffer (as in a real step, so nothing stays in cache between layers):
a plain read of K and V (the floor), flash SDPA (what `pml_sdpa` runs), transformers' enable_gqa
form (9 query heads), matmul-softmax-matmul, the two matmuls alone, a tall-skinny formulation,
SDPA's math backend and `torch.compile` of the eager form. With `--cpp`, a hand-written
prototype (one pass over K, a softmax, one pass over V), compiled with
`torch.utils.cpp_extension.load_inline` (needs a C++ compiler and ninja; not part of the library).
Then the weight matmuls of a step: the projections one by one against QKV and gate/up fused.
Then this library's C kernels (`attention_store.kernels`, when they build): `decode_attention` and
`flash_attention` for the 3 rows of a decode step, the 24 of a packed batch of 8, 48, the 117 of a
39-token prefill and the 480 of a packed batch's prefill, beside flash SDPA, a 4,039-token causal
prefill without cache beside SDPA's is_causal, and the 211
packed-weight products of a smollm2-135m step for 1, 4 and 8 input rows beside `F.linear` on the
fp32 weights (loads the model).

    python scripts/probes/decode_kernels.py [--cpp]
"""

import sys

import _setup

T, KV, G, D, LAYERS = 4039, 3, 3, 64, 30

PROTOTYPE = r"""
#include <torch/extension.h>
#include <cmath>
#include <vector>
// q [KV, G, D] contiguous; k, v [KV, T, D] with any head and token strides (views of a buffer).
torch::Tensor decode_attn(torch::Tensor q, torch::Tensor k, torch::Tensor v, double scale) {
  const int64_t KV = q.size(0), G = q.size(1), D = q.size(2), T = k.size(1);
  auto out = torch::zeros({KV, G, D}, q.options());
  const float *Q = q.data_ptr<float>(), *K = k.data_ptr<float>(), *V = v.data_ptr<float>();
  const int64_t kh_s = k.stride(0), kt_s = k.stride(1), vh_s = v.stride(0), vt_s = v.stride(1);
  float* O = out.data_ptr<float>();
  std::vector<float> s(G * T);
  for (int64_t h = 0; h < KV; ++h) {
    const float *qh = Q + h * G * D, *kh = K + h * kh_s, *vh = V + h * vh_s;
    for (int64_t t = 0; t < T; ++t)
      for (int64_t g = 0; g < G; ++g) {
        float acc = 0.f;
        #pragma omp simd reduction(+:acc)
        for (int64_t d = 0; d < D; ++d) acc += qh[g * D + d] * kh[t * kt_s + d];
        s[g * T + t] = acc * (float)scale;
      }
    for (int64_t g = 0; g < G; ++g) {
      float m = -INFINITY, z = 0.f, *sg = s.data() + g * T;
      for (int64_t t = 0; t < T; ++t) m = std::max(m, sg[t]);
      for (int64_t t = 0; t < T; ++t) { sg[t] = std::exp(sg[t] - m); z += sg[t]; }
      for (int64_t t = 0; t < T; ++t) sg[t] /= z;
    }
    float* oh = O + h * G * D;
    for (int64_t t = 0; t < T; ++t)
      for (int64_t g = 0; g < G; ++g) {
        const float p = s[g * T + t];
        #pragma omp simd
        for (int64_t d = 0; d < D; ++d) oh[g * D + d] += p * vh[t * vt_s + d];
      }
  }
  return out;
}
"""


def main() -> None:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from prompt_cache.timing import Clock

    torch.set_num_threads(1)
    clock = Clock()
    # As the model holds them: [1, KV, capacity, D] buffers, viewed up to the filled length.
    ks = [torch.randn(1, KV, T + 64, D)[:, :, :T] for _ in range(LAYERS)]
    vs = [torch.randn(1, KV, T + 64, D)[:, :, :T] for _ in range(LAYERS)]
    q = torch.randn(1, KV, G, D)
    qt = q.transpose(-1, -2).contiguous()
    p = torch.softmax(torch.randn(1, KV, G, T), -1)

    def eager(q, k, v):
        return torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * 0.125, dim=-1), v)

    def math(k, v):
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, scale=0.125)

    compiled = torch.compile(eager, dynamic=True)
    kernels = {
        "read K and V (floor)": lambda k, v: k.sum() + v.sum(),
        "flash SDPA, 3 rows per K/V head (pml_sdpa)": lambda k, v: F.scaled_dot_product_attention(q, k, v, scale=0.125),
        "SDPA enable_gqa, 9 query heads (transformers)": lambda k, v: F.scaled_dot_product_attention(
            q.reshape(1, 9, 1, D), k, v, scale=0.125, enable_gqa=True),
        "matmul-softmax-matmul": lambda k, v: eager(q, k, v),
        "the two matmuls alone (QK^T, PV)": lambda k, v: (torch.matmul(q, k.transpose(-1, -2)), torch.matmul(p, v)),
        "tall-skinny (K q^T, P^T V)": lambda k, v: torch.matmul(
            torch.softmax(torch.matmul(k, qt) * 0.125, dim=-2).transpose(-1, -2), v),
        "SDPA math backend": math,
        "torch.compile of matmul-softmax-matmul": lambda k, v: compiled(q, k, v),
    }
    if "--cpp" in sys.argv:
        from torch.utils.cpp_extension import load_inline

        t = clock.now()
        mod = load_inline("pml_decode_attn_probe", cpp_sources=PROTOTYPE, functions=["decode_attn"],
                          extra_cflags=["-O3", "-march=native", "-fopenmp-simd", "-ffast-math"])
        print(f"(prototype compiled in {clock.ms_since(t) / 1e3:.0f} s; max |difference| to SDPA "
              f"{(mod.decode_attn(q[0], ks[0][0], vs[0][0], 0.125) - kernels['flash SDPA, 3 rows per K/V head (pml_sdpa)'](ks[0], vs[0])[0]).abs().max():.1e})")
        kernels["hand-written C++ prototype"] = lambda k, v: mod.decode_attn(q[0], k[0], v[0], 0.125)
    print(f"attention, {LAYERS} layers, {T} cached tokens, ms per decode step:")
    for name, fn in kernels.items():
        print(f"  {name:48s} {_setup.median_ms(lambda: [fn(k, v) for k, v in zip(ks, vs)], 7):6.1f}")

    x, x2 = torch.randn(1, 576), torch.randn(1, 1536)
    sep = [[torch.randn(o, i) for o, i in ((576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576),
                                           (576, 1536))] for _ in range(LAYERS)]
    fused = [[torch.cat(w[0:3]), w[3], torch.cat(w[4:6]), w[6]] for w in sep]
    head = torch.randn(49152, 576)
    run = lambda layers: [F.linear(x if w.shape[1] == 576 else x2, w) for ws in layers for w in ws]  # noqa: E731
    print("weight matmuls of one step, ms:")
    print(f"  {'projections one by one (30 layers)':48s} {_setup.median_ms(lambda: run(sep), 7):6.1f}")
    print(f"  {'QKV and gate/up fused (30 layers)':48s} {_setup.median_ms(lambda: run(fused), 7):6.1f}")
    print(f"  {'LM head (tied embedding, 49,152 x 576)':48s} {_setup.median_ms(lambda: F.linear(x, head), 7):6.1f}")
    library_kernels(ks, vs)


def library_kernels(ks, vs) -> None:
    import torch
    import torch.nn.functional as F

    from attention_store import kernels
    from attention_store.kernels import ops
    from attention_store.kernels.packed import PackedLinear
    from prompt_cache.models import load_model

    if not kernels.active():
        print(f"library kernels: {kernels.status()}")
        return
    print("attention, this library's C kernels against flash SDPA, ms per step (30 layers):")
    for rows in (G, 8 * G, 16 * G, 39 * G, 160 * G):
        q = torch.randn(1, KV, rows, D)
        c = _setup.median_ms(lambda: [ops.decode_attention(q, k, v, None, 0.125) for k, v in zip(ks, vs)], 7)
        fl = _setup.median_ms(lambda: [ops.flash_attention(q, k, v, None, 0.125) for k, v in zip(ks, vs)], 7)
        f = _setup.median_ms(lambda: [F.scaled_dot_product_attention(q, k, v, scale=0.125) for k, v in zip(ks, vs)], 7)
        used = "decode" if rows <= kernels.DECODE_ROWS else "flash"
        print(f"  {rows:3d} query rows per K/V head: C decode {c:6.1f}   C flash {fl:6.1f}   SDPA {f:6.1f}   (runs: {used})")
    # A prefill with no cache (the full-prefill baseline, module encoding): causal, one layer.
    q9, k, v = torch.randn(1, KV * G, T, D), ks[0], vs[0]
    fl = _setup.median_ms(lambda: ops.flash_attention(q9.reshape(1, KV, G * T, D), k, v, None, 0.125, causal=T), 3)
    f = _setup.median_ms(lambda: F.scaled_dot_product_attention(q9, k, v, is_causal=True, scale=0.125, enable_gqa=True), 3)
    print(f"  {T}-token prefill, no cache (causal), one layer: C flash {fl:6.1f}   SDPA is_causal {f:6.1f}")
    layers = [m for m in load_model("smollm2-135m").model.modules() if isinstance(m, PackedLinear)]
    print(f"weight products of one step ({len(layers)} layers), ms:")
    for rows in (1, 4, 8):
        xs = {m.in_features: torch.randn(rows, m.in_features) for m in layers}
        packed = _setup.median_ms(lambda: [ops.matvec(m.fmt, m.blocks, xs[m.in_features], m.out_features) for m in layers], 7)
        dense = _setup.median_ms(lambda: [F.linear(xs[m.in_features], m.weight) for m in layers], 7)
        print(f"  {rows} input row(s): packed blocks {packed:6.1f}   F.linear on fp32 {dense:6.1f}")


if __name__ == "__main__":
    main()
