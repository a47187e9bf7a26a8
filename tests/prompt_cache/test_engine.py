"""PromptCache behaviour: bad input, generation options, the disk tier across instances."""

import dataclasses
import logging

import pytest
import torch

from attention_store import adapter, encoder
from attention_store.store import StoreMismatch, open_store
from prompt_cache.engine import PromptCache
from prompt_cache.generation import GenerationConfig
from prompt_cache.tiny import tiny_model
from pml.errors import PMLError

SCHEMA = """<schema name="s">
  Intro.
  <module name="doc">A document about the history of tea in China and India.</module>
  <union>
    <module name="x">Option x.</module>
    <module name="y">Option y.</module>
  </union>
  <module name="q">Question about <parameter name="topic" length="4"/> please.</module>
</schema>"""
PROMPT = '<prompt schema="s"><doc/><x/><q topic="tea"/>Tell me more.</prompt>'
GREEDY = GenerationConfig(max_new_tokens=6, eos_ids=())


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama")


def entry_keys(pc):
    return sorted(row.meta.key for row in pc.store.entries())


@pytest.mark.parametrize("bad, message", [
    ('<prompt schema="nope">Hi</prompt>', "schema 'nope'"),
    ('<prompt schema="s"><missing/>Hi</prompt>', "missing"),
    ('<prompt schema="s"><x/><y/>Hi</prompt>', "union"),
    ('<prompt schema="s"><q topic="far too long a topic for four tokens"/>Hi</prompt>', "topic"),
    ('<prompt schema="s"><q colour="red"/>Hi</prompt>', "colour"),
    ('<prompt schema="s"><doc>', r"^1: error: .*(closed|end|tag)"),
    ('<prompt schema="s"><doc/></prompt>', "adds no new text"),
])
def test_bad_prompts_are_clear_errors_and_change_nothing(lm, tmp_path, bad, message):
    pc = PromptCache(lm, open_store(tmp_path, lm))
    pc.add_schema(SCHEMA)
    pc.encode("s")
    before = entry_keys(pc)
    with pytest.raises(PMLError, match=message):
        pc.answer(bad, config=GREEDY)
    assert entry_keys(pc) == before


def test_a_store_of_another_model_is_refused_and_left_alone(tmp_path):
    a, b = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    pc = PromptCache(a, open_store(tmp_path, a))
    pc.add_schema(SCHEMA)
    pc.encode("s")
    files = sorted(p.name for p in tmp_path.rglob("*"))
    owner = (tmp_path / "owner.json").read_text()
    with pytest.raises(StoreMismatch, match="use another --store folder"):
        open_store(tmp_path, b)
    assert sorted(p.name for p in tmp_path.rglob("*")) == files
    assert (tmp_path / "owner.json").read_text() == owner


@pytest.mark.parametrize("promote", [True, False])  # False: read straight into the cache (`pml run`)
def test_second_instance_reads_states_from_disk_without_recomputing(lm, tmp_path, monkeypatch, promote):
    first = PromptCache(lm, open_store(tmp_path, lm))
    first.add_schema(SCHEMA)
    report = first.encode("s")
    assert report.encoded == report.modules > 0
    # bytes per token = 2 x layers x kv_heads x head_dim x 4 (fp32)
    cfg = lm.model.config
    assert report.bytes_per_token == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4
    want = first.answer(PROMPT, config=GREEDY)

    calls = []
    real = encoder.encode_units
    monkeypatch.setattr(encoder, "encode_units", lambda *a, **k: calls.append(a) or real(*a, **k))
    second = PromptCache(lm, open_store(tmp_path, lm, promote_disk_hits=promote))  # as a new process: memory empty
    second.add_schema(SCHEMA)
    got = second.answer(PROMPT, config=GREEDY)
    assert calls == [] and got.token_ids == want.token_ids
    assert got.usage.cached_tokens == want.usage.cached_tokens > 0
    assert (len(second.store.memory) > 0) == promote
    s, bound = second.bind(PROMPT)
    for a, b in zip(*(adapter.cache_kv(pc.assemble(s, bound, room=4).cache) for pc in (first, second))):
        assert all(torch.equal(x, y) for x, y in zip(a, b))  # the same states, bit for bit


@pytest.mark.parametrize("promote", [True, False])
def test_corrupted_store_file_is_detected_and_recomputed(lm, tmp_path, caplog, promote):
    pc = PromptCache(lm, open_store(tmp_path, lm))
    pc.add_schema(SCHEMA)
    pc.encode("s")
    want = pc.answer(PROMPT, config=GREEDY)
    for f in tmp_path.rglob("*.safetensors"):
        data = bytearray(f.read_bytes())
        data[-20:] = bytes(20)  # zero the tail of the payload
        f.write_bytes(bytes(data))
    fresh = PromptCache(lm, open_store(tmp_path, lm, promote_disk_hits=promote))
    fresh.add_schema(SCHEMA)
    with caplog.at_level(logging.WARNING):
        got = fresh.answer(PROMPT, config=GREEDY)
    assert got.token_ids == want.token_ids
    damaged = [r for r in caplog.records if "damaged" in r.message and "checksum" in r.message]
    assert damaged and len(list((tmp_path / "corrupt").glob("*.safetensors"))) == len(damaged)  # set aside once
    assert any("while being read" in r.message for r in caplog.records) == (not promote)  # found in assembly
    caplog.clear()
    again = PromptCache(lm, open_store(tmp_path, lm, promote_disk_hits=promote))  # recomputed ones were stored
    again.add_schema(SCHEMA)
    with caplog.at_level(logging.WARNING):
        assert again.answer(PROMPT, config=GREEDY).token_ids == want.token_ids
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_states_in_storage_dtypes_round_trip(lm, tmp_path):
    answers = {}
    for dtype in ("fp32", "fp16", "bf16"):
        pc = PromptCache(lm, open_store(tmp_path / dtype, lm), storage_dtype=dtype)
        pc.add_schema(SCHEMA)
        report = pc.encode("s")
        size = {"fp32": 4, "fp16": 2, "bf16": 2}[dtype]
        cfg = lm.model.config
        assert report.bytes_per_token == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * size
        answers[dtype] = pc.logprobs(PROMPT, [40, 41, 42])
    torch.testing.assert_close(answers["fp16"], answers["fp32"], atol=0.05, rtol=0)


def test_sampling_is_reproducible_with_a_seed_and_varies_without(lm):
    pc = PromptCache(lm)
    pc.add_schema(SCHEMA)
    cfg = GenerationConfig(max_new_tokens=12, temperature=1.5, top_p=0.95, seed=7, eos_ids=())
    a, b = pc.answer(PROMPT, config=cfg), pc.answer(PROMPT, config=cfg)
    c = pc.answer(PROMPT, config=dataclasses.replace(cfg, seed=8))
    greedy = pc.answer(PROMPT, config=GenerationConfig(max_new_tokens=12, eos_ids=()))
    assert a.token_ids == b.token_ids
    assert len({a.token_ids, c.token_ids, greedy.token_ids}) > 1


def test_stop_strings_eos_streaming_and_length(lm):
    pc = PromptCache(lm)
    pc.add_schema(SCHEMA)
    full = pc.answer(PROMPT, config=GenerationConfig(max_new_tokens=10, eos_ids=()))
    assert full.finish_reason == "length" and full.usage.completion_tokens == 10
    pieces = []
    streamed = pc.answer(PROMPT, config=GenerationConfig(max_new_tokens=10, eos_ids=()), on_text=pieces.append)
    assert "".join(pieces) == streamed.text == full.text
    stop = full.text[3:5]
    cut = pc.answer(PROMPT, config=GenerationConfig(max_new_tokens=10, eos_ids=(), stop=(stop,)))
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(stop)]
    eos = pc.answer(PROMPT, config=GenerationConfig(max_new_tokens=10, eos_ids=(full.token_ids[2],)))
    assert eos.finish_reason == "eos" and eos.token_ids == full.token_ids[:2]


def test_batch_answers_equal_single_answers(lm):
    pc = PromptCache(lm)
    pc.add_schema(SCHEMA)
    prompts = [PROMPT, PROMPT.replace("<x/>", "<y/>"), '<prompt schema="s"><doc/>Summarize.</prompt>']
    batch = pc.answer_batch(prompts, config=GREEDY)
    assert [r.token_ids for r in batch] == [pc.answer(p, config=GREEDY).token_ids for p in prompts]


def test_usage_and_timing_are_reported(lm):
    pc = PromptCache(lm)
    pc.add_schema(SCHEMA)
    r = pc.answer(PROMPT, config=GREEDY)
    j = r.to_json()
    assert set(j["usage"]) == {"prompt_tokens", "cached_tokens", "completion_tokens", "recomputed_tokens"}
    assert {"ttft_ms", "cache_ms", "prefill_ms", "decode_tokens_per_s"} <= set(j["timing"])
    assert r.timing.encode_ms > 0  # states were missing: encoded on the fly
    assert pc.answer(PROMPT, config=GREEDY).timing.encode_ms == 0
    assert r.timing.ttft_ms >= r.timing.cache_ms + r.timing.prefill_ms


def test_invalid_generation_options_are_clear_errors():
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        GenerationConfig(temperature=-1)


def test_pinned_schema_survives_memory_pressure(lm):
    from attention_store.store import AttentionStore
    from attention_store.tiers import MemoryTier

    other = SCHEMA.replace('name="s"', 'name="t"').replace("tea", "oak")
    pc = PromptCache(lm, AttentionStore(MemoryTier(1), None))  # a budget too small for anything unpinned
    pc.add_schema(SCHEMA)
    pc.add_schema(other)
    pc.pin("s")
    pc.encode("s")
    pc.encode("t")
    kept = {row.meta.schema for row in pc.store.entries()}
    assert kept == {"s"}  # only the pinned schema's entries are resident
    with pytest.raises(PMLError, match="schema 'nope' was not added"):
        pc.pin("nope")


def test_streaming_never_emits_text_a_stop_string_cuts(lm):
    pc = PromptCache(lm)
    pc.add_schema(SCHEMA)
    full = pc.answer(PROMPT, config=GenerationConfig(max_new_tokens=12, eos_ids=()))
    # a stop string spanning two tokens of the byte tokenizer: its first byte arrives one step early
    stop = full.text[4:6]
    pieces = []
    r = pc.answer(PROMPT, config=GenerationConfig(max_new_tokens=12, eos_ids=(), stop=(stop,)), on_text=pieces.append)
    assert r.finish_reason == "stop" and "".join(pieces) == r.text == full.text[: full.text.find(stop)]
    # a stop string that never comes: the held-back tail is still delivered at the end
    pieces = []
    r = pc.answer(PROMPT, config=GenerationConfig(max_new_tokens=12, eos_ids=(), stop=(full.text[-1] + "\x07",)),
                  on_text=pieces.append)
    assert "".join(pieces) == r.text == full.text


def test_unknown_policy_or_storage_dtype_is_a_clear_error(lm):
    with pytest.raises(ValueError, match="unknown encoding policy 'joint'"):
        PromptCache(lm, policy="joint")
    with pytest.raises(ValueError, match="unknown storage dtype 'fp8'.*fp32, fp16, bf16"):
        PromptCache(lm, storage_dtype="fp8")


@pytest.mark.parametrize("policy", ["independent", "link:2"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_answer_scored_is_answer_plus_logprobs_from_one_pass(lm, policy, use_cache):
    pc = PromptCache(lm, policy=policy)
    pc.add_schema(SCHEMA)
    plain = pc.answer(PROMPT, use_cache=use_cache, config=GREEDY)
    got, own = pc.answer_scored(PROMPT, use_cache=use_cache, config=GREEDY, limit=4)
    assert got.token_ids == plain.token_ids and got.usage == plain.usage
    torch.testing.assert_close(own, pc.logprobs(PROMPT, list(plain.token_ids[:4]), use_cache=use_cache),
                               atol=1e-5, rtol=1e-5)
    forced = [40, 41, 42]
    _, lp = pc.answer_scored(PROMPT, forced, use_cache=use_cache, config=GREEDY)
    torch.testing.assert_close(lp, pc.logprobs(PROMPT, forced, use_cache=use_cache), atol=1e-5, rtol=1e-5)
    assert pc.answer_scored(PROMPT, [], use_cache=use_cache, config=GREEDY)[1] is None
