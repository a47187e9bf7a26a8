"""Size limits on schemas and prompts, checked before any model work, with their defaults in one place.

A schema that fits no model context (positions past `max_position_embeddings` give garbage, not an
error, in every transformers model) or asks for more memory than any machine has is refused here
with a sentence that says which limit and by how much, instead of failing deep inside torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from pml.errors import PMLError

MAX_MODULES = 4096  # modules in one schema (union members and nested modules included)
MAX_SCHEMA_TOKENS = 32768  # cacheable tokens of one schema, every union member counted
DEFAULT_CONTEXT = 2048  # context assumed for a model whose config names none


class LimitError(PMLError):
    """A schema or prompt over a size limit; caught wherever bad PML is (it is a PMLError)."""


@dataclass(frozen=True)
class Limits:
    max_modules: int = MAX_MODULES  # modules per schema
    max_schema_tokens: int = MAX_SCHEMA_TOKENS  # encoded tokens per schema (union members all count)
    max_positions: int | None = None  # positions a prompt may use; None: the model's max_position_embeddings


def model_context(lm, limits: Limits = Limits()) -> int:
    """Positions the model can attend over: `limits.max_positions`, else its config's maximum."""
    if limits.max_positions is not None:
        return limits.max_positions
    config = getattr(lm.model, "config", None)
    text_config = getattr(config, "get_text_config", lambda: config)()
    n = getattr(text_config, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else DEFAULT_CONTEXT


def check_schema(layout, lm, limits: Limits = Limits()) -> None:
    """LimitError if `layout` has too many modules or tokens, or reserves more positions than the model has.

    Positions: the schema reserves `layout.length`, and every prompt adds at least one token after them.
    """
    name = layout.schema_name
    if len(layout.modules) > limits.max_modules:
        raise LimitError(f"schema {name!r} has {len(layout.modules)} modules, over the limit of {limits.max_modules}; "
                         "split it into several schemas", element="schema")
    tokens = sum(len(s.token_ids) for s in layout.segments if s.kind != "module")
    if tokens > limits.max_schema_tokens:
        raise LimitError(f"schema {name!r} has {tokens} tokens to encode (every union member counted), over the "
                         f"limit of {limits.max_schema_tokens}; split it into several schemas", element="schema")
    context = model_context(lm, limits)
    if layout.length >= context:
        raise LimitError(f"schema {name!r} reserves {layout.length} positions, but model {lm.name!r} attends over "
                         f"at most {context} (the prompt's own text needs at least one more); shorten its "
                         "modules or parameter lengths", element="schema")


def check_prompt(layout, bound, lm, limits: Limits = Limits()) -> None:
    """LimitError if the schema's reserved positions plus the prompt's new tokens exceed the model's context."""
    context = model_context(lm, limits)
    end = layout.length + len(bound.suffix_ids)
    if end > context:
        raise LimitError(f"the prompt ends at position {end} ({layout.length} reserved by schema "
                         f"{layout.schema_name!r} + {len(bound.suffix_ids)} new tokens), past model {lm.name!r}'s "
                         f"context of {context}; shorten the prompt's text", element="prompt")


def check_generation(layout, bound, max_new_tokens: int, lm, limits: Limits = Limits()) -> None:
    """LimitError if the prompt's last position plus `max_new_tokens` generated tokens would run past
    the model's context (as vLLM refuses prompt + max_tokens over max_model_len: generating past the
    context gives garbage, not an error, and cutting it short silently would change the answer)."""
    context = model_context(lm, limits)
    end = layout.length + len(bound.suffix_ids)
    if end + max_new_tokens > context:
        raise LimitError(f"the prompt ends at position {end} and asks for {max_new_tokens} new tokens, "
                         f"{end + max_new_tokens} in all, past model {lm.name!r}'s context of {context}; "
                         f"ask for at most {max(0, context - end)} new tokens or shorten the prompt",
                         element="prompt")
