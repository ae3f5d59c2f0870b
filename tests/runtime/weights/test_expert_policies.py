"""Expert-cache eviction scenarios, narrated: which expert is hit, missed, evicted, step by step.

A layer's expert cache is a TieredStore whose host tier holds a few expert pages; the forward
acquires each expert it routes to, the predictor prefetches, and each decode step ends with
``tick`` (the step clock of the ``least-stale`` policy).
"""

from __future__ import annotations

import pytest
from flashtier.errors import ConfigError
from flashtier.storage_backends import MemoryBackend
from flashtier.tiers import PageDesc, PageSource, StoreConfig, TieredStore
from flashtier.tiers.policies import make_policy

EXPERT = 4096  # one host block per expert page
NAMES = "ABCDEF"


def cache(policy: str, slots: int = 2, **_: object) -> TieredStore:
    backend = MemoryBackend()
    backend.add_file("experts", bytes(range(256)) * (EXPERT * len(NAMES) // 256))
    store = TieredStore(StoreConfig(host_budget=slots * EXPERT, host_policy=policy), backend)
    for k, name in enumerate(NAMES):
        store.register(PageDesc(name, PageSource("experts", k * EXPERT, EXPERT)))
    return store


def cached(store: TieredStore) -> str:
    return "".join(n for n in NAMES if store.location(n).tier == "host")


def use(store: TieredStore, name: str) -> str:
    """Route to expert ``name``: 'hit' or 'miss'."""
    hit = store.location(name).tier == "host"
    store.acquire(name)
    store.release(name)
    return "hit" if hit else "miss"


def test_least_stale_scores_frequency_over_steps_not_only_recency():
    p = make_policy("least-stale", half_life=2.0)
    # step 0: experts 0 and 1 are used
    p.insert(0, EXPERT, 0.0)
    p.insert(1, EXPERT, 0.0)
    p.tick()
    # step 1: 0 again, 2 arrives
    p.insert(2, EXPERT, 0.0)
    p.touch(0)
    p.tick()
    # step 2: 0 again, 3 arrives
    p.insert(3, EXPERT, 0.0)
    p.touch(0)
    p.tick()
    # step 3: 4 and 5 arrive (4 touched thrice: one use per step); 0 is not used this step
    for key in (4, 4, 4, 5):
        p.touch(key) if key in list(p.victims()) else p.insert(key, EXPERT, 0.0)
    # scores now: 1: 0.35, 2: 0.5, 3: 0.71, 4 and 5: 1.0, 0: 1.56 -> 0 outlives the newcomers
    assert list(p.victims()) == [1, 2, 3, 4, 5, 0]
    lru = make_policy("lru")
    for key in (0, 1, 2, 0, 3, 0, 4, 5):
        lru.touch(key) if key in list(lru.victims()) else lru.insert(key, EXPERT, 0.0)
    assert list(lru.victims()) == [1, 2, 3, 0, 4, 5]  # LRU would drop 0 before 4 and 5


def test_least_stale_remembers_evicted_experts():
    p = make_policy("least-stale", half_life=8.0)
    for _ in range(3):  # expert 0 used three steps in a row
        p.touch(0) if len(p) else p.insert(0, EXPERT, 0.0)
        p.tick()
    p.evict(0)
    p.insert(1, EXPERT, 0.0)
    p.insert(0, EXPERT, 0.0)  # 0 comes back with its record, 1 is new
    assert list(p.victims()) == [1, 0]
    with pytest.raises(ConfigError, match="half_life"):
        make_policy("least-stale", half_life=0)


@pytest.mark.parametrize("policy, evicted", [("lru", "BA"), ("least-stale", "BC")])
def test_two_slot_cache_scenario(policy, evicted):
    store = cache(policy)
    gone = []
    # step 1: A, B -> two misses; cache AB
    assert [use(store, x) for x in "AB"] == ["miss", "miss"]
    store.tick()
    # step 2: A hits; C misses and evicts B (both policies: B is older and used once)
    assert [use(store, x) for x in "AC"] == ["hit", "miss"]
    gone.append(({"A", "B", "C"} - set(cached(store))).pop())
    store.tick()
    # step 3: B misses. LRU evicts A (used before C in step 2); least-stale evicts C, because A
    # was used in every step so far and C in one.
    assert use(store, "B") == "miss"
    gone.append(({"A", "B", "C"} - set(cached(store))).pop())
    assert "".join(gone) == evicted
    store.check_invariants()
    store.close()


def test_predicted_experts_are_protected_until_used_or_cancelled():
    store = cache("least-stale")
    for x in "AB":
        use(store, x)
    store.tick()
    # the predictor names C and D for the next step: they replace A and B
    assert store.prefetch("C") is not None and store.prefetch("D") is not None
    store.wait(store.prefetch("C"))
    store.wait(store.prefetch("D"))
    assert cached(store) == "CD"
    # a third guess finds no room: C and D are protected until used
    assert store.prefetch("E") is None
    # the layer routes to C only: D was mispredicted and is withdrawn
    assert use(store, "C") == "hit"
    store.cancel_prefetch("D")
    job = store.prefetch("E")  # now E may take D's slot
    assert job is not None
    store.wait(job)
    assert cached(store) == "CE"
    # a demand always finds room, even against an unused prediction
    store.prefetch("F")
    assert use(store, "A") == "miss"
    store.check_invariants()
    store.close()


def test_one_slot_cache_still_serves_two_experts_per_step():
    store = cache("least-stale", slots=1)
    for _ in range(3):
        assert [use(store, x) for x in "AB"] == ["miss", "miss"]  # each evicts the other
        store.tick()
    store.check_invariants()
    store.close()
