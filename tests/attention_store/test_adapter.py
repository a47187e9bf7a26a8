"""The adapter on its own: masks from `allowed`, windows by position, caches that adopt tensors."""

import contextlib

import pytest
import torch

from attention_store import adapter
from prompt_cache.tiny import SLIDING_WINDOW, tiny_model


def test_kv_shape_and_attention_spec_come_from_the_config():
    lm = tiny_model("llama-gqa")
    assert adapter.kv_shape(lm.model.config) == (2, 2, 16)  # layers, kv heads, head dim
    assert adapter.attention_spec(lm.model.config) == adapter.AttentionSpec(window=None, layer_types=None)
    spec = adapter.attention_spec(tiny_model("gemma3").model.config)
    assert spec.window == SLIDING_WINDOW and "sliding_attention" in spec.layer_types


def test_build_mask_is_additive_and_none_when_causal_is_right():
    spec = adapter.AttentionSpec(window=None, layer_types=None)
    pos = torch.arange(4)
    assert adapter.build_mask(spec, None, pos, pos, torch.float32) is None
    allowed = torch.tensor([[True, False], [True, True]])
    mask = adapter.build_mask(spec, allowed, torch.arange(2), torch.arange(2), torch.float32)
    assert mask.shape == (1, 1, 2, 2)
    assert mask[0, 0, 1].eq(0).all() and mask[0, 0, 0, 1] == torch.finfo(torch.float32).min


def test_sliding_window_is_applied_by_position_not_by_index():
    # Keys at positions 0 and 20 (a gap) and a query at 21: the window of 8 hides position 0 on
    # sliding layers even though it is only two cache slots back.
    spec = adapter.AttentionSpec(window=8, layer_types=("sliding_attention", "full_attention"))
    q_pos, k_pos = torch.tensor([21]), torch.tensor([0, 20, 21])
    masks = adapter.build_mask(spec, torch.ones(1, 3, dtype=torch.bool), q_pos, k_pos, torch.float32)
    assert set(masks) == {"full_attention", "sliding_attention"}
    assert masks["full_attention"].eq(0).all()
    assert masks["sliding_attention"][0, 0, 0].tolist() == [torch.finfo(torch.float32).min, 0.0, 0.0]


def test_new_cache_adopts_tensors_without_copying():
    k = [torch.randn(1, 2, 3, 4) for _ in range(2)]
    v = [torch.randn(1, 2, 3, 4) for _ in range(2)]
    cache = adapter.new_cache(k, v)
    keys, values = adapter.cache_kv(cache)
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(keys + values, k + v))
    assert cache.get_seq_length() == 3


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_forward_equals_the_models_own_forward(arch):
    lm = tiny_model(arch)
    ids = torch.arange(3, 30)
    got = adapter.forward(lm.model, ids, torch.arange(len(ids)), adapter.new_cache(), None)
    with torch.inference_mode():
        want = lm.model(input_ids=ids[None]).logits[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    last = adapter.forward(lm.model, ids, torch.arange(len(ids)), adapter.new_cache(), None, last_only=True)
    torch.testing.assert_close(last, want[-1:], atol=1e-5, rtol=0)


def test_forward_refuses_positions_that_do_not_match_the_cache():
    lm = tiny_model("llama")
    cache = adapter.new_cache()
    adapter.forward(lm.model, torch.arange(3, 8), torch.arange(5), cache, None)
    with pytest.raises(AssertionError, match="cache holds 5 tokens but 4 cache positions"):
        adapter.forward(lm.model, torch.tensor([9]), torch.tensor([5]), cache, torch.arange(4))


def test_forward_until_fills_only_the_asked_layers_and_refuses_others():
    lm = tiny_model("gemma3")  # 4 layers
    cache = adapter.forward_until(lm.model, torch.arange(3, 12), torch.arange(9), last_layer=1)
    full = adapter.new_cache()
    adapter.forward(lm.model, torch.arange(3, 12), torch.arange(9), full, None)
    keys, _ = adapter.cache_kv(cache)
    # expected: layers 0 and 1 equal the full forward's; layers 2 and 3 were never computed
    for i in (0, 1):
        torch.testing.assert_close(keys[i], adapter.cache_kv(full)[0][i], atol=1e-6, rtol=0)
    assert len(keys) == 2
    with pytest.raises(ValueError, match="layer 4 out of range: the model has 4 decoder layers"):
        adapter.forward_until(lm.model, torch.arange(3, 12), torch.arange(9), last_layer=4)


def _gapped(lm, reserve):
    """A cache with a gap in its positions (0-4, 20-24), built plain and handed over as `reserve` says."""
    plain = adapter.new_cache()
    pos = torch.cat([torch.arange(5), torch.arange(20, 25)])
    adapter.forward(lm.model, torch.arange(3, 13), pos, plain, None)
    keys, values = adapter.cache_kv(plain)
    return adapter.new_cache(list(keys), list(values), reserve=reserve), pos, keys, values


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_buffered_cache_gives_the_plain_caches_logits_and_grows_past_its_room(arch):
    lm = tiny_model(arch)
    plain, pos, keys, values = _gapped(lm, None)
    buffered, _, _, _ = _gapped(lm, 3)
    assert isinstance(buffered.layers[0], adapter.BufferedLayer) and adapter.room(buffered) == 3
    ids, nxt = [40, 41], 28
    for step in range(6):  # 2 + 1 + 1 + ... tokens: past the 3 reserved slots, so the buffer grows once
        q = torch.tensor(ids if step == 0 else [ids[-1]])
        p = torch.arange(nxt, nxt + q.numel())
        cache_pos = pos if step == 0 else torch.cat([pos, torch.arange(28, nxt)])
        a = adapter.forward(lm.model, q, p, plain, cache_pos)
        b = adapter.forward(lm.model, q, p, buffered, cache_pos)
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
        ids.append(int(a[-1].argmax()))
        nxt += q.numel()
    assert buffered.get_seq_length() == plain.get_seq_length() == 10 + 2 + 5
    assert adapter.room(buffered) >= 0
    for k, kb in zip(adapter.cache_kv(plain)[0], adapter.cache_kv(buffered)[0]):
        torch.testing.assert_close(kb, k)


def test_buffered_decode_writes_in_place_and_never_touches_the_given_states():
    lm = tiny_model("llama")
    cache, pos, keys, values = _gapped(lm, 8)
    before = [k.clone() for k in keys]
    layer = cache.layers[0]
    ptr = layer.keys.data_ptr()
    for i in range(5):
        adapter.forward(lm.model, torch.tensor([7 + i]), torch.tensor([30 + i]), cache,
                        torch.cat([pos, torch.arange(30, 30 + i)]))
        assert layer.keys.data_ptr() == ptr  # a view of the same buffer: no copy of the cache per step
    assert layer.length == 15 and layer.capacity == 18
    for k, b in zip(keys, before):
        assert torch.equal(k, b)
    adapter.truncate(cache, 11)
    assert cache.get_seq_length() == 11 and layer.keys.data_ptr() == ptr


@pytest.mark.parametrize("arch", ["llama-gqa", "gemma3", "qwen2"])
def test_grouped_attention_without_repeat_equals_transformers_sdpa(arch):
    # Our attention (grouped key/value heads kept grouped under a mask) against transformers' own
    # sdpa on the same weights, over a cache with gaps and a mask that hides part of it.
    lm = tiny_model(arch)
    assert lm.model.config._attn_implementation == adapter.ATTENTION
    pos = torch.cat([torch.arange(6), torch.arange(20, 26)])
    allowed = torch.ones(4, 16, dtype=torch.bool)
    allowed[:, 2:5] = False
    allowed[:, 12:] = torch.ones(4, 4, dtype=torch.bool).tril()
    out = {}
    for impl in (adapter.ATTENTION, "sdpa"):
        lm.model.set_attn_implementation(impl)
        cache = adapter.new_cache()
        adapter.forward(lm.model, torch.arange(3, 15), pos, cache, None)
        out[impl] = adapter.forward(lm.model, torch.tensor([4, 5, 6, 7]), torch.arange(30, 34), cache, pos,
                                    allowed=allowed)
    lm.model.set_attn_implementation(adapter.ATTENTION)
    torch.testing.assert_close(out[adapter.ATTENTION], out["sdpa"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama-gqa", "gemma3"])
@pytest.mark.parametrize("kernels_on", [True, False])
def test_many_grouped_rows_equal_transformers_sdpa(arch, kernels_on, monkeypatch):
    # 20 fresh tokens x 2 query heads per key/value head = 40 rows per head: past the decode kernel,
    # so (head dim 32) the C flash kernel runs when the kernels are in use, reading one query
    # head's mask rows for both heads of its group. Logits as transformers' sdpa.
    from transformers import AutoModelForCausalLM

    from attention_store import kernels
    from attention_store.kernels import ops
    from prompt_cache.tiny import tiny_config

    calls = []
    flash = ops.flash_attention
    monkeypatch.setattr(ops, "flash_attention", lambda *a, **k: calls.append(a[0].shape) or flash(*a, **k))
    config = tiny_config(arch)
    config.head_dim = 32
    if arch == "gemma3":
        config.query_pre_attn_scalar = 32
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()
    pos = torch.cat([torch.arange(6), torch.arange(20, 26)])
    allowed = torch.ones(20, 32, dtype=torch.bool)
    allowed[:, 2:5] = False
    allowed[:, 12:] = torch.ones(20, 20, dtype=torch.bool).tril()
    out, ran = {}, 0
    for impl in (adapter.ATTENTION, "sdpa"):
        if impl == adapter.ATTENTION:
            adapter.use_fast_attention(model)
        else:
            model.set_attn_implementation(impl)
        cache = adapter.new_cache()
        adapter.forward(model, torch.arange(3, 15), pos, cache, None)
        calls.clear()
        with kernels.disabled() if not kernels_on else contextlib.nullcontext():
            out[impl] = adapter.forward(model, torch.arange(40, 60), torch.arange(30, 50), cache, pos,
                                        allowed=allowed)
        ran = ran if impl == "sdpa" else len(calls)  # flash calls of our attention's 20-token forward
    torch.testing.assert_close(out[adapter.ATTENTION], out["sdpa"], atol=1e-5, rtol=1e-5)
    assert ran == (config.num_hidden_layers if kernels_on and kernels.active() else 0)


@pytest.mark.parametrize("arch", ["llama-gqa", "qwen2"])
def test_a_prefill_without_cache_runs_the_flash_kernel_causally(arch, monkeypatch):
    # No cache, no mask: transformers would run SDPA's is_causal; with the kernels in use the flash
    # kernel runs it (the full-prefill baseline gets what the cached path gets). Logits as sdpa's.
    from transformers import AutoModelForCausalLM

    from attention_store import kernels
    from attention_store.kernels import ops
    from prompt_cache.tiny import tiny_config

    calls = []
    flash = ops.flash_attention
    monkeypatch.setattr(ops, "flash_attention", lambda *a, **k: calls.append(k) or flash(*a, **k))
    config = tiny_config(arch)
    config.head_dim = 32
    torch.manual_seed(2)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()
    ids = torch.randint(3, 200, (40,))
    want = adapter.forward(model, ids, torch.arange(40), adapter.new_cache(), None)
    adapter.use_fast_attention(model)
    got = adapter.forward(model, ids, torch.arange(40), adapter.new_cache(), None)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert calls == ([{"causal": 40}] * config.num_hidden_layers if kernels.active() else [])


@pytest.mark.parametrize("arch", ["llama-gqa", "gemma3"])
@pytest.mark.parametrize("hidden", [False, True])
def test_one_token_decode_with_grouped_rows_equals_transformers_sdpa(arch, hidden):
    # A decode step (one query token) over a cache with gaps, with and without a mask: query heads
    # of a group become rows of their key/value head; logits as transformers' sdpa.
    lm = tiny_model(arch)
    pos = torch.cat([torch.arange(6), torch.arange(20, 26)])
    allowed = None
    if hidden:
        allowed = torch.ones(1, 13, dtype=torch.bool)
        allowed[:, 2:5] = False
    out = {}
    for impl in (adapter.ATTENTION, "sdpa"):
        lm.model.set_attn_implementation(impl)
        cache = adapter.new_cache()
        adapter.forward(lm.model, torch.arange(3, 15), pos, cache, None)
        out[impl] = adapter.forward(lm.model, torch.tensor([4]), torch.tensor([30]), cache, pos, allowed=allowed)
    lm.model.set_attn_implementation(adapter.ATTENTION)
    torch.testing.assert_close(out[adapter.ATTENTION], out["sdpa"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama-gqa", "gemma3", "qwen2"])
def test_warm_up_runs_on_every_architecture_and_changes_nothing(arch):
    lm = tiny_model(arch)
    ids, pos = torch.arange(3, 9), torch.arange(6)
    before = adapter.forward(lm.model, ids, pos, adapter.new_cache(), None)
    adapter.warm_up(lm.model)
    torch.testing.assert_close(adapter.forward(lm.model, ids, pos, adapter.new_cache(), None), before, atol=0, rtol=0)


def test_a_bool_mask_is_made_additive_once_and_dropped_with_it():
    # Every layer of a forward gets transformers' same bool mask: converted once, and the additive
    # form does not outlive the mask.
    import gc

    mask = torch.rand(1, 1, 5, 9) > 0.3
    first = adapter._additive_once(mask, torch.float32)
    assert adapter._additive_once(mask, torch.float32) is first
    torch.testing.assert_close(first, adapter._fill(mask, torch.float32), atol=0, rtol=0)
    assert bool((first[~mask] == torch.finfo(torch.float32).min).all()) and bool((first[mask] == 0).all())
    other = mask.clone()
    assert adapter._additive_once(other, torch.float32) is not first  # another mask: its own
    del mask, first
    gc.collect()
    assert adapter._last_mask.pair[0]() is other  # the newer mask keeps the slot
    del other
    gc.collect()
    assert getattr(adapter._last_mask, "pair", None) is None
