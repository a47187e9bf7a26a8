"""Generation on its own: config checks, sampling, and decoding that carries positions explicitly."""

import pytest
import torch

from attention_store import adapter
from prompt_cache import generation
from prompt_cache.generation import GenerationConfig
from prompt_cache.tiny import tiny_model


@pytest.mark.parametrize("kwargs, message", [
    ({"max_new_tokens": -1}, "max_new_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
])
def test_bad_config_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**kwargs)


def test_sample_greedy_top_p_and_seed():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9])
    assert generation.sample(logits, GenerationConfig(), None) == 1  # greedy: argmax
    narrow = GenerationConfig(temperature=1.0, top_p=1e-6)
    assert {generation.sample(logits, narrow, torch.Generator().manual_seed(s)) for s in range(20)} == {1}
    wide = GenerationConfig(temperature=5.0)
    draws = lambda seed: [generation.sample(logits, wide, g) for g in [torch.Generator().manual_seed(seed)] for _ in range(30)]  # noqa: E731
    assert draws(3) == draws(3) and len(set(draws(3))) > 1


def test_decode_continues_at_the_explicit_next_position():
    # A cache with a gap (positions 0-4, then 20-24): the first generated token goes at 30, as
    # prefill was told, not at the cache length.
    lm = tiny_model("llama")
    cache = adapter.new_cache()
    ctx_pos = torch.cat([torch.arange(5), torch.arange(20, 25)])
    adapter.forward(lm.model, torch.arange(3, 13), ctx_pos, cache, None)
    logits, state = generation.prefill(lm, cache, ctx_pos, torch.tensor([40, 41]), torch.tensor([28, 29]),
                                       next_position=30)
    tokens = list(generation.decode(lm, state, logits, GenerationConfig(max_new_tokens=4, eos_ids=())))
    assert len(tokens) == 4 and state.generated == tokens
    # the last token is sampled but never fed, so three were fed at 30, 31, 32
    assert state.positions[-3:].tolist() == [30, 31, 32] and state.next_position == 33
    assert cache.get_seq_length() == len(state.positions) == 10 + 2 + 3


def test_decode_stops_at_eos_without_yielding_it():
    lm = tiny_model("llama")
    logits, state = generation.prefill(lm, adapter.new_cache(), torch.zeros(0, dtype=torch.long),
                                       torch.arange(3, 9), torch.arange(6))
    first = int(logits.argmax())
    assert list(generation.decode(lm, state, logits, GenerationConfig(eos_ids=(first,)))) == []


def test_prefill_needs_a_new_token():
    lm = tiny_model("llama")
    with pytest.raises(AssertionError, match="at least one new token"):
        generation.prefill(lm, adapter.new_cache(), torch.zeros(0, dtype=torch.long),
                           torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))


def _gapped_state(lm):
    cache = adapter.new_cache()
    ctx_pos = torch.cat([torch.arange(5), torch.arange(20, 25)])
    adapter.forward(lm.model, torch.arange(3, 13), ctx_pos, cache, None)
    return generation.prefill(lm, cache, ctx_pos, torch.tensor([40, 41]), torch.tensor([28, 29]), next_position=30)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_score_in_one_forward_equals_step_by_step_decoding(arch):
    # Teacher forcing the continuation in one forward gives the distributions decoding token by
    # token gives, at the same explicit positions over a cache with gaps.
    lm = tiny_model(arch)
    cont = [7, 8, 9, 10, 11]
    logits, state = _gapped_state(lm)
    rows = [logits] + [generation.decode_step(lm, state, t) for t in cont[:-1]]
    stepwise = torch.log_softmax(torch.stack(rows).float(), dim=-1)
    logits, state = _gapped_state(lm)
    scored = generation.score(lm, state, logits, cont)
    assert scored.shape == (len(cont), lm.model.config.get_text_config().vocab_size)
    torch.testing.assert_close(scored, stepwise, atol=1e-5, rtol=1e-5)
    assert state.positions[-4:].tolist() == [30, 31, 32, 33] and state.next_position == 34


def test_rewind_then_decode_reproduces_the_first_run():
    lm = tiny_model("llama")
    cfg = GenerationConfig(max_new_tokens=6, eos_ids=())
    logits, state = _gapped_state(lm)
    keep, nxt = state.positions.numel(), state.next_position
    first = list(generation.decode(lm, state, logits, cfg))
    assert state.cache.get_seq_length() > keep
    generation.rewind(state, keep, nxt)
    state.generated = []
    assert state.cache.get_seq_length() == keep and state.next_position == nxt
    assert list(generation.decode(lm, state, logits, cfg)) == first
