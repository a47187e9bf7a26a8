"""The C decode kernels against torch: block layouts, matvecs, decode attention, packed layers, modes."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attention_store import kernels
from attention_store.kernels import ops, packed

# Where a C compiler exists (as on CI) the kernels must build: a broken source fails here, not skips.
pytestmark = pytest.mark.skipif(kernels.library() is None and kernels._compiler() is None,
                                reason=f"C kernels not available: {kernels.status()}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def gguf_blocks(fmt: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random blocks in the GGUF file's layout, `[rows, cols / 32 * bytes]` uint8."""
    rng = np.random.default_rng(seed)
    nb = cols // 32
    if fmt == "q4_1":
        scales = rng.normal(0, 0.02, (rows, nb, 2)).astype(np.float16).view(np.uint8).reshape(rows, nb, 4)
        quants = rng.integers(0, 256, (rows, nb, 16), dtype=np.uint8)
    else:
        scales = rng.normal(0, 0.02, (rows, nb, 1)).astype(np.float16).view(np.uint8).reshape(rows, nb, 2)
        quants = rng.integers(-128, 128, (rows, nb, 32), dtype=np.int8).view(np.uint8)
    return np.concatenate([scales, quants], axis=-1).reshape(rows, -1)


def test_the_kernels_build_where_a_compiler_exists():
    assert kernels.library() is not None, kernels.status()


@pytest.mark.parametrize("fmt", ["q4_1", "q8_0"])
def test_blocks_expand_exactly_as_gguf_py_dequantizes(fmt):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    raw = gguf_blocks(fmt, 24, 96)
    want = dequantize(raw, GGMLQuantizationType[fmt.upper()]).astype(np.float32)
    got = ops.dequantize(fmt, packed.repack(fmt, raw))
    assert torch.equal(got, torch.from_numpy(want))  # bitwise: the same fp32 weights the converted model holds


@pytest.mark.parametrize("fmt", ["q4_1", "q8_0"])
@pytest.mark.parametrize("n", [2, 4, 7, 8, 13])  # tiles of 4 and 8 rows, full and partial, and several tiles
def test_matvec_equals_linear_and_each_row_is_the_same_alone_or_batched(fmt, n):
    blocks = packed.repack(fmt, gguf_blocks(fmt, 40, 128, seed=1))
    weight, bias = ops.dequantize(fmt, blocks), torch.randn(40)
    x = torch.randn(n, 128)
    y = ops.matvec(fmt, blocks, x, 40, bias)
    torch.testing.assert_close(y, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
    for r in range(n):  # summation order does not depend on the batch: bitwise equal
        assert torch.equal(ops.matvec(fmt, blocks, x[r:r + 1], 40, bias), y[r:r + 1])
    assert ops.matvec(fmt, blocks, x.reshape(n, 1, 128), 40).shape == (n, 1, 40)


@pytest.mark.parametrize("fmt", ["q4_1", "q8_0"])
@pytest.mark.parametrize("n", [3, 8, 11])
def test_matvec_over_long_rows_in_chunks_is_the_same_alone_or_batched(fmt, n):
    """Input rows too long to stay in L1 together (8 x 1,600 floats, a down projection's shape) are
    summed in chunks of blocks, several weight rows at a time, the sums carried between chunks: the
    same sums as one pass, so each row is still bitwise what it gives alone; output rows past a
    group of weight rows (45 = 5 groups and a part)."""
    blocks = packed.repack(fmt, gguf_blocks(fmt, 45, 1600, seed=4))
    x = torch.randn(n, 1600)
    y = ops.matvec(fmt, blocks, x, 45)
    torch.testing.assert_close(y, F.linear(x, ops.dequantize(fmt, blocks)), rtol=1e-4, atol=1e-4)
    for r in range(n):
        assert torch.equal(ops.matvec(fmt, blocks, x[r:r + 1], 45), y[r:r + 1])


def test_matvec_is_the_same_for_any_thread_count():
    blocks = packed.repack("q4_1", gguf_blocks("q4_1", 64, 64, seed=2))
    x = torch.randn(3, 64)
    one, two = _on_one_thread_and_on(2, lambda: ops.matvec("q4_1", blocks, x, 64))
    assert torch.equal(one, two)


@pytest.mark.parametrize("d,t", [(64, 45), (16, 8), (20, 13),  # AVX2 paths, and the plain-C rest (D % 8 != 0)
                                 (64, 203), (20, 130)])  # a decode step's keys in several PV blocks and a tail
@pytest.mark.parametrize("mask_kind", [None, "shared", "per_head"])
@pytest.mark.parametrize("g", [3, 17])  # row tiles; rows in lanes (a padded last lane vector)
def test_decode_attention_equals_sdpa(d, t, mask_kind, g):
    b, kv = 2, 2
    # Keys and values as the cache holds them: views of buffers with room beyond the filled length.
    key = torch.randn(b, kv, t + 7, d)[:, :, :t]
    value = torch.randn(b, kv, t + 7, d)[:, :, :t]
    rows = torch.randn(b, kv, g, d)
    mask = None
    if mask_kind is not None:
        shape = (1, 1, g, t) if mask_kind == "shared" else (b, kv, g, t)
        hidden = torch.rand(shape) < 0.3
        hidden[..., 0] = False  # every row sees at least one key
        mask = torch.zeros(shape).masked_fill_(hidden, torch.finfo(torch.float32).min)
    got = ops.decode_attention(rows, key, value, mask, 0.3)
    want = F.scaled_dot_product_attention(rows, key, value, attn_mask=mask, scale=0.3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _on_one_thread_and_on(threads: int, fn):
    """(fn() on one torch thread, fn() on `threads`), the thread count restored afterwards."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fn()
        torch.set_num_threads(threads)
        return one, fn()
    finally:
        torch.set_num_threads(before)


def _additive(hidden: torch.Tensor) -> torch.Tensor:
    return torch.zeros(hidden.shape).masked_fill_(hidden, torch.finfo(torch.float32).min)


@pytest.mark.parametrize("kernel", ["decode_attention", "flash_attention"])
@pytest.mark.parametrize("g,t,d", [(117, 300, 64), (250, 129, 32), (18, 17, 128), (3, 1, 64)])
@pytest.mark.parametrize("mask_kind", [None, "period", "per_head", "leading_blocks_hidden"])
def test_attention_kernels_equal_sdpa(kernel, g, t, d, mask_kind):
    """Row counts past a task (120 rows) and a micro-tile, key counts past a block (128) and a
    panel (16); a mask read with a period (one query head's rows for every head of a group: row r
    uses mask row r % period); rows whose first key blocks are all hidden (the online softmax
    starts from nothing there)."""
    b, kv = 1, 2
    key = torch.randn(b, kv, t + 5, d)[:, :, :t]  # views of buffers with room, as the cache holds them
    value = torch.randn(b, kv, t + 5, d)[:, :, :t]
    rows = torch.randn(b, kv, g, d)
    mask = full = None
    if mask_kind == "period":
        period = next(p for p in (39, 9, 6, 3, 1) if g % p == 0)
        hidden = torch.rand(1, 1, period, t) < 0.3
        hidden[..., -1] = False
        mask = _additive(hidden)
        full = mask.repeat(1, 1, g // period, 1)
    elif mask_kind == "per_head":
        hidden = torch.rand(b, kv, g, t) < 0.5
        hidden[..., 0] = False
        mask = full = _additive(hidden)
    elif mask_kind == "leading_blocks_hidden":
        hidden = torch.zeros(1, 1, g, t, dtype=torch.bool)
        hidden[..., : t - 1] = torch.arange(g)[:, None] % 2 == 0  # even rows see only the last key
        mask = full = _additive(hidden)
    got = getattr(ops, kernel)(rows, key, value, mask, d ** -0.5)
    want = F.scaled_dot_product_attention(rows, key, value, attn_mask=full, scale=d ** -0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("q,t,groups", [(300, 300, 3), (7, 7, 5), (39, 300, 3), (130, 131, 2)])
def test_causal_flash_attention_equals_a_causal_mask(q, t, groups):
    """`causal=q`: each of the q new tokens (the last q keys) sees the keys up to its own, in every
    head of the group; as SDPA with that mask written out, and as `is_causal` when t == q."""
    d = 64
    rows, key, value = torch.randn(1, 2, groups * q, d), torch.randn(1, 2, t, d), torch.randn(1, 2, t, d)
    allowed = torch.ones(q, t, dtype=torch.bool)
    allowed[:, t - q:] = torch.ones(q, q, dtype=torch.bool).tril()
    full = _additive(~allowed)[None, None].repeat(1, 1, groups, 1)
    got = ops.flash_attention(rows, key, value, None, d ** -0.5, causal=q)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(rows, key, value, attn_mask=full, scale=d ** -0.5),
                               rtol=1e-5, atol=1e-5)
    if t == q:
        heads = rows.reshape(1, 2 * groups, q, d)  # row g*q + i of head kv is query head kv*groups + g
        want = F.scaled_dot_product_attention(heads, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1),
                                              is_causal=True, scale=d ** -0.5)
        torch.testing.assert_close(got, want.reshape(rows.shape), rtol=1e-5, atol=1e-5)


def test_flash_attention_is_the_same_for_any_thread_count():
    rows, key, value = torch.randn(1, 3, 130, 64), torch.randn(1, 3, 400, 64), torch.randn(1, 3, 400, 64)
    one, two = _on_one_thread_and_on(2, lambda: ops.flash_attention(rows, key, value, None, 0.125))
    assert torch.equal(one, two)  # a task's rows are computed in the same order on any thread


@pytest.mark.parametrize("kv,g,threads", [(3, 12, 2), (3, 15, 2), (2, 13, 3), (3, 3, 2),  # row tiles
                                          (3, 24, 2), (3, 25, 2), (1, 30, 2)])  # rows in lanes
def test_decode_attention_rows_split_among_threads_are_the_same(kv, g, threads):
    """Work shared among threads where whole heads would load them unevenly (3 heads on 2
    threads; more threads than heads; a mask read with a period): below 16 rows a head (a
    speculative check's 12-15) each head's rows go in chunks, row counts that do not divide evenly
    included, and a plain step's 3 rows are never split; from 16 (a packed batch's 24) the rows go
    in vector lanes. Every row is bitwise what one thread computes, and equals SDPA."""
    t, d = 203, 64
    key, value = torch.randn(1, kv, t + 5, d)[:, :, :t], torch.randn(1, kv, t + 5, d)[:, :, :t]
    rows = torch.randn(1, kv, g, d)
    period = next(p for p in (8, 5, 3, 1) if g % p == 0)
    hidden = torch.rand(1, 1, period, t) < 0.2
    hidden[..., 0] = False
    mask = _additive(hidden)
    one, many = _on_one_thread_and_on(threads, lambda: ops.decode_attention(rows, key, value, mask, 0.125))
    assert torch.equal(one, many)
    want = F.scaled_dot_product_attention(rows, key, value, attn_mask=mask.repeat(1, 1, g // period, 1), scale=0.125)
    torch.testing.assert_close(many, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kv,t", [(3, 4500), (1, 1100)])  # 2 chunks of 2,048-odd keys; 4 tasks' worth of 275
def test_decode_attention_lanes_over_key_chunks(threads, kv, t):
    """From 16 rows per head (a packed batch's step) decode attention puts rows in vector lanes and
    splits each head's keys into chunks merged afterwards: one per 2,048 keys, and at least 4 tasks
    where chunks keep 256 keys (one K/V head at 1,100 keys: 4 chunks). Rows that see only the last
    key (every key of the first chunks at -inf) and rows with a padded last lane vector (26 rows)
    included: equal to SDPA, and bitwise the same on one thread and on two."""
    d, g = 64, 26
    key, value = torch.randn(1, kv, t + 3, d)[:, :, :t], torch.randn(1, kv, t + 3, d)[:, :, :t]
    rows = torch.randn(1, kv, g, d)
    mask = torch.zeros(1, 1, g, t)
    mask[:, :, ::5, :-1] = -torch.inf
    one, got = _on_one_thread_and_on(threads, lambda: ops.decode_attention(rows, key, value, mask, 0.125))
    assert torch.equal(one, got)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(rows, key, value, attn_mask=mask, scale=0.125),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", ["decode_attention", "flash_attention"])
def test_lanes_give_a_row_the_same_bits_in_any_lane_and_after_masked_keys(kernel):
    """On the lanes path each score is one fma chain per lane, and a masked key adds exactly 0: a
    row computed among other rows (another lane, another tile) or with masked keys appended (its
    last keys then fall in a full tile instead of the plain-C rest) gives bitwise the same output."""
    g, t, d = 32 if kernel == "decode_attention" else 130, 203, 64
    key, value = torch.randn(1, 2, t + 8, d), torch.randn(1, 2, t + 8, d)
    rows = torch.randn(1, 2, g, d)
    hidden = torch.rand(1, 1, g, t + 8) < 0.3
    hidden[..., 0] = False
    hidden[..., t:] = True  # the appended keys: hidden from every row
    mask = _additive(hidden)
    fn = getattr(ops, kernel)
    full = fn(rows, key[:, :, :t], value[:, :, :t], mask[..., :t].contiguous(), 0.125)
    shifted = fn(rows[:, :, 3:], key[:, :, :t], value[:, :, :t], mask[:, :, 3:, :t].contiguous(), 0.125)
    assert torch.equal(shifted, full[:, :, 3:])
    appended = fn(rows, key, value, mask, 0.125)
    assert torch.equal(appended, full)


def _packed_copy(linear: torch.nn.Linear, fmt: str, seed: int) -> torch.Tensor:
    """Give `linear` the weights of random blocks; returns the blocks."""
    blocks = packed.repack(fmt, gguf_blocks(fmt, linear.out_features, linear.in_features, seed))
    with torch.no_grad():
        linear.weight.copy_(ops.dequantize(fmt, blocks))
    return blocks


def test_packed_layers_decode_like_the_plain_model_and_prefill_unchanged(tiny):
    lm = tiny("llama-gqa")
    model = lm.model
    linears = {n: m for n, m in model.named_modules() if type(m) is torch.nn.Linear and m.in_features % 32 == 0}
    assert linears, "the tiny model should have linear layers with 32-multiple inputs"
    blocks = {n: ("q4_1" if i % 2 else "q8_0", _packed_copy(m, "q4_1" if i % 2 else "q8_0", i))
              for i, (n, m) in enumerate(linears.items())}
    keys = set(model.state_dict())
    ids = torch.tensor([[3, 17, 42, 8, 99]])
    with torch.no_grad():
        plain_prefill = model(ids).logits
        plain_step = model(ids[:, :1]).logits
    assert sorted(packed.install(model, blocks)) == sorted(linears)
    assert all(isinstance(m, packed.PackedLinear) for n, m in model.named_modules() if n in linears)
    assert set(model.state_dict()) == keys  # same names: the blocks are not part of the state dict
    with torch.no_grad():
        # 5 rows: still the packed path (<= MAX_ROWS); the same values up to summation order.
        torch.testing.assert_close(model(ids).logits, plain_prefill, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model(ids[:, :1]).logits, plain_step, rtol=1e-4, atol=1e-4)
        long_ids = torch.randint(0, 100, (1, packed.MAX_ROWS + 1))
        with kernels.disabled():
            want = model(long_ids).logits
        assert torch.equal(model(long_ids).logits, want)  # more rows than MAX_ROWS: F.linear, bitwise as before


def test_install_refuses_blocks_that_do_not_expand_to_the_weight(tiny, caplog):
    model = tiny("llama").model
    name, linear = next((n, m) for n, m in model.named_modules() if type(m) is torch.nn.Linear and m.in_features % 32 == 0)
    blocks = _packed_copy(linear, "q4_1", 5)
    with torch.no_grad():
        linear.weight[0, 0] += 1e-3  # one weight off: the blocks no longer are this layer
    with caplog.at_level(logging.WARNING):
        assert packed.install(model, {name: ("q4_1", blocks)}) == []
    assert type(dict(model.named_modules())[name]) is torch.nn.Linear
    assert "do not expand to its weight" in caplog.text


def test_disabled_turns_the_kernels_off_in_this_thread_only():
    assert kernels.active() and kernels.status() == "c"
    with kernels.disabled():
        assert not kernels.active() and kernels.status() == "torch (disabled)"
    assert kernels.active()


@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    """The loader as in a new process, with an empty cache folder."""
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_why_not", None)
    monkeypatch.setenv("PML_CACHE_HOME", str(tmp_path))
    return kernels


def test_without_a_compiler_auto_falls_back_with_a_warning_and_on_is_an_error(fresh_loader, monkeypatch, caplog):
    monkeypatch.setenv("CC", "/bin/false")
    monkeypatch.setattr(fresh_loader.shutil, "which", lambda name: "/bin/false")
    monkeypatch.setenv("PML_KERNELS", "auto")
    with caplog.at_level(logging.WARNING):
        assert fresh_loader.library() is None
    assert "could not build the C kernels" in caplog.text and not fresh_loader.active()
    assert fresh_loader.status().startswith("torch (could not build")
    monkeypatch.setattr(kernels, "_why_not", None)
    monkeypatch.setenv("PML_KERNELS", "on")
    with pytest.raises(kernels.KernelError, match="PML_KERNELS=on"):
        fresh_loader.library()


def test_kernels_off_and_bad_values(fresh_loader, monkeypatch):
    monkeypatch.setenv("PML_KERNELS", "off")
    assert fresh_loader.library() is None and fresh_loader.status() == "torch (PML_KERNELS=off)"
    monkeypatch.setenv("PML_KERNELS", "fast")
    with pytest.raises(kernels.KernelError, match="PML_KERNELS must be one of auto, on, off"):
        fresh_loader.mode()


def _cpu_has(*features: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return all(feature in flags for feature in features)


@pytest.mark.skipif(kernels.library() is None or kernels.platform.machine() not in ("x86_64", "AMD64"),
                    reason="needs the native kernels on x86")
def test_native_build_reports_this_cpus_simd():
    """The level the load log names (AVX2, AVX2 + AVX-512) is what -march=native found on this CPU."""
    want = 2 if _cpu_has("avx2", "fma", "avx512f", "avx512vl") else 1 if _cpu_has("avx2", "fma") else 0
    assert kernels.library().pml_kernels_simd() == want


@pytest.mark.parametrize("build", [
    pytest.param([], id="plain-c"),  # without -march: x86-64's baseline has no AVX2, the path CPUs without it take
    pytest.param(["-mavx2", "-mfma", "-mno-avx512f"], id="avx2-without-avx512",  # its own tile sizes
                 marks=pytest.mark.skipif(not _cpu_has("avx2", "fma"), reason="this CPU has no AVX2/FMA")),
])
def test_builds_for_other_cpus_equal_torch(build, tmp_path, monkeypatch):
    """The source built for CPUs other than this one's -march=native: the plain-C path, and AVX2
    without AVX-512 (6-row QK and 2-row PV flash tiles, 8-lane multi-row matvecs); the same checks
    as the native build's tests, on shapes that reach every tile's tails."""
    import ctypes
    import subprocess

    out = tmp_path / "other.so"
    flags = [f for f in kernels.FLAGS if not f.startswith("-march")] + build
    subprocess.run([kernels._compiler(), *flags, str(kernels.SOURCE), "-o", str(out), "-lm"], check=True)
    lib = ctypes.CDLL(str(out))
    kernels._declare(lib)
    monkeypatch.setattr(kernels, "_lib", lib)
    x86 = kernels.platform.machine() in ("x86_64", "AMD64")
    assert lib.pml_kernels_simd() == (1 if build else 0) or not x86
    for fmt in ("q4_1", "q8_0"):
        blocks = packed.repack(fmt, gguf_blocks(fmt, 12, 64, seed=3))
        x = torch.randn(11, 64)
        y = ops.matvec(fmt, blocks, x, 12)
        torch.testing.assert_close(y, F.linear(x, ops.dequantize(fmt, blocks)), rtol=1e-5, atol=1e-5)
        for r in range(11):  # bitwise the same alone or batched, in this build too
            assert torch.equal(ops.matvec(fmt, blocks, x[r:r + 1], 12), y[r:r + 1])
    key, value, rows = torch.randn(1, 2, 21, 16), torch.randn(1, 2, 21, 16), torch.randn(1, 2, 5, 16)
    mask = torch.zeros(1, 1, 5, 21)
    mask[..., 3] = torch.finfo(torch.float32).min
    torch.testing.assert_close(ops.decode_attention(rows, key, value, mask, 0.25),
                               F.scaled_dot_product_attention(rows, key, value, attn_mask=mask, scale=0.25),
                               rtol=1e-5, atol=1e-5)
    key, value, rows = torch.randn(1, 2, 150, 16), torch.randn(1, 2, 150, 16), torch.randn(1, 2, 3, 16)
    torch.testing.assert_close(ops.decode_attention(rows, key, value, None, 0.25),  # a step's rows, keys in blocks
                               F.scaled_dot_product_attention(rows, key, value, scale=0.25), rtol=1e-5, atol=1e-5)
    key, value, rows = torch.randn(1, 3, 21, 16), torch.randn(1, 3, 21, 16), torch.randn(1, 3, 26, 16)
    # 26 rows a head: rows in lanes, this build's one-vector tiles; 3 heads on 2 threads
    one, split = _on_one_thread_and_on(2, lambda: ops.decode_attention(rows, key, value, None, 0.25))
    assert torch.equal(one, split)
    torch.testing.assert_close(split, F.scaled_dot_product_attention(rows, key, value, scale=0.25), rtol=1e-5, atol=1e-5)
    key, value, rows = torch.randn(1, 2, 150, 32), torch.randn(1, 2, 150, 32), torch.randn(1, 2, 130, 32)
    mask = torch.zeros(1, 1, 130, 150)
    mask[:, :, :7, :140] = torch.finfo(torch.float32).min
    torch.testing.assert_close(ops.flash_attention(rows, key, value, mask, 0.25),
                               F.scaled_dot_product_attention(rows, key, value, attn_mask=mask, scale=0.25),
                               rtol=1e-5, atol=1e-5)
    causal = torch.zeros(130, 150).masked_fill_(~torch.ones(130, 150, dtype=torch.bool).tril(20), torch.finfo(torch.float32).min)
    torch.testing.assert_close(ops.flash_attention(rows, key, value, None, 0.25, causal=130),
                               F.scaled_dot_product_attention(rows, key, value, attn_mask=causal, scale=0.25),
                               rtol=1e-5, atol=1e-5)


def test_the_library_is_built_once_into_the_cache_folder(fresh_loader, tmp_path):
    assert fresh_loader.library() is not None
    built = list((tmp_path / "kernels").glob("pml_kernels-*.so"))
    assert len(built) == 1 and not list((tmp_path / "kernels").glob(".*tmp"))
