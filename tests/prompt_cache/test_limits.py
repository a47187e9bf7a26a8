"""Size limits: schemas and prompts past the model's context or the module bound fail before model work."""

import pytest

from attention_store import adapter
from prompt_cache import limits
from prompt_cache.engine import PromptCache
from prompt_cache.generation import GenerationConfig
from prompt_cache.limits import LimitError, Limits
from pml.errors import PMLError
from pml.layout import compute_layout
from pml.parser import parse_schema


@pytest.fixture(scope="module")
def lm():
    from prompt_cache.tiny import tiny_model

    return tiny_model("llama")


@pytest.fixture
def no_forward(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model ran before the limit check")

    monkeypatch.setattr(adapter, "forward", refuse)


def test_a_parameter_past_the_model_context_is_refused_before_model_work(lm, no_forward):
    context = lm.model.config.max_position_embeddings
    pc = PromptCache(lm)
    # BOS + "Hi " (3 bytes) = 4 positions before the parameter
    text = f'<schema name="s">Hi <module name="m"><parameter name="p" length="{context * 2}"/></module></schema>'
    with pytest.raises(LimitError, match=rf"reserves {context * 2 + 4} positions") as e:
        pc.add_schema(text)
    assert str(context) in e.value.message and "s" not in pc.schemas
    assert isinstance(e.value, PMLError)  # caught wherever bad PML is


def test_a_schema_that_fills_the_context_exactly_is_refused_a_smaller_one_accepted(lm):
    context = lm.model.config.max_position_embeddings
    pc = PromptCache(lm)
    # ByteTokenizer: BOS + one token per byte; "ab" root text = 3 positions before the parameter
    fits = f'<schema name="ok">ab<module name="m"><parameter name="p" length="{context - 4}"/></module></schema>'
    full = f'<schema name="full">ab<module name="m"><parameter name="p" length="{context - 3}"/></module></schema>'
    assert pc.add_schema(fits).length == context - 1
    with pytest.raises(LimitError, match="at least one more"):
        pc.add_schema(full)


def test_a_prompt_running_past_the_context_is_refused(lm, no_forward):
    context = lm.model.config.max_position_embeddings
    pc = PromptCache(lm)
    layout = pc.add_schema(f'<schema name="s">ab<module name="m">{"x" * (context - 20)}</module></schema>')
    long = '<prompt schema="s"><m/>' + "y" * 40 + "</prompt>"
    with pytest.raises(LimitError, match=f"past model .* context of {context}"):
        pc.answer(long, config=GenerationConfig(max_new_tokens=1))
    assert layout.length < context


def test_asking_for_more_new_tokens_than_the_context_has_left_is_refused(lm, no_forward):
    # As vLLM refuses prompt + max_tokens over max_model_len: never generate past the context.
    context = lm.model.config.max_position_embeddings
    pc = PromptCache(lm)
    pc.add_schema(f'<schema name="s">ab<module name="m">{"x" * (context - 20)}</module></schema>')
    prompt = '<prompt schema="s"><m/>' + "y" * 5 + "</prompt>"
    s, bound = pc.bind(prompt)
    end = s.layout.length + len(bound.suffix_ids)
    for call in (lambda cfg: pc.answer(prompt, config=cfg), lambda cfg: pc.answer_batch([prompt, prompt], config=cfg)):
        with pytest.raises(LimitError, match=rf"asks for {context - end + 1} new tokens.*at most {context - end} new"):
            call(GenerationConfig(max_new_tokens=context - end + 1))


def test_module_and_token_bounds():
    from prompt_cache.tiny import ByteTokenizer

    tok = ByteTokenizer()
    text = '<schema name="many">' + "".join(f'<module name="m{i}">x</module>' for i in range(6)) + "</schema>"
    layout = compute_layout(parse_schema(text), tok)

    class Fake:
        name = "fake"
        model = type("M", (), {"config": type("C", (), {"max_position_embeddings": 100})()})()

    limits.check_schema(layout, Fake(), Limits(max_modules=6))
    with pytest.raises(LimitError, match="6 modules, over the limit of 5"):
        limits.check_schema(layout, Fake(), Limits(max_modules=5))
    with pytest.raises(LimitError, match="over the limit of 4"):
        limits.check_schema(layout, Fake(), Limits(max_schema_tokens=4))
    with pytest.raises(LimitError, match="at most 5"):
        limits.check_schema(layout, Fake(), Limits(max_positions=5))


def test_default_module_bound_is_enforced_by_add_schema(lm, no_forward):
    n = limits.MAX_MODULES + 1
    text = '<schema name="huge">' + "".join(f'<module name="m{i}">x</module>' for i in range(n)) + "</schema>"
    with pytest.raises(LimitError, match=f"{n} modules, over the limit"):
        PromptCache(lm).add_schema(text)
