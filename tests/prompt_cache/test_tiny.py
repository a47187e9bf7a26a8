"""Tiny models: deterministic, the configured shapes, attention that depends on context."""

import pytest
import torch

from attention_store import adapter
from prompt_cache.tiny import TINY_ARCHS, ByteTokenizer, tiny_config, tiny_model


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_model_is_deterministic_and_eval(arch):
    a, b = tiny_model(arch, seed=0), tiny_model(arch, seed=0)
    assert a.fingerprint == b.fingerprint
    assert tiny_model(arch, seed=1).fingerprint != a.fingerprint
    assert not a.model.training
    assert a.model.config._attn_implementation == adapter.ATTENTION
    ids = torch.tensor([[1, *a.tokenizer.encode("hello tiny world")]])
    with torch.no_grad():
        torch.testing.assert_close(a.model(ids).logits, b.model(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_kv_shapes_follow_config(arch):
    lm = tiny_model(arch)
    cfg = lm.model.config
    ids = torch.tensor([[1, *lm.tokenizer.encode("abcdef")]])
    with torch.no_grad():
        cache = lm.model(ids, use_cache=True).past_key_values
    k = cache.layers[0].keys
    # [batch, kv_heads, seq, head_dim]
    assert k.shape == (1, cfg.num_key_value_heads, ids.shape[1], cfg.head_dim)


def test_gqa_archs_have_fewer_kv_heads():
    assert tiny_config("llama").num_key_value_heads == tiny_config("llama").num_attention_heads
    for arch in ("llama-gqa", "qwen2", "gemma3"):
        cfg = tiny_config(arch)
        assert cfg.num_key_value_heads < cfg.num_attention_heads


def test_gemma3_mixes_sliding_and_full_layers():
    cfg = tiny_config("gemma3")
    assert {"sliding_attention", "full_attention"} <= set(cfg.layer_types)
    assert cfg.sliding_window <= 8


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_attention_patterns_matter(arch):
    # Changing an early token must change the last token's logits noticeably (non-uniform attention).
    lm = tiny_model(arch)
    tok = lm.tokenizer
    a = torch.tensor([[1, *tok.encode("xbcdef")]])
    b = torch.tensor([[1, *tok.encode("ybcdef")]])
    with torch.no_grad():
        diff = (lm.model(a).logits[0, -1] - lm.model(b).logits[0, -1]).abs().max().item()
    assert diff > 1e-2


def test_dtype_cast_keeps_fingerprint():
    a, b = tiny_model("llama"), tiny_model("llama", dtype=torch.bfloat16)
    assert b.model.dtype == torch.bfloat16 and b.dtype == torch.bfloat16
    assert a.fingerprint == b.fingerprint


def test_unknown_arch():
    with pytest.raises(ValueError, match="unknown tiny arch"):
        tiny_model("gpt5")


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "héllo, wörld ✓"
    ids = tok.encode(text)
    assert all(3 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode([tok.BOS, *ids, tok.EOS]) == f"<bos>{text}<eos>"
    assert tok.decode([tok.BOS, *ids, tok.EOS], skip_special_tokens=True) == text
    assert tok.bos_ids == (1,) and tok.eos_ids == (2,)
    assert tok.chat_affixes("user") == ("User: ", "\n")
    assert len(tok.encode("x" * 100_000)) == 100_000
    with pytest.raises(ValueError):
        tok.chat_affixes("tool")
