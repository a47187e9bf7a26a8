"""PromptCache's L1 hook: the question and context key of a bound PML prompt, lookup and remember.

The question is the prompt's last piece of new text (its last `<user>` turn, or its last text);
everything else that changes the answer goes into the context key: the model and tokenizer, the
storage and encoding settings, the schema's layout (token ids and reserved positions), the
selected modules with their parameter values, the prompt's other text and turns (system prompt,
history), whether the cache is used, and every generation setting.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from pml.model import Chat, Text
from prompt_cache import assembler
from prompt_cache.semantic.cache import ContextKey, context_key

log = logging.getLogger(__name__)


def layout_digest(layout) -> str:
    """sha256 of a layout's segments: path, kind, reserved start and token ids of each."""
    h = hashlib.sha256(layout.schema_name.encode())
    for seg in layout.segments:
        h.update(f"\0{seg.path}\0{seg.kind}\0{seg.start}\0{list(seg.token_ids)}".encode())
    return h.hexdigest()


def split_question(prompt) -> tuple[str, list[tuple[str, str]]]:
    """(question, the other text pieces as (role, text)) of a parsed Prompt."""
    pieces: list[tuple[str, str]] = []
    for node in prompt.children:
        if isinstance(node, Text):
            pieces.append(("text", node.text))
        elif isinstance(node, Chat):
            pieces.append((node.role, "".join(t.text for t in node.children)))
    users = [i for i, (role, _) in enumerate(pieces) if role in ("user", "text")]
    if not users:
        return "", pieces
    i = users[-1]
    # The question's place among the pieces stays in the context: the same words as the first or as
    # the last turn of a conversation are different requests.
    return pieces[i][1], pieces[:i] + [(pieces[i][0], "<question>")] + pieces[i + 1:]


@dataclass
class L1Request:
    cache: Any  # SemanticCache
    question: str
    context: ContextKey
    tenant: str
    vector: np.ndarray
    prompt_tokens: int
    started: float
    clock: Any  # prompt_cache.timing.Clock of the model's device

    def lookup(self, on_text: Callable[[str], None] | None):
        """The stored Result marked "hit" (streamed to `on_text` at once), or None."""
        hit = self.cache.lookup(self.question, self.context, self.tenant, vector=self.vector)
        if hit is None:
            return None
        stored = hit.answer
        ms = self.clock.ms_since(self.started)
        if on_text is not None and stored.text:
            on_text(stored.text)
        log.debug("semantic cache hit (similarity %.3f): %r ~ %r", hit.similarity, self.question, hit.question)
        timing = dataclasses.replace(stored.timing, ttft_ms=ms, cache_ms=ms, prefill_ms=0.0,
                                     decode_tokens_per_s=0.0, encode_ms=0.0)
        usage = dataclasses.replace(stored.usage, prompt_tokens=self.prompt_tokens, cached_tokens=0)
        return dataclasses.replace(stored, timing=timing, usage=usage, semantic_cache="hit", speculative=None)

    def remember(self, result):
        """Store a freshly generated Result under this request; returns it marked "miss"."""
        result = dataclasses.replace(result, semantic_cache="miss")
        self.cache.store(self.question, result, self.context, self.tenant, vector=self.vector)
        return result


def pml_context(prompt, s, bound) -> tuple[str, dict]:
    """A PML prompt's question (its last `<user>` turn, or last text) and the rest of what makes its
    answer: the schema's layout, the selected modules, parameter values and the prompt's other text."""
    from pml.model import Prompt
    from pml.parser import parse_prompt

    question, others = split_question(prompt if isinstance(prompt, Prompt) else parse_prompt(prompt))
    return question, {
        "layout": layout_digest(s.layout), "modules": list(bound.modules), "others": others,
        "arguments": sorted((f"{path}/{name}", list(ids)) for (path, name), ids in bound.arguments.items())}


def request(pc, prompt, s, bound, use_cache: bool, config, tenant: str = "") -> L1Request:
    """Everything `answer` needs to consult pc.semantic_cache for one bound prompt."""
    question, parts = pml_context(prompt, s, bound)
    lm = pc.lm
    key = context_key(
        model=lm.fingerprint, tokenizer=lm.tokenizer.fingerprint, policy=pc.policy.spec,
        storage_dtype=str(pc.storage_dtype), **parts, use_cache=use_cache, generation=dataclasses.asdict(config),
        embedder=pc.semantic_cache.embedder.name)
    t = pc.clock.now()
    vector = pc.semantic_cache.embed(question)
    return L1Request(pc.semantic_cache, question, key, tenant, vector,
                     len(assembler.baseline_tokens(s.layout, bound)), t, pc.clock)
