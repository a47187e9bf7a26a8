"""Storage dtypes by the names users type (fp32, fp16, bf16), and the canonical dtype name in keys.

Import-light (torch is imported only inside functions), so command lines can list the choices.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

STORAGE_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # CLI name -> torch name
DEFAULT_STORAGE_DTYPE = "fp32"


def storage_dtype(name: str) -> "torch.dtype":
    """`"fp16"` -> `torch.float16`; a ValueError naming the choices otherwise."""
    import torch

    if name not in STORAGE_DTYPES:
        raise ValueError(f"unknown storage dtype {name!r}: choose one of {', '.join(STORAGE_DTYPES)}")
    return getattr(torch, STORAGE_DTYPES[name])


def dtype_name(dtype: "torch.dtype") -> str:
    """`torch.float16` -> `"float16"`."""
    return str(dtype).removeprefix("torch.")
