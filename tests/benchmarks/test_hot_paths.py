"""pytest-benchmark suite for the hot paths: encode a schema, assemble a prompt's cache, cached vs full prefill.

Run with `bash scripts/bootstrap.sh bench` (tiny random model). `PML_BENCH_REAL=1` adds the same
benchmarks on the built-in default model (smollm2-135m, a 2,000-token document). The default test
run (`--benchmark-skip` in addopts) skips them all.
"""

from __future__ import annotations

import os

import pytest
import torch

from attention_store import encoder
from prompt_cache import generation
from prompt_cache.engine import PromptCache
from attention_store.store import AttentionStore
from attention_store.tiers import MemoryTier
from pml.builder import PromptBuilder, SchemaBuilder

REAL = os.environ.get("PML_BENCH_REAL") == "1"
TEXT = ("The harbour authority reported that container traffic rose by a fifth over the year, while the "
        "new sea wall, finished in March, cost forty million and protects the eastern quay. ")


def _setup(lm, doc_tokens: int, modules: int):
    """A PromptCache with a schema of `modules` modules (about `doc_tokens` tokens), encoded, and its prompt."""
    ids = lm.tokenizer.encode(TEXT * (doc_tokens // max(1, len(lm.tokenizer.encode(TEXT))) + 1))[:doc_tokens]
    step = len(ids) // modules
    b, p = SchemaBuilder("bench"), PromptBuilder("bench")
    for i in range(modules):
        b.module(f"doc{i}", text=lm.tokenizer.decode(ids[i * step:(i + 1) * step]).strip())
        p.use(f"doc{i}")
    pc = PromptCache(lm, AttentionStore(MemoryTier(8 << 30), None))
    pc.add_schema(b.to_xml())
    pc.encode("bench")
    prompt = p.user("How much did the sea wall cost, and when was it finished?").to_xml()
    s, bound = pc.bind(prompt)
    return pc, s, bound


CASES = [pytest.param(("tiny:llama", 384, 4), id="tiny-llama")]
if REAL:
    CASES.append(pytest.param(("smollm2-135m", 2000, 1), id="smollm2-135m", marks=pytest.mark.real_model))
else:
    CASES.append(pytest.param(("smollm2-135m", 2000, 1), id="smollm2-135m",
                              marks=pytest.mark.skip(reason="real-model benchmarks need PML_BENCH_REAL=1")))


@pytest.fixture(scope="module", params=CASES)
def case(request):
    from prompt_cache.models import load_model

    name, doc_tokens, modules = request.param
    torch.manual_seed(0)
    return _setup(load_model(name), doc_tokens, modules)


@pytest.mark.benchmark(group="encode")
def test_encode_schema(benchmark, case):
    pc, s, _ = case
    units = list(s.plan.units)
    entries = benchmark(encoder.encode_units, s.plan, pc.lm, units, pc.storage_dtype)
    assert len(entries) == len(units)


@pytest.mark.benchmark(group="assemble")
def test_assemble(benchmark, case):
    pc, s, bound = case
    ready = benchmark(pc.assemble, s, bound)
    assert ready.cached_tokens > 0


def _prefill(pc, ready):
    return generation.prefill(pc.lm, ready.cache, ready.cache_positions, ready.fresh_ids, ready.fresh_positions,
                              ready.next_position)


@pytest.mark.benchmark(group="prefill")
def test_prefill_cached(benchmark, case):
    """Forward of the fresh tokens over an assembled cache (assembled in setup: prefill extends it)."""
    pc, s, bound = case
    benchmark.pedantic(_prefill, setup=lambda: ((pc, pc.assemble(s, bound)), {}), rounds=5, warmup_rounds=1)


@pytest.mark.benchmark(group="prefill")
def test_prefill_full(benchmark, case):
    """The same prompt as one ordinary prefill (the baseline)."""
    pc, s, bound = case
    benchmark.pedantic(_prefill, setup=lambda: ((pc, pc.baseline(s, bound)), {}), rounds=3, warmup_rounds=1)


@pytest.mark.benchmark(group="ttft")
@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "full"])
def test_answer_ttft(benchmark, case, use_cache):
    """End to end: one answer with one new token, from the memory tier or by full prefill."""
    pc, s, bound = case
    prompt = PromptBuilder("bench")
    for m in bound.modules:
        prompt.use(m)
    xml = prompt.user("How much did the sea wall cost, and when was it finished?").to_xml()
    cfg = generation.GenerationConfig(max_new_tokens=1)
    result = benchmark.pedantic(pc.answer, args=(xml, use_cache, cfg), rounds=3, warmup_rounds=1)
    assert result.usage.cached_tokens > 0 if use_cache else result.usage.cached_tokens == 0
