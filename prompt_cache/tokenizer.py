"""Adapter from a transformers tokenizer to the `pml.layout.Tokenizer` protocol (chat affixes, BOS, EOS)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

_SENTINEL = "PMLSENTINEL7q3z"
PLAIN_AFFIXES = {"system": ("System: ", "\n"), "user": ("User: ", "\n"), "assistant": ("Assistant: ", "\n")}
ROLES = ("system", "user", "assistant")


class HFTokenizer:
    """Adapter from a transformers tokenizer to the `pml.layout.Tokenizer` protocol.

    `encode` never adds special tokens and never truncates; `bos_ids` holds the BOS this model's
    tokenizer puts in front by default (empty for SmolLM2, `<bos>` for Gemma); `chat_affixes` is
    derived from the chat template, or the plain `System: `/`User: `/`Assistant: ` format when the
    tokenizer has none.
    """

    def __init__(self, tokenizer: Any, name: str, generation_eos: Sequence[int] | int | None = None):
        self._tok = tokenizer
        self.name = name
        self.bos_ids: tuple[int, ...] = self._default_bos()
        self.eos_ids: tuple[int, ...] = self._eos(generation_eos)
        self._affixes = self._derive_affixes()
        self.has_chat_template: bool = self._affixes is not None
        if self._affixes is None:
            self._affixes = dict(PLAIN_AFFIXES)
        self.fingerprint: str = self._fingerprint()

    @property
    def hf(self) -> Any:
        """The wrapped transformers tokenizer."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`: no special tokens added, never truncated (whatever `model_max_length` says)."""
        # verbose=False: the "sequence longer than model_max_length" warning is noise here; the
        # encoder checks lengths against the model itself.
        return list(self._tok(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"])

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; special tokens kept unless asked otherwise."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def chat_affixes(self, role: str) -> tuple[str, str]:
        """`(prefix, suffix)` text around one message of `role` (`system`, `user` or `assistant`)."""
        if role not in self._affixes:
            raise ValueError(f"unknown chat role {role!r}; expected one of {', '.join(ROLES)}")
        return self._affixes[role]

    def _default_bos(self) -> tuple[int, ...]:
        bos = self._tok.bos_token_id
        if bos is None:
            return ()
        ids = self._tok("x", add_special_tokens=True)["input_ids"]
        return (bos,) if ids and ids[0] == bos else ()

    def _eos(self, generation_eos: Sequence[int] | int | None) -> tuple[int, ...]:
        ids: list[int] = []
        if self._tok.eos_token_id is not None:
            ids.append(self._tok.eos_token_id)
        vocab = self._tok.get_vocab()
        for end_token in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>"):
            if end_token in vocab:
                ids.append(vocab[end_token])
        if isinstance(generation_eos, int):
            ids.append(generation_eos)
        elif generation_eos is not None:
            ids.extend(generation_eos)
        return tuple(dict.fromkeys(int(i) for i in ids))

    def _render(self, messages: list[dict[str, str]]) -> str:
        return self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)

    def _affix(self, before: list[dict[str, str]], role: str) -> tuple[str, str]:
        base = self._render(before) if before else ""
        full = self._render([*before, {"role": role, "content": _SENTINEL}])
        if not full.startswith(base) or full.count(_SENTINEL) != 1:
            raise ValueError(f"chat template does not render {role!r} turns additively")
        prefix, suffix = full[len(base):].split(_SENTINEL)
        bos_text = self._tok.bos_token
        if not before and self.bos_ids and bos_text and prefix.startswith(bos_text):
            prefix = prefix[len(bos_text):]  # BOS is placed by bos_ids, not by the system turn
        return prefix, suffix

    def _derive_affixes(self) -> dict[str, tuple[str, str]] | None:
        if not getattr(self._tok, "chat_template", None):
            return None
        # Templates like SmolLM2's inject a default system message when the first message is not
        # a system one, so user and assistant turns are measured after an explicit system turn.
        sys = {"role": "system", "content": "A"}
        try:
            return {
                "system": self._affix([], "system"),
                "user": self._affix([sys], "user"),
                "assistant": self._affix([sys, {"role": "user", "content": "B"}], "assistant"),
            }
        except Exception as exc:  # template errors are jinja's own exception types
            log.warning("tokenizer %s: chat template could not be split into affixes (%s); "
                        "using the plain System:/User:/Assistant: format", self.name, exc)
            return None

    def _fingerprint(self) -> str:
        h = hashlib.sha256()
        backend = getattr(self._tok, "backend_tokenizer", None)
        if backend is not None:
            h.update(backend.to_str().encode())
        else:
            h.update(json.dumps(sorted(self._tok.get_vocab().items())).encode())
        h.update(b"\0" + (getattr(self._tok, "chat_template", None) or "").encode())
        h.update(b"\0" + json.dumps([self.bos_ids, self.eos_ids, sorted(self._affixes.items())]).encode())
        return h.hexdigest()
