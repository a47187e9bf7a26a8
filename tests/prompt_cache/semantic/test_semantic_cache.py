"""SemanticCache: hits within the threshold, never across tenants or contexts, TTL, size bound."""

import numpy as np
import pytest

from prompt_cache.semantic.cache import SemanticCache, SemanticCacheConfig, context_key
from prompt_cache.semantic.embedder import HashingEmbedder
from prompt_cache.semantic.index import FlatIndex

Q = "What is the capital city of France?"
NEAR = "what is the capital city of France"  # case and punctuation changed
FAR = "How many legs does a spider have?"
CTX = context_key(system="geography")


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def make(threshold=0.8, **kwargs):
    clock = Clock()
    cfg = SemanticCacheConfig(threshold=threshold, **{k: v for k, v in kwargs.items() if k != "index_factory"})
    extra = {"index_factory": kwargs["index_factory"]} if "index_factory" in kwargs else {}
    return SemanticCache(HashingEmbedder(), cfg, clock=clock, **extra), clock


def test_a_near_question_hits_and_a_far_one_misses():
    sc, _ = make()
    sc.store(Q, "Paris", CTX)
    hit = sc.lookup(NEAR, CTX)
    assert hit is not None and hit.answer == "Paris" and hit.question == Q and hit.similarity >= 0.8
    assert sc.lookup(FAR, CTX) is None
    assert (sc.stats.hits, sc.stats.misses, sc.stats.stores) == (1, 1, 1)


def test_the_threshold_decides():
    sc, _ = make(threshold=1.0)  # only the identical question (after whitespace collapse) hits
    sc.store(Q, "Paris", CTX)
    assert sc.lookup(NEAR, CTX) is None
    assert sc.lookup("  What is the capital   city of France? ", CTX).answer == "Paris"


def test_never_across_tenants_or_contexts():
    sc, _ = make()
    sc.store(Q, "Paris", CTX, tenant="a")
    # The very same question: a miss in every other partition.
    assert sc.lookup(Q, CTX, tenant="b") is None
    assert sc.lookup(Q, context_key(system="geography", history=["hi"]), tenant="a") is None
    assert sc.lookup(Q, CTX, tenant="a").answer == "Paris"


def test_partitions_have_separate_indexes():
    made = []

    def factory(dim):
        made.append(FlatIndex(dim))
        return made[-1]

    sc, _ = make(index_factory=factory)
    sc.store(Q, "Paris", CTX, tenant="a")
    sc.store(Q, "Lyon", CTX, tenant="b")
    sc.store(FAR, "eight", CTX, tenant="b")
    # Two partitions, two indexes; tenant b's index never held tenant a's entry.
    assert [len(ix) for ix in made] == [1, 2]
    assert sc.lookup(NEAR, CTX, tenant="b").answer == "Lyon"


def test_ttl_expiry_on_an_injected_clock():
    sc, clock = make(ttl_s=60)
    sc.store(Q, "Paris", CTX)
    clock.now += 59
    assert sc.lookup(NEAR, CTX).age_s == 59
    clock.now += 1  # 60 s old: expired, dropped when met
    assert sc.lookup(NEAR, CTX) is None
    assert sc.stats.expired == 1 and len(sc) == 0


def test_purge_expired():
    sc, clock = make(ttl_s=10)
    sc.store(Q, "Paris", CTX)
    clock.now += 5
    sc.store(FAR, "eight", CTX)
    clock.now += 6  # the first is 11 s old, the second 6 s
    assert sc.purge_expired() == 1 and len(sc) == 1


def test_size_bound_evicts_the_least_recently_used():
    sc, _ = make(max_entries=2)
    sc.store(Q, "Paris", CTX)
    sc.store(FAR, "eight", CTX)
    sc.lookup(NEAR, CTX)  # Q is now the most recently used
    sc.store("Who wrote Hamlet?", "Shakespeare", CTX)
    assert len(sc) == 2 and sc.stats.evicted == 1
    assert sc.lookup(FAR, CTX) is None and sc.lookup(NEAR, CTX).answer == "Paris"


@pytest.mark.parametrize("kwargs", [dict(threshold=1.5), dict(ttl_s=0), dict(max_entries=0), dict(top_k=0)])
def test_bad_configs(kwargs):
    with pytest.raises(ValueError):
        SemanticCacheConfig(**kwargs)


def test_context_key_is_a_content_hash():
    assert context_key(a=1, b=[1, 2]) == context_key(b=[1, 2], a=1)
    assert context_key(a=1, b=[1, 2]) != context_key(a=1, b=[2, 1])
    assert len(context_key()) == 64 and int(context_key(), 16) >= 0


def test_hashing_embedder_rows_are_unit_norm_and_deterministic():
    v = HashingEmbedder().embed([Q, FAR, ""])
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0)
    assert np.array_equal(v, HashingEmbedder().embed([Q, FAR, ""]))
