"""Packed batches: every prompt gets what `answer` gives it alone, from one forward per step."""

import logging

import pytest
import torch

from prompt_cache.engine import PromptCache
from prompt_cache.generation import GenerationConfig
from prompt_cache.tiny import tiny_model

SCHEMA = """<schema name="s">
  Intro.
  <module name="doc">A document about the history of tea in China and India.</module>
  <union>
    <module name="x">Option x.</module>
    <module name="y">Option y, a longer member of the union.</module>
  </union>
  <module name="q">Question about <parameter name="topic" length="4" scaffold="tea"/> please.</module>
  <module name="live" cache="false">Today's date is not cached.</module>
</schema>"""
OTHER = '<schema name="t">Another schema. <module name="a">Alpha text here.</module></schema>'
PROMPTS = [
    '<prompt schema="s"><doc/><x/><q topic="tea"/>Tell me more.</prompt>',
    '<prompt schema="s"><y/>Summarize it in one long sentence, please.</prompt>',
    '<prompt schema="s"><doc/><q/>What?</prompt>',  # the parameter's scaffold reused
    '<prompt schema="s"><doc/><y/><q topic="milk"/><live/>And now?</prompt>',
]
GREEDY = GenerationConfig(max_new_tokens=7, eos_ids=())


@pytest.mark.parametrize("arch", ["llama", "llama-gqa", "gemma3", "qwen2"])
def test_every_prompt_gets_its_own_answer(arch):
    pc = PromptCache(tiny_model(arch))
    pc.add_schema(SCHEMA)
    alone = [pc.answer(p, config=GREEDY) for p in PROMPTS]
    packed = pc.answer_batch(PROMPTS, config=GREEDY)
    assert [r.token_ids for r in packed] == [r.token_ids for r in alone]
    assert [r.usage for r in packed] == [r.usage for r in alone]
    assert [r.text for r in packed] == [r.text for r in alone]
    assert pc.answer_batch(PROMPTS[1:2], config=GREEDY)[0].token_ids == alone[1].token_ids  # a batch of one


def test_first_token_logits_match_answer_alone(monkeypatch):
    from prompt_cache import generation

    lm = tiny_model("llama-gqa")
    pc = PromptCache(lm)
    pc.add_schema(SCHEMA)
    seen = []
    real = generation.sample
    monkeypatch.setattr(generation, "sample", lambda logits, cfg, g: seen.append(logits.clone()) or real(logits, cfg, g))
    one = GenerationConfig(max_new_tokens=1, eos_ids=())
    pc.answer_batch(PROMPTS, config=one)
    packed = seen[:len(PROMPTS)]
    seen.clear()
    for p in PROMPTS:
        pc.answer(p, config=one)
    for a, b in zip(packed, seen):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_stop_strings_eos_and_lengths_per_prompt():
    pc = PromptCache(tiny_model("llama"))
    pc.add_schema(SCHEMA)
    first = [pc.answer(p, config=GenerationConfig(max_new_tokens=1, eos_ids=())).token_ids[0] for p in PROMPTS]
    for cfg in (GenerationConfig(max_new_tokens=9, eos_ids=(first[1],)),  # prompt 1 ends at once on EOS
                GenerationConfig(max_new_tokens=9, eos_ids=(), stop=(pc.lm.tokenizer.decode(first[0:1]),)),
                GenerationConfig(max_new_tokens=0, eos_ids=())):
        alone = [pc.answer(p, config=cfg) for p in PROMPTS]
        packed = pc.answer_batch(PROMPTS, config=cfg)
        assert [(r.token_ids, r.text, r.finish_reason) for r in packed] == \
            [(r.token_ids, r.text, r.finish_reason) for r in alone]


def test_prompts_of_several_schemas_keep_their_order():
    pc = PromptCache(tiny_model("llama"))
    pc.add_schema(SCHEMA)
    pc.add_schema(OTHER)
    mixed = [PROMPTS[0], '<prompt schema="t"><a/>Go on.</prompt>', PROMPTS[1]]
    assert [r.token_ids for r in pc.answer_batch(mixed, config=GREEDY)] == \
        [pc.answer(p, config=GREEDY).token_ids for p in mixed]


def test_recovery_policies_and_the_baseline_are_answered_one_by_one_with_a_reason(caplog):
    pc = PromptCache(tiny_model("llama"), policy="link:2")
    pc.add_schema(SCHEMA)
    with caplog.at_level(logging.INFO, logger="prompt_cache.engine"):
        got = pc.answer_batch(PROMPTS[:2], config=GREEDY)
    assert "one by one: policy link:2 recomputes per prompt" in caplog.text
    assert [r.token_ids for r in got] == [pc.answer(p, config=GREEDY).token_ids for p in PROMPTS[:2]]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="prompt_cache.engine"):
        pc.answer_batch(PROMPTS[:2], use_cache=False, config=GREEDY)
    assert "full-prefill baseline" in caplog.text
