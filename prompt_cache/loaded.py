"""The loaded-model record every phase takes, and the fingerprint that names a model's weights."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import torch

# Config keys that do not change what the weights compute; left out of the fingerprint so that a
# re-conversion under another transformers version, or a dtype cast, keeps the same identity.
_CONFIG_KEYS_IGNORED = {"transformers_version", "_name_or_path", "_model_name_or_path", "dtype",
                        "torch_dtype", "quantization_config", "_commit_hash", "architectures",
                        "use_cache", "_attn_implementation_autoset", "_attn_implementation"}


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A causal LM ready for the attention store: eval mode, sdpa attention."""

    name: str  # registry name, local dir or hub id the user gave
    model: Any  # transformers PreTrainedModel (CausalLM)
    tokenizer: Any  # HFTokenizer or tiny.ByteTokenizer (the pml.layout.Tokenizer protocol)
    fingerprint: str  # sha256 hex identifying the weights (independent of the load dtype)
    dtype: torch.dtype


def _tensor_bytes(t: torch.Tensor) -> bytes:
    # view as bytes first: numpy has no bfloat16
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def config_json(config: Any) -> str:
    """Canonical JSON of a model config, without keys that do not change what the weights compute."""
    d = {k: v for k, v in config.to_dict().items() if k not in _CONFIG_KEYS_IGNORED}
    return json.dumps(d, sort_keys=True, default=str)


def weights_fingerprint(model: Any) -> str:
    """sha256 over the config JSON and every state_dict tensor's name, dtype, shape and bytes (sorted by name).

    Computed on the float32 weights for every model, so it names the weights, not the load dtype
    (the store keys on the dtype separately).
    """
    h = hashlib.sha256()
    h.update(config_json(model.config).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()
