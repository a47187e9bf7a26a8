"""Tiny random-weight models built from a config, with a byte tokenizer, for fast CPU tests.

Weights are drawn with a larger std than transformers' default (0.15 instead of 0.02) so attention
patterns are far from uniform: a test that compares masked with unmasked attention can then fail.

Example:
    >>> from prompt_cache.tiny import tiny_model
    >>> lm = tiny_model("gemma3", seed=0)        # 4 layers, sliding window 8, byte tokenizer
    >>> lm.tokenizer.encode("hi")
    [107, 108]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from attention_store import adapter
from prompt_cache.loaded import LoadedModel, weights_fingerprint
from prompt_cache.tokenizer import PLAIN_AFFIXES, ROLES

TINY_ARCHS = ("llama", "llama-gqa", "gemma3", "qwen2")
INIT_STD = 0.15  # weight std: big enough that attention is not nearly uniform
SLIDING_WINDOW = 8  # gemma3 sliding layers: small, so window effects show in short sequences


class ByteTokenizer:
    """UTF-8 bytes offset by three special ids (pad=0, bos=1, eos=2); vocab 259; plain chat format."""

    PAD, BOS, EOS = 0, 1, 2
    OFFSET = 3
    vocab_size = 256 + OFFSET
    name = "bytes"
    fingerprint = "byte-tokenizer-v1"
    has_chat_template = False
    bos_ids: tuple[int, ...] = (BOS,)
    eos_ids: tuple[int, ...] = (EOS,)

    def encode(self, text: str) -> list[int]:
        """One id per UTF-8 byte, never truncated, no special tokens."""
        return [b + self.OFFSET for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Bytes back to text; special ids render as `<pad>`/`<bos>`/`<eos>` unless skipped."""
        out, buf = [], bytearray()
        names = {self.PAD: "<pad>", self.BOS: "<bos>", self.EOS: "<eos>"}
        for i in ids:
            i = int(i)
            if i >= self.OFFSET:
                buf.append(i - self.OFFSET)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            if not skip_special_tokens:
                out.append(names.get(i, f"<{i}>"))
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def chat_affixes(self, role: str) -> tuple[str, str]:
        """The plain `System: `/`User: `/`Assistant: ` prefix and a newline suffix."""
        if role not in PLAIN_AFFIXES:
            raise ValueError(f"unknown chat role {role!r}; expected one of {', '.join(ROLES)}")
        return PLAIN_AFFIXES[role]


def tiny_config(arch: str):
    """The transformers config of tiny model `arch` (hidden 64, head_dim 16, byte vocab)."""
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=ByteTokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        head_dim=16,
        max_position_embeddings=8192,  # SmolLM2's context, so experiment-sized schemas fit the limit check
        initializer_range=INIT_STD,
        pad_token_id=ByteTokenizer.PAD,
        bos_token_id=ByteTokenizer.BOS,
        eos_token_id=ByteTokenizer.EOS,
        tie_word_embeddings=False,
    )
    if arch == "llama":  # multi-head attention: kv_heads == heads
        return LlamaConfig(num_hidden_layers=2, num_key_value_heads=4, **common)
    if arch == "llama-gqa":  # grouped-query attention: 2 query heads per kv head
        return LlamaConfig(num_hidden_layers=2, num_key_value_heads=2, **common)
    if arch == "qwen2":  # GQA with q/k/v bias
        return Qwen2Config(num_hidden_layers=2, num_key_value_heads=2, **common)
    if arch == "gemma3":  # sliding and full attention layers mixed, as in Gemma 3 (5:1 there)
        return Gemma3TextConfig(
            num_hidden_layers=4,
            num_key_value_heads=2,
            sliding_window=SLIDING_WINDOW,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            query_pre_attn_scalar=16,
            **common,
        )
    raise ValueError(f"unknown tiny arch {arch!r}; expected one of {', '.join(TINY_ARCHS)}")


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """A random-weight `arch` model (eval mode, sdpa), deterministic in `seed`, with a `ByteTokenizer`."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    adapter.use_fast_attention(model)
    # Re-draw every weight from our own generator: independent of transformers' init scheme, and
    # biases (qwen2) non-zero so they matter. Norm weights keep their defaults.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "norm" in name:
                continue
            std = INIT_STD if param.dim() >= 2 else INIT_STD / 2
            param.copy_(torch.randn(param.shape, generator=gen) * std)
    fingerprint = weights_fingerprint(model)  # on float32 weights, as for real models
    model = model.to(dtype).eval()
    return LoadedModel(name=f"tiny-{arch}-s{seed}", model=model, tokenizer=ByteTokenizer(),
                       fingerprint=fingerprint, dtype=dtype)
