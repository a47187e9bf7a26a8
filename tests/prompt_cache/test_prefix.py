"""Automatic prefix cache: chained keys, exact reuse, servable lengths, TTL expiry and refresh."""

import pytest
import torch

from attention_store import adapter
from attention_store.store import AttentionStore
from attention_store.tiers import MemoryTier
from prompt_cache import generation
from prompt_cache.prefix import PrefixCache, PrefixConfig

IDS = [1] + [3 + (i * 7) % 200 for i in range(45)]  # 46 tokens: BOS and varied bytes


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def make(lm, **cfg):
    clock = FakeClock()
    config = PrefixConfig(**{"block_size": 4, "min_prefix": 0, "granularity": 4, **cfg})
    return PrefixCache(lm, AttentionStore(MemoryTier(1 << 30), None), config, clock=clock), clock


def prefill_with(pc, ids, salt=""):
    """Serve the longest cached prefix, compute the rest, store the prompt's blocks; (logits, hit tokens)."""
    hit = pc.lookup(ids, salt)
    rest = torch.tensor(ids[hit.tokens:])
    logits, state = generation.prefill(pc.lm, hit.cache, hit.positions, rest, torch.arange(hit.tokens, len(ids)))
    pc.insert(ids, state.cache, salt)
    return logits, hit.tokens


def test_keys_chain_on_the_parent_and_salt(tiny):
    pc, _ = make(tiny())
    a = pc.block_keys(IDS)
    # 46 tokens in blocks of 4: 11 full blocks; the partial tail has no key.
    assert len(a) == 11 and len(set(a)) == 11
    # Changing token 0 changes every later key (chained), not only block 0's.
    b = pc.block_keys([2] + IDS[1:])
    assert all(x != y for x, y in zip(a, b))
    # Same tokens, other salt: no key shared (a tenant cannot hit another's blocks).
    assert not set(a) & set(pc.block_keys(IDS, salt="tenant-b"))
    # A shared prefix shares keys exactly as far as the blocks agree.
    c = pc.block_keys(IDS[:20] + [9] * 26)
    assert c[:5] == a[:5] and c[5] != a[5]


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2"])
def test_served_prefix_gives_the_full_prefill_logits(tiny, arch):
    lm = tiny(arch)
    pc, _ = make(lm)
    full, hit0 = prefill_with(pc, IDS)
    assert hit0 == 0
    again, hit = prefill_with(pc, IDS)
    # 45 servable tokens (the last is always computed), rounded down to a block: 44.
    assert hit == 44
    torch.testing.assert_close(again, full, atol=1e-4, rtol=1e-4)
    # A longer prompt sharing the prefix: same logits as its own full prefill.
    longer = IDS + [50, 60, 70, 80, 90]
    ref = adapter.forward(lm.model, torch.tensor(longer), torch.arange(len(longer)), adapter.new_cache(), None,
                          last_only=True)[-1]
    got, hit = prefill_with(pc, longer)
    assert hit == 44
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_min_prefix_and_reported_granularity(tiny):
    pc, _ = make(tiny(), min_prefix=24, granularity=8)
    assert pc.servable(23) == 0 and pc.servable(31) == 28 and pc.servable(44) == 44
    assert pc.config.reported(44) == 40 and pc.config.reported(7) == 0
    short = IDS[:20]
    prefill_with(pc, short)
    # Below min_prefix nothing is stored, so nothing can be served later.
    assert pc.stats.blocks_written == 0
    prefill_with(pc, IDS)
    assert prefill_with(pc, IDS)[1] == 44


def test_ttl_expires_unless_hit(tiny):
    pc, clock = make(tiny())
    hit = pc.lookup(IDS)
    _, state = generation.prefill(pc.lm, hit.cache, hit.positions, torch.tensor(IDS), torch.arange(len(IDS)))
    pc.insert(IDS, state.cache, ttl_s=300)
    clock.now += 299
    assert pc.lookup(IDS).tokens == 44  # a hit at 299 s refreshes the TTL ...
    clock.now += 299
    assert pc.lookup(IDS).tokens == 44  # ... so 598 s after the write it is still there
    clock.now += 301
    assert pc.lookup(IDS).tokens == 0
    # Expired blocks are deleted from the store, not just hidden.
    assert pc.stats.expirations == 11 and len(pc.store.memory) == 0


def test_no_ttl_outlives_a_ttl_writer_and_expire_sweeps(tiny):
    pc, clock = make(tiny())
    hit = pc.lookup(IDS)
    _, state = generation.prefill(pc.lm, hit.cache, hit.positions, torch.tensor(IDS), torch.arange(len(IDS)))
    pc.insert(IDS[:8], state.cache)  # two blocks without TTL (automatic caching)
    pc.insert(IDS, state.cache, ttl_s=60)  # the rest with a 60 s TTL
    clock.now += 61
    # Only the 9 TTL blocks expire; the two automatic ones stay.
    assert pc.expire() == 9
    assert pc.lookup(IDS).tokens == 8


def test_a_lru_evicted_block_is_a_miss_and_the_chain_stops(tiny):
    pc, _ = make(tiny())
    prefill_with(pc, IDS)
    keys = pc.block_keys(IDS)
    pc.store.delete(keys[3])
    # Blocks after a missing one are unreachable: a chain serves only a prefix.
    assert pc.lookup(IDS).tokens == 12


def test_write_behind_reaches_disk_and_a_new_process_serves_it(tiny, tmp_path):
    lm = tiny()
    store = AttentionStore.from_dir(tmp_path)
    pc = PrefixCache(lm, store, PrefixConfig(block_size=4, min_prefix=0, granularity=4), write_behind=True)
    full, _ = prefill_with(pc, IDS)
    pc.flush()
    # A fresh store over the same folder (empty memory tier): every block comes from disk.
    again = PrefixCache(lm, AttentionStore.from_dir(tmp_path), PrefixConfig(block_size=4, min_prefix=0, granularity=4))
    logits, hit = prefill_with(again, IDS)
    assert hit == 44
    torch.testing.assert_close(logits, full, atol=1e-4, rtol=1e-4)
