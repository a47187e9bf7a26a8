"""Placing a model on devices: device checks, layer -> device mapping, per-layer assembly and memory budgets."""

from __future__ import annotations

import pytest
import torch

from prompt_cache import models


def test_resolve_device_errors_are_one_sentence():
    assert models.resolve_device(None) == torch.device("cpu")
    assert models.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="not a device"):
        models.resolve_device("gpu0")
    with pytest.raises(ValueError, match="not both"):
        models.resolve_device("cpu", "auto")
    with pytest.raises(ValueError, match="unknown device map"):
        models.resolve_device(None, "everywhere")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            models.resolve_device("cuda:0")


def test_device_maps_agree_with_the_cli_choices():
    from experiments.cli import DEVICE_MAPS

    assert DEVICE_MAPS == models.DEVICE_MAPS


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_layer_devices_of_a_plain_and_a_dispatched_tiny_model(arch):
    n = models.load_model(f"tiny:{arch}").model.config.num_hidden_layers
    assert models.layer_devices(models.load_model(f"tiny:{arch}", device="cpu").model) == [torch.device("cpu")] * n
    auto = models.load_model(f"tiny:{arch}", device_map="auto").model
    # expected: without GPUs accelerate's auto map puts everything on the CPU, and says so
    assert getattr(auto, "hf_device_map", None) and models.layer_devices(auto) == [torch.device("cpu")] * n


def test_layer_devices_read_the_most_specific_device_map_entry(tiny):
    model = tiny("gemma3").model  # 4 layers
    model.hf_device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
                           "model.layers": "meta", "model.norm": "meta", "lm_head": "meta"}
    # expected: layers 0-1 from their own entries, 2-3 from the entry for all layers; no GPU in the
    # map, so "cpu" means the CPU
    assert models.layer_devices(model) == [torch.device("cpu")] * 2 + [torch.device("meta")] * 2
    assert models.describe_placement(model) == "device map: layers 0-1 on cpu, layers 2-3 on meta"
    model.hf_device_map = {"model.layers.0": 0, "model.layers.1": "cpu", "": 1}
    # expected: ints are CUDA indices; "cpu" entries are offloaded and run on the map's first GPU
    assert models.layer_devices(model) == [torch.device("cuda", 0), torch.device("cuda", 0),
                                           torch.device("cuda", 1), torch.device("cuda", 1)]


def _split_entries(tiny):
    """A prompt over a tiny llama, its stored entries, and the engine's schema state."""
    from attention_store import encoder
    from prompt_cache.engine import PromptCache

    lm = tiny("llama")
    pc = PromptCache(lm)
    pc.add_schema('<schema name="s">Root. <module name="a">alpha beta gamma</module>'
                  '<module name="b">delta epsilon</module></schema>')
    s, bound = pc.bind('<prompt schema="s"><a/><b/>question?</prompt>')
    entries = encoder.ensure_encoded(s.plan, lm, pc.store, pc.storage_dtype)
    return s, bound, entries


def test_assembly_puts_each_layer_on_its_device(tiny):
    from prompt_cache import assembler

    s, bound, entries = _split_entries(tiny)
    on_cpu = assembler.assemble(s.layout, s.plan, bound, entries, torch.float32, "cpu")
    split = assembler.assemble(s.layout, s.plan, bound, entries, torch.float32, ["cpu", "meta"])
    # expected: layer 0 on the CPU and equal to the single-device assembly; layer 1 on meta, same shape
    assert split.cache.layers[0].keys.device.type == "cpu" and split.cache.layers[1].values.device.type == "meta"
    assert torch.equal(split.cache.layers[0].keys, on_cpu.cache.layers[0].keys)
    assert split.cache.layers[1].keys.shape == on_cpu.cache.layers[1].keys.shape
    assert torch.equal(split.cache_positions, on_cpu.cache_positions)
    with pytest.raises(ValueError, match="3 layer devices"):
        assembler.assemble(s.layout, s.plan, bound, entries, torch.float32, ["cpu"] * 3)


def test_engine_assembles_on_the_layer_devices_it_read(tiny, monkeypatch):
    from prompt_cache import engine

    monkeypatch.setattr(engine, "layer_devices", lambda model: [torch.device("cpu"), torch.device("meta")])
    lm = tiny("llama")
    pc = engine.PromptCache(lm)
    pc.add_schema('<schema name="s">Root. <module name="a">alpha beta</module></schema>')
    s, bound = pc.bind('<prompt schema="s"><a/>question?</prompt>')
    ready = pc.assemble(s, bound)
    assert [layer.keys.device.type for layer in ready.cache.layers] == ["cpu", "meta"]


def test_memory_tier_keeps_layers_on_their_devices_with_a_budget_per_device(tiny):
    from attention_store.tiers import MemoryTier

    _, _, entries = _split_entries(tiny)
    entries = list(entries.values())
    per_layer = entries[0].nbytes // 2  # two layers of equal size
    # Budget for the layer share of exactly one entry per device (the first entry is the biggest here).
    biggest = max(e.nbytes for e in entries) // 2
    tier = MemoryTier(biggest, layer_devices=["cpu", "meta"])
    tier.put(entries[0])
    held = tier.get(entries[0].meta.key)
    # expected: layer 0 on the CPU, layer 1 on meta; each device counts half the entry's bytes
    assert [k.device.type for k in held.keys] == ["cpu", "meta"]
    assert tier.device_bytes() == {"cpu": per_layer, "meta": per_layer}
    tier.put(entries[1])
    # expected: both devices were over budget with two entries, so the older one was evicted
    assert tier.keys_lru() == [entries[1].meta.key]
    assert all(n <= biggest for n in tier.device_bytes().values())
    tiny_budget = MemoryTier(per_layer - 1, layer_devices=["cpu", "meta"])
    tiny_budget.put(entries[0])
    # expected: an entry whose share exceeds a device's budget is not kept
    assert len(tiny_budget) == 0
