"""What an answer returns: `Result` with its `Usage` and `Timing` (re-exported by `prompt_cache.engine`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int  # tokens of the prompt as the model sees it
    cached_tokens: int  # of those, tokens whose states came from the store (and were not recomputed)
    completion_tokens: int  # generated tokens
    recomputed_tokens: int = 0  # stored tokens recomputed at assembly by a recovery policy (blend, link)


@dataclass(frozen=True)
class Timing:
    ttft_ms: float  # time to first token: cache_ms + prefill_ms + choosing the first token
    cache_ms: float  # store lookup and copy into one cache (plus encode_ms when modules were missing)
    prefill_ms: float  # forward pass over the fresh tokens
    decode_tokens_per_s: float  # generated tokens after the first, per second (0 if none)
    encode_ms: float = 0.0  # encoding modules missing from the store, on the fly (part of cache_ms)
    recompute_ms: float = 0.0  # a recovery policy's recompute at assembly (part of cache_ms)


@dataclass(frozen=True)
class Result:
    text: str
    token_ids: tuple[int, ...]
    usage: Usage
    timing: Timing
    finish_reason: str  # "eos", "stop" (a stop string) or "length"
    semantic_cache: str | None = None  # "hit", "miss", or None when no semantic cache is set
    speculative: dict | None = None  # SpeculativeStats.to_json() when decoding was speculative

    def to_json(self) -> dict:
        return {"text": self.text, "usage": asdict(self.usage), "timing": asdict(self.timing),
                "finish_reason": self.finish_reason,
                "semantic_cache": self.semantic_cache, "speculative": self.speculative}
