"""Per-architecture quirks: how a forward pass with explicit positions and an explicit mask is run.

Everything in this project that calls the model goes through `forward`. Attention visibility is
given as a boolean matrix `allowed[q, k]` (True = query q may attend to key k), over the keys already
in the cache followed by the new tokens. The adapter turns it into what the model expects:

- plain causal models (Llama, Qwen2, GPT-2...): one additive float mask `[1, 1, q, k]`;
- models with sliding-window layers (Gemma 2/3, Mistral...): the window is applied by *position ids*,
  not by index in the cache, because assembled caches have gaps and out-of-order pieces. Models
  whose config lists `layer_types` take a dict `{layer_type: mask}` (transformers builds it that way
  itself); the others take one mask with the window applied.

Cache layers are always plain `DynamicLayer`s (a `DynamicCache()` built without config): a sliding
layer of transformers would drop keys by index, which is wrong once positions have gaps, so every
layer keeps all keys and the mask does the windowing.
"""

from __future__ import annotations

import functools
import threading
import weakref
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from attention_store import kernels
from attention_store.buffers import empty_tensor
from attention_store.kernels import ops as kernel_ops


@dataclass(frozen=True)
class AttentionSpec:
    """What the mask must express for one model, read from its config."""

    window: int | None  # sliding window in positions (None: no sliding layers)
    layer_types: tuple[str, ...] | None  # config.layer_types when the model dispatches masks by type


def attention_spec(config) -> AttentionSpec:
    config = config.get_text_config(decoder=True)
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if layer_types is not None:
        layer_types = tuple(layer_types)
        if "sliding_attention" not in layer_types:
            window = None
        return AttentionSpec(window=window, layer_types=layer_types)
    if getattr(config, "use_sliding_window", True) is False:
        window = None
    return AttentionSpec(window=window, layer_types=None)


ATTENTION = "pml_sdpa"  # the attention implementation models run with here (registered below)


_PLAIN_KWARGS = {"sliding_window", "position_ids", "cache_position", "use_cache"}  # what needs nothing special


def _sdpa_gqa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
              is_causal: bool | None = None, **kwargs):
    """transformers' sdpa attention, except that grouped-query attention reads each key/value head once.

    transformers repeats every key/value head for each query head (`repeat_kv`, a full copy of
    the cache per layer and forward) whenever a mask is given: a 39-token prefill over 4,000
    cached tokens spent 305 of its 824 ms copying (smollm2-135m, 3 KV heads for 9 query heads).
    SDPA's `enable_gqa` avoids the copy but its CPU kernel still reads a key/value head once per
    query head. Here the query heads of a group become rows of one head instead: queries
    `[B, H, q, D]` are viewed as `[B, KV, G*q, D]`, the mask repeated over the G rows (bytes, not
    the cache), so each key/value head is read once per forward, which is what bounds a decode
    step at 4,000 tokens. Each query row still attends to exactly the keys it did, with the same
    scale: the output is the same (tests compare logits with transformers' sdpa).
    With the kernels in use (`attention_store.kernels`), the rows of a head go to one of its C
    kernels instead of SDPA: up to `kernels.DECODE_ROWS` (decode steps, speculative checks) to
    `decode_attention`, one pass over K and V for all of them; more (prefills, packed batches) to
    `flash_attention`, key blocks with an online softmax; also a prefill with no cache, which
    transformers runs as SDPA's is_causal (the full-prefill baseline and module encoding get the
    kernel too). Both read one query head's mask rows for every head of its group, so the mask is
    not copied G times either.
    Anything else (no groups, causal without a mask, extra arguments, other devices) goes to
    transformers'.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    b, heads, q, d = query.shape
    # transformers' own choice: no mask and more than one query means SDPA's is_causal (a prefill
    # with no cache: queries and keys are the same tokens)
    causal = (attention_mask is None and q > 1 and key.shape[-2] == q
              and (is_causal if is_causal is not None else getattr(module, "is_causal", True)))
    if ((q == 1 or (groups > 1 and (attention_mask is not None or causal))) and query.device.type == "cpu"
            and not dropout and not {k for k, v in kwargs.items() if v is not None} - _PLAIN_KWARGS):
        kv = heads // groups
        rows = query.reshape(b, kv, groups * q, d)  # head h = kv * groups + g: rows g*q .. g*q+q-1
        mask = attention_mask
        kernel = _attention_kernel(rows, key, value, mask, causal)
        if causal:
            if kernel is None:  # SDPA's is_causal needs the heads as heads
                return sdpa_attention_forward(module, query, key, value, None, scaling=scaling, is_causal=True,
                                              **kwargs)
            out = kernel(rows, key, value, None, d ** -0.5 if scaling is None else scaling, causal=q)
            return out.reshape(b, heads, q, d).transpose(1, 2).contiguous(), None
        if kernel is not None and mask is not None and mask.dtype == torch.bool:  # transformers' own (True: attend)
            mask = _additive_once(mask, query.dtype)
        if mask is not None:
            t = mask.shape[-1]
            if mask.shape[1] != 1:  # a mask per query head: head kv*G + g becomes rows g*q.. of head kv
                mask = mask.expand(b, heads, q, t).reshape(b, kv, groups * q, t)
            elif kernel is None:  # one mask for every head: the same over a group's G rows
                mask = mask.expand(b, 1, q, t)[:, :, None].expand(b, 1, groups, q, t).reshape(b, 1, groups * q, t)
            # else the kernels read row g*q + i's mask at row i of the one head's (period q)
        if kernel is not None:
            out = kernel(rows, key, value, mask, d ** -0.5 if scaling is None else scaling)
        else:
            out = torch.nn.functional.scaled_dot_product_attention(rows, key, value, attn_mask=mask, scale=scaling)
        return out.reshape(b, heads, q, d).transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def _attention_kernel(rows, key, value, mask, causal: bool = False):
    """The C kernel for these rows `[B, KV, rows per head, D]` (`causal`: SDPA's is_causal, only the
    flash kernel has it), or None for SDPA."""
    if not (rows.dtype == key.dtype == value.dtype == torch.float32 and key.stride(-1) == value.stride(-1) == 1
            and (mask is None or mask.dtype == torch.bool or (mask.dtype == torch.float32 and mask.stride(-1) == 1))
            and kernels.active()):
        return None
    if rows.shape[-2] <= kernels.DECODE_ROWS:
        return None if causal else kernel_ops.decode_attention
    return kernel_ops.flash_attention if rows.shape[-1] % kernel_ops.FLASH_DIM == 0 else None


def use_fast_attention(model) -> None:
    """Run `model` with `ATTENTION` (sdpa without the per-forward copy of grouped key/value heads)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, _sdpa_gqa)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # masks are built exactly as for sdpa
    model.set_attn_implementation(ATTENTION)


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of the model's KV cache, from its config."""
    config = config.get_text_config(decoder=True)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


class BufferedLayer(DynamicLayer):
    """A cache layer over a preallocated buffer `[1, kv_heads, capacity, head_dim]`.

    `DynamicLayer.update` concatenates: every decode step copies the whole layer (about 16 ms per
    4,000 tokens per step for smollm2-135m), and the prefill over an assembled cache copies it once
    more. This layer writes updates into its buffer in place; `keys`/`values` are views of the
    filled length, so everything that reads a DynamicLayer reads this one. When the buffer is full
    it grows geometrically (one copy). `truncate` only moves the filled length back.
    """

    def __init__(self, reserve: int = 0):
        super().__init__()
        self.reserve = reserve  # room kept beyond the first fill: the tokens still to come
        self.length = 0
        self._k = self._v = None

    @classmethod
    def from_parts(cls, key_parts: list[torch.Tensor], value_parts: list[torch.Tensor], reserve: int,
                   dtype: torch.dtype, device) -> "BufferedLayer":
        """One layer holding the concatenation of `*_parts` (copied straight into the buffer)."""
        layer = cls.filled(key_parts[0], sum(k.shape[-2] for k in key_parts), reserve, dtype, device)
        at = 0
        for k, v in zip(key_parts, value_parts, strict=True):
            m = k.shape[-2]
            layer._k[:, :, at:at + m].copy_(k)
            layer._v[:, :, at:at + m].copy_(v)
            at += m
        return layer

    @classmethod
    def filled(cls, like: torch.Tensor, n: int, reserve: int, dtype: torch.dtype, device) -> "BufferedLayer":
        """A layer of `n` states (shaped like `like`'s heads and head size) whose buffers the caller
        fills: `_k`/`_v[:, :, :n]` are uninitialised until then (e.g. a disk entry read into them)."""
        layer = cls(reserve)
        layer._allocate(like, n + reserve, dtype, device)
        layer.length = n
        layer._views()
        return layer

    def _allocate(self, like: torch.Tensor, capacity: int, dtype=None, device=None) -> None:
        """Fresh buffers shaped like `like` (`[1, kv_heads, *, head_dim]`) with `capacity` tokens."""
        self.dtype, self.device = dtype or like.dtype, torch.device(device or like.device)
        shape = (*like.shape[:-2], capacity, like.shape[-1])
        if self.device.type == "cpu":  # huge pages from HUGE_MIN_BYTES up (scripts/probes/kv_pages.py: smaller, not)
            self._k, self._v = empty_tensor(shape, self.dtype), empty_tensor(shape, self.dtype)
        else:
            self._k = torch.empty(shape, dtype=self.dtype, device=self.device)
            self._v = torch.empty(shape, dtype=self.dtype, device=self.device)
        self.is_initialized = True

    def _views(self) -> None:
        self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self._allocate(key_states, key_states.shape[-2] + self.reserve)
        self._views()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self._k.shape[-2]:  # out of room: grow geometrically, one copy of the filled part
            old_k, old_v = self._k[:, :, :self.length], self._v[:, :, :self.length]
            self._allocate(self._k, max(end, 2 * self._k.shape[-2]))
            self._k[:, :, :self.length].copy_(old_k)
            self._v[:, :, :self.length].copy_(old_v)
        self._k[:, :, self.length:end].copy_(key_states)
        self._v[:, :, self.length:end].copy_(value_states)
        self.length = end
        self._views()
        return self.keys, self.values

    @property
    def capacity(self) -> int:
        return 0 if self._k is None else self._k.shape[-2]

    def truncate(self, length: int) -> None:
        self.length = min(length, self.length)
        self._views()

    def crop(self, tokens_to_remove: int) -> None:  # transformers' convention: a negative count
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        self.truncate(self.length + tokens_to_remove)

    def reset(self) -> None:
        self.length = 0
        self._k = self._v = None
        super().reset()


def new_cache(keys=None, values=None, reserve: int | None = None) -> DynamicCache:
    """A cache whose layer i holds `keys[i]`, `values[i]` (`[1, kv_heads, seq, head_dim]`), or empty.

    With `reserve` (the tokens still to be added: fresh prompt tokens plus generated ones), the
    layers are `BufferedLayer`s: the states are copied once into buffers with that much room, and
    prefill and decoding write in place. Without it the tensors are adopted, not copied (for
    caches that only a forward or two will extend, e.g. encoding): `DynamicCache.update` on an
    empty layer would concatenate onto an empty tensor, one more full copy. Either way the given
    tensors are never written to.
    """
    if reserve is not None and keys is not None:
        return buffered_cache([[k] for k in keys], [[v] for v in values], reserve, keys[0].dtype,
                              [k.device for k in keys])
    cache = DynamicCache()
    if reserve is not None:
        cache.layer_class_to_replicate = functools.partial(BufferedLayer, reserve)
        return cache
    if keys is not None:
        for i, (k, v) in enumerate(zip(keys, values, strict=True)):
            cache.update(k[:, :, :0], v[:, :, :0], i)
            cache.layers[i].keys, cache.layers[i].values = k, v
    return cache


def room(cache: DynamicCache) -> int | None:
    """Free slots of a cache of `BufferedLayer`s (None for plain layers, or an empty cache)."""
    layers = cache.layers
    if not layers or not all(isinstance(layer, BufferedLayer) for layer in layers):
        return None
    return min(layer.capacity - layer.length for layer in layers)


def buffered_cache(key_parts: list[list[torch.Tensor]], value_parts: list[list[torch.Tensor]], reserve: int,
                   dtype: torch.dtype, devices: list) -> DynamicCache:
    """A cache of `BufferedLayer`s, layer i the concatenation of `key_parts[i]` (one copy, into the buffer)."""
    cache = new_cache(reserve=reserve)
    cache.layers = [BufferedLayer.from_parts(k, v, reserve, dtype, d)
                    for k, v, d in zip(key_parts, value_parts, devices, strict=True)]
    return cache


def cache_kv(cache: DynamicCache) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Per-layer keys and values of a cache, each `[1, kv_heads, seq, head_dim]`."""
    return tuple(layer.keys for layer in cache.layers), tuple(layer.values for layer in cache.layers)


def truncate(cache: DynamicCache, length: int) -> None:
    """Keep the first `length` states of every layer (a rollback after decoding or rejected drafts)."""
    for layer in cache.layers:
        if isinstance(layer, BufferedLayer):
            layer.truncate(length)  # the next update overwrites the dropped tail in place
        else:
            # Views: the next update concatenates into a new tensor, so the dropped tail is never reused.
            layer.keys = layer.keys[:, :, :length]  # (1, kv_heads, length, head_dim)
            layer.values = layer.values[:, :, :length]


def _fill(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive mask of bool `allowed` (True: attend), same shape."""
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return _fill(allowed, dtype)[None, None]  # (1, 1, q, k)


_last_mask = threading.local()  # .pair: (weak reference to a bool mask, its additive form)


def _additive_once(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`_fill(mask)` of transformers' bool mask, computed once per forward rather than once per
    layer: every layer is handed the same mask object. The additive form is dropped with the mask
    (it is 4 bytes a key and query, so a large prefill's would otherwise stay alive)."""
    ref, done = getattr(_last_mask, "pair", (None, None))
    if ref is None or ref() is not mask or done.dtype != dtype:
        done = _fill(mask, dtype)
        slot = _last_mask.__dict__

        def drop(dead, slot=slot):  # the mask died: forget its additive form (unless a newer one took the slot)
            if slot.get("pair", (None,))[0] is dead:
                del slot["pair"]

        slot["pair"] = (weakref.ref(mask, drop), done)
    return done


def build_mask(spec: AttentionSpec, allowed: torch.Tensor | None, q_pos: torch.Tensor,
               k_pos: torch.Tensor, dtype: torch.dtype):
    """The `attention_mask` argument for one forward, or None when the model's own causal mask is right.

    allowed: bool `[q, k]` or None, meaning "every cached key plus the new tokens causally".
    q_pos: `[q]` position ids of the new tokens; k_pos: `[k]` position ids of all keys (cache + new).
    """
    q, k = q_pos.shape[0], k_pos.shape[0]
    if allowed is None:
        # Within the window everywhere (always so for models without one): the default mask is exact.
        if spec.window is None or int(q_pos.max() - k_pos.min()) < spec.window:
            return None
        allowed = torch.ones(q, k, dtype=torch.bool)
        allowed[:, k - q:] = torch.ones(q, q, dtype=torch.bool).tril()
    assert allowed.shape == (q, k), f"mask {tuple(allowed.shape)} != (new {q}, keys {k})"
    if spec.window is None:
        return _additive(allowed, dtype)
    # Sliding layers: a key more than `window - 1` positions behind the query is out of reach.
    windowed = allowed & ((q_pos[:, None] - k_pos[None, :]) < spec.window)
    if spec.layer_types is None:
        return _additive(windowed, dtype)
    return {"full_attention": _additive(allowed, dtype), "sliding_attention": _additive(windowed, dtype)}


@torch.inference_mode()
def forward(model, input_ids: torch.Tensor, positions: torch.Tensor, cache: DynamicCache,
            cache_positions: torch.Tensor | None, allowed: torch.Tensor | None = None,
            last_only: bool = False, logits_at: torch.Tensor | None = None) -> torch.Tensor:
    """Run new tokens over `cache` (extended in place) and return their logits.

    input_ids, positions: `[q]`; cache_positions: `[cache_len]` position ids of what is in `cache`
    (None or empty for an empty cache); allowed: bool `[q, cache_len + q]` or None (see build_mask).
    Returns logits `[q, vocab]`, `[1, vocab]` for the last token when `last_only`, or
    `[len(logits_at), vocab]` for the new tokens at those indices (the LM head runs only there).
    """
    assert input_ids.ndim == 1 and input_ids.shape == positions.shape, "input_ids and positions must be [q]"
    cached = 0 if cache_positions is None else cache_positions.shape[0]
    assert cache.get_seq_length() == cached, (
        f"cache holds {cache.get_seq_length()} tokens but {cached} cache positions were given")
    k_pos = positions if cached == 0 else torch.cat([cache_positions, positions])
    dtype = next(model.parameters()).dtype
    mask = build_mask(attention_spec(model.config), allowed, positions, k_pos, dtype)
    out = model(
        input_ids=input_ids[None].to(model.device),
        position_ids=positions[None].to(model.device),
        attention_mask=_to(mask, model.device),
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=logits_at.to(model.device) if logits_at is not None else (1 if last_only else 0),
    )
    return out.logits[0]


def warm_up(model) -> None:
    """Do once, at load, the one-time work of a process's first forwards: an 8-token prefill, a
    3-token prefill over it under a mask (the path every cached prompt takes) and a 1-token decode
    step. They touch every weight page and set up the kernels, so the first timed prompt does not
    pay for them (smollm2-135m, the first cached 39-token prefill of a fresh process: 429-442 ms
    without, 388-406 ms with, for about 250 ms more at load; `scripts/probes/cold_start.py`)."""
    vocab = model.config.get_text_config(decoder=True).vocab_size
    ids = torch.arange(8) % vocab
    cache = new_cache(reserve=4)
    forward(model, ids, torch.arange(8), cache, None, last_only=True)
    allowed = torch.ones(3, 11, dtype=torch.bool)
    allowed[:, 2] = False  # a hidden cached token: the masked path
    allowed[:, 8:] = torch.ones(3, 3, dtype=torch.bool).tril()
    k_pos = torch.arange(8)
    forward(model, ids[:3], torch.arange(20, 23), cache, k_pos, allowed=allowed, last_only=True)
    forward(model, ids[:1], torch.tensor([23]), cache, torch.cat([k_pos, torch.arange(20, 23)]))


def _to(mask, device):
    if mask is None:
        return None
    if isinstance(mask, dict):
        return {name: m.to(device) for name, m in mask.items()}
    return mask.to(device)


def decoder_layers(model) -> list:
    """The model's decoder layers, in order (transformers keeps them at `get_decoder().layers`)."""
    return list(model.get_decoder().layers)


class _Stop(Exception):
    """Raised by a forward hook to end a forward pass after a given layer."""


@torch.inference_mode()
def forward_until(model, input_ids: torch.Tensor, positions: torch.Tensor, last_layer: int,
                  allowed: torch.Tensor | None = None) -> DynamicCache:
    """Run `input_ids` over an empty cache through decoder layers 0..`last_layer` only.

    Returns the cache with those layers filled (`[1, kv_heads, q, head_dim]` each); the deeper
    layers are never computed, so this costs `(last_layer + 1) / layers` of a full forward.
    """
    layers = decoder_layers(model)
    if not 0 <= last_layer < len(layers):
        raise ValueError(f"layer {last_layer} out of range: the model has {len(layers)} decoder layers")

    def stop(*_):
        raise _Stop

    cache = new_cache()
    handle = layers[last_layer].register_forward_hook(stop)
    try:
        forward(model, input_ids, positions, cache, None, allowed=allowed, last_only=True)
    except _Stop:
        pass
    finally:
        handle.remove()
    return cache
