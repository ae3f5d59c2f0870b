"""The slab sub-allocator (random alloc/free keeps its invariants) and each eviction policy's
order, written out as small scenarios."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flashtier.errors import ConfigError
from flashtier.tiers import available_policies, make_policy, register_policy
from flashtier.tiers.allocator import RangeAllocator
from flashtier.tiers.policies import LruPolicy

# -- allocator -----------------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(1, 5000)), max_size=60))
def test_random_allocations_never_overlap_or_exceed_capacity(ops):
    alloc = RangeAllocator(capacity=32 * 1024, alignment=512)
    live: dict[int, int] = {}
    for is_alloc, size in ops:
        if is_alloc or not live:
            offset = alloc.allocate(size)
            if offset is None:
                # refused only when no hole is large enough
                assert alloc.largest_hole() < alloc.rounded(size)
            else:
                assert offset % 512 == 0
                live[offset] = alloc.rounded(size)
        else:
            offset = sorted(live)[size % len(live)]
            assert alloc.free(offset) == live.pop(offset)
        alloc.check()
        assert alloc.used == sum(live.values()) <= alloc.capacity
    for offset in list(live):
        alloc.free(offset)
    # everything coalesces back into one hole
    assert alloc.largest_hole() == alloc.capacity and alloc.used == 0


def test_best_fit_keeps_the_large_hole_for_large_pages():
    alloc = RangeAllocator(capacity=10, alignment=1)
    a, b, c = alloc.allocate(2), alloc.allocate(3), alloc.allocate(5)
    assert (a, b, c) == (0, 2, 5)
    alloc.free(a)  # hole of 2 at 0
    alloc.free(c)  # hole of 5 at 5
    # a 2-byte request takes the 2-byte hole, leaving the 5-byte hole whole
    assert alloc.allocate(2) == 0
    assert alloc.allocate(5) == 5


def test_freeing_an_unknown_offset_is_an_error():
    with pytest.raises(ValueError, match="not an allocated range"):
        RangeAllocator(100, 1).free(3)


# -- policies ------------------------------------------------------------------------------------


def order(policy) -> list:
    return list(policy.victims())


def test_lru_evicts_least_recently_used():
    p = make_policy("lru")
    for k in "abc":
        p.insert(k, 100, 1.0)
    p.touch("a")  # use a -> b is now the oldest
    assert order(p) == ["b", "c", "a"]
    p.evict("b")
    assert order(p) == ["c", "a"] and len(p) == 2


def test_mru_evicts_most_recently_used():
    p = make_policy("mru")
    for k in "abc":
        p.insert(k, 100, 1.0)
    p.touch("a")
    assert order(p) == ["a", "c", "b"]


def test_lfu_evicts_least_frequently_used_then_least_recent():
    p = make_policy("lfu")
    for k in "abc":
        p.insert(k, 100, 1.0)
    p.touch("a"), p.touch("a"), p.touch("c")
    # counts a=3, b=1, c=2
    assert order(p) == ["b", "c", "a"]
    p.insert("d", 100, 1.0)  # d=1, more recent than b
    assert order(p)[:2] == ["b", "d"]


def test_cost_policy_keeps_pages_expensive_to_reload_per_byte():
    p = make_policy("cost")
    # same reload latency: the small page costs more per byte to bring back
    p.insert("small", 4096, 1e-3)
    p.insert("large", 8 << 20, 1e-3 + 8e-3)
    assert order(p) == ["large", "small"]


def test_cost_policy_ages_pages_not_touched_since():
    p = make_policy("cost")
    # a (cheap) and b (dearer), same size -> a goes first
    p.insert("a", 100, 1.0)
    p.insert("b", 100, 1.5)
    assert order(p) == ["a", "b"]
    # evict a -> the floor rises to a's priority; a new cheap page c now outranks the idle b
    p.evict("a")
    p.insert("c", 100, 1.0)
    assert order(p) == ["b", "c"]
    # touching b lifts it above c again
    p.touch("b")
    assert order(p) == ["c", "b"]


def test_lrfu_weighs_frequency_against_recency():
    # the score halves every 2 accesses to the tier
    p = make_policy("lrfu", half_life=2.0)
    p.insert("hot", 100, 1.0)
    for _ in range(5):
        p.touch("hot")  # used 6 times in a row
    p.insert("new", 100, 1.0)
    # frequency wins: one recent use is worth less than hot's decayed history
    assert order(p) == ["new", "hot"]
    for k in "wxyz":
        p.insert(k, 100, 1.0)
    # 4 accesses later hot has decayed below the pages used 1-2 accesses ago, not below older ones
    assert order(p) == ["new", "w", "x", "hot", "y", "z"]


def test_registry_by_name():
    assert {"lru", "mru", "lfu", "cost", "lrfu"} <= set(available_policies())
    with pytest.raises(ConfigError, match="choose one of"):
        make_policy("random")
    with pytest.raises(ValueError, match="already registered"):
        register_policy("lru")(LruPolicy)
