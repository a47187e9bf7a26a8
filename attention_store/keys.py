"""Store keys: a content hash of everything that changes an entry's bytes.

`entry_key(...)` is a sha256 over a canonical encoding of its fields (model and tokenizer
fingerprints, dtype, token ids, position ids, what the tokens attended to, policy), so a stale entry
can never be served for a changed input: it simply has another key.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any, NewType

import numpy as np
import torch

from attention_store.dtypes import dtype_name

EntryKey = NewType("EntryKey", str)
KEY_FORMAT = "pml-kv-key/1"  # part of every key: bump it to orphan all stored entries
KEY_RE = re.compile(r"^[0-9a-f]{64}$")


def _canonical(value: Any) -> Any:
    """A JSON-able form of `value` that two equal inputs always share."""
    if isinstance(value, torch.dtype):
        return dtype_name(value)
    if isinstance(value, (torch.Tensor, np.ndarray)) or (
        isinstance(value, (list, tuple)) and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)
    ):
        # Integer sequences (token ids, positions) go in as a hash of their int64 bytes: compact,
        # and independent of list/tuple/tensor/array type.
        arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"entry_key: expected an integer sequence, got dtype {arr.dtype}")
        arr = np.ascontiguousarray(arr.reshape(-1), dtype=np.int64)
        return {"int64": hashlib.sha256(arr.tobytes()).hexdigest(), "n": int(arr.size)}
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"entry_key: cannot encode {type(value).__name__}; pass str, numbers, dtypes, "
                    "integer sequences, or lists/dicts of those")


def entry_key(**fields: Any) -> EntryKey:
    """sha256 hex of a canonical (sorted-keys JSON) encoding of every field.

    The encoder passes everything that changes the stored bytes: `model_fingerprint`,
    `tokenizer_fingerprint`, `dtype`, `token_ids`, `position_ids`, `context` (a digest of what the
    tokens attended to) and `policy`.
    """
    if not fields:
        raise ValueError("entry_key needs at least one field")
    doc = {"format": KEY_FORMAT, "fields": _canonical(fields)}
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return EntryKey(hashlib.sha256(text.encode()).hexdigest())
