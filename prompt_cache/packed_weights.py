"""The GGUF blocks behind a converted built-in model's linear layers, for `attention_store.kernels.packed`.

A built-in model is converted once from its GGUF file to fp32 safetensors (`prompt_cache.models`).
At its first load after that, the Q4_1 and Q8_0 matrices of the same file are read again (gguf-py
parses the whole file's metadata first: together about 5 s for smollm2-135m, once) and kept beside
the converted model; every load hands them to `packed.install`, which uses a matrix only if its
blocks expand bitwise to the loaded weight. Tensor names map through gguf-py's own HF -> GGUF name table;
rows that transformers permuted while converting (Llama's query and key projections, stored by
llama.cpp in an interleaved rotary order) are matched back by content. A tied LM head uses the
embedding's blocks. Other formats (Q4_K, Q6_K, ... as in Gemma-3-270M's file) are left to torch.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from attention_store.fileio import atomic_write
from attention_store.kernels import BLOCK_WEIGHTS, ops
from attention_store.kernels import packed as packed_linear

log = logging.getLogger(__name__)

FORMATS = {"Q4_1": "q4_1", "Q8_0": "q8_0"}  # GGUF tensor type -> the kernels' format


def _row_order(weight: torch.Tensor, expanded: torch.Tensor) -> torch.Tensor | None:
    """Indices `order` with `expanded[order]` equal to `weight` row for row, or None if some row has no match."""
    where: dict[bytes, int] = {}
    for i, row in enumerate(expanded.numpy()):
        where.setdefault(row.tobytes(), i)
    order = [where.get(row.tobytes()) for row in weight.numpy()]
    return None if None in order else torch.tensor(order)


def gguf_blocks(model: torch.nn.Module, gguf_path: Path) -> dict[str, tuple[str, torch.Tensor]]:
    """`module name -> (format, blocks in the model's row order)` for every linear layer of `model`
    whose weight is a Q4_1 or Q8_0 tensor of `gguf_path` (tied weights: the owner's tensor)."""
    import gguf

    reader = gguf.GGUFReader(gguf_path)
    arch_name = reader.fields["general.architecture"].contents()
    archs = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    if arch_name not in archs:
        log.info("no packed weights: gguf-py has no name table for architecture %r", arch_name)
        return {}
    layers = model.config.get_text_config(decoder=True).num_hidden_layers
    names = gguf.get_tensor_name_map(archs[arch_name], layers)
    tensors = {t.name: t for t in reader.tensors}
    owner = {id(p): name.removesuffix(".weight") for name, p in model.named_parameters()}  # first name of a tied one
    out: dict[str, tuple[str, torch.Tensor]] = {}
    for name, module in model.named_modules():
        if type(module) is not torch.nn.Linear:
            continue
        gguf_name = names.get_name(owner.get(id(module.weight), name))
        tensor = tensors.get(f"{gguf_name}.weight") if gguf_name else None
        if tensor is None or tensor.tensor_type.name not in FORMATS:
            continue
        fmt = FORMATS[tensor.tensor_type.name]
        blocks = packed_linear.repack(fmt, np.asarray(tensor.data))
        weight = module.weight.detach()
        if blocks.shape[0] != weight.shape[0] or blocks.shape[1] * BLOCK_WEIGHTS != weight.shape[1]:
            log.info("not packing %s: GGUF %s is %s, the layer %s", name, tensor.name, tuple(tensor.shape),
                     tuple(weight.shape))
            continue
        if not packed_linear.expands_to(fmt, blocks, weight):  # rows permuted while converting?
            order = _row_order(weight, ops.dequantize(fmt, blocks))
            if order is None:
                log.info("not packing %s: the rows of GGUF %s do not match its weight", name, tensor.name)
                continue
            blocks = blocks[order].contiguous()
        out[name] = (fmt, blocks)
    return out


def _load_saved(path: Path) -> dict[str, tuple[str, torch.Tensor]] | None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        with path.open("rb") as fh:  # the header alone, for the formats
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        formats = json.loads(header["__metadata__"]["formats"])
        tensors = load_file(path)  # one copy into memory (no bytes object beside it)
        return {name: (formats[name], blocks) for name, blocks in tensors.items()}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        log.warning("ignoring damaged packed weights %s (%s); rebuilding them", path, e)
        return None


def attach(model: torch.nn.Module, gguf_path: Path, model_dir: Path | None = None, fingerprint: str = "") -> list[str]:
    """Swap `model`'s linear layers for packed ones where `gguf_path` holds their exact blocks; names swapped.

    With `model_dir`, the blocks (in the model's row order) are kept there once, in
    `packed-<fingerprint>.blocks` (safetensors; not `*.safetensors`, which
    would read as a weight file), so later loads skip reading the GGUF's metadata (about 3 s
    of gguf-py's parsing for smollm2-135m); `install` checks them against the weights every time.
    """
    from safetensors.torch import save

    from attention_store import kernels

    if kernels.library() is None:
        return []
    path = model_dir / f"packed-{fingerprint[:16]}.blocks" if model_dir is not None else None
    blocks = _load_saved(path) if path is not None else None
    if blocks is None:
        blocks = gguf_blocks(model, gguf_path)
        if path is not None:
            try:
                atomic_write(path, save({n: b for n, (_, b) in blocks.items()},
                                        metadata={"formats": json.dumps({n: f for n, (f, _) in blocks.items()})}))
            except OSError as e:  # a read-only model folder: packed anyway, rebuilt next load
                log.warning("could not keep packed weights in %s: %s", path, e)
    done = packed_linear.install(model, blocks)
    log.info("packed linear layers: %d of %d (%s)", len(done), len(blocks), gguf_path.name)
    return done
