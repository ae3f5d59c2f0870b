"""Neuron window bookkeeping: which neurons are loaded, kept, dropped, and where their rows go."""

from __future__ import annotations

import numpy as np
import pytest

from flashtier.errors import ConfigError
from flashtier.prefetch.windowing import NeuronWindow, RowMatrix, WindowConfig


def ids(a) -> list[int]:
    return [int(x) for x in a]


def check_invariants(w: NeuronWindow) -> None:
    held = w.neuron_of_row[: w.n]
    assert len(set(ids(held))) == w.n
    assert all(w.row_of[n] == r for r, n in enumerate(held))
    assert (w.row_of >= 0).sum() == w.n


def test_window_keeps_neurons_used_in_the_last_k_tokens():
    w = NeuronWindow(10, WindowConfig(k=2, capacity=10))
    # token 1 needs [3, 1] -> load both (sorted, so adjacent ids get adjacent rows)
    p = w.plan(np.array([3, 1]))
    assert ids(p.loads) == [1, 3] and p.rows_start == 0 and p.n == 2 and ids(p.evicted) == []
    # token 2 needs [1, 5] -> 1 is held (kept), 3 was used 1 token ago (kept, k=2), load 5
    p = w.plan(np.array([1, 5]))
    assert ids(p.loads) == [5] and ids(p.evicted) == [] and sorted(ids(w.held())) == [1, 3, 5]
    # token 3 needs [5] -> 3 (last used at token 1) leaves; 1 (token 2) stays
    p = w.plan(np.array([5]))
    assert ids(p.loads) == [] and ids(p.evicted) == [3] and sorted(ids(w.held())) == [1, 5]
    # token 4 needs [] -> 1 (token 2) leaves, 5 (token 3) stays
    p = w.plan(np.array([], dtype=np.int64))
    assert ids(p.evicted) == [1] and ids(w.held()) == [5]
    check_invariants(w)


def test_deletion_moves_the_last_rows_into_the_freed_slots():
    w = NeuronWindow(20, WindowConfig(k=1, capacity=8))
    w.plan(np.array([0, 1, 2, 3, 4, 5]))  # rows 0..5 hold neurons 0..5
    # next token needs [2, 5, 9]: evict 0, 1, 3, 4; new count 2; the kept rows past it
    # (row 2 -> neuron 2, row 5 -> neuron 5) move down into the freed rows 0 and 1
    p = w.plan(np.array([2, 5, 9]))
    assert ids(p.evicted) == [0, 1, 3, 4]
    assert ids(p.moves_src) == [2, 5] and ids(p.moves_dst) == [0, 1]
    assert ids(p.loads) == [9] and p.rows_start == 2 and p.n == 3
    assert ids(w.held()) == [2, 5, 9]
    check_invariants(w)


def test_the_row_matrix_follows_the_plan():
    w = NeuronWindow(20, WindowConfig(k=1, capacity=6))
    m = RowMatrix(6, 512)
    for step_needed in ([4, 1, 7], [7, 9, 1], [2, 3, 4, 5, 6, 9], [9]):
        p = w.plan(np.array(step_needed))
        m.apply(p)
        m.rows(p.rows_start, p.n)[:, 0] = p.loads  # "read" neuron id into its row
        assert ids(m.array[: w.n, 0]) == ids(w.held())  # every row holds the neuron the window says
        check_invariants(w)


def test_capacity_evicts_least_recently_used_then_drops_lowest_priority():
    w = NeuronWindow(10, WindowConfig(k=4, capacity=3))
    w.plan(np.array([0]))  # token 1
    w.plan(np.array([1]))  # token 2
    w.plan(np.array([2]))  # token 3: all within k, window full
    # token 4 needs [5, 2]: room for one more after LRU eviction of neuron 0 (last used token 1)
    p = w.plan(np.array([5, 2]))
    assert ids(p.evicted) == [0] and ids(p.loads) == [5] and sorted(ids(w.held())) == [1, 2, 5]
    # token 5 needs [6, 7, 8, 9] (best first): only 3 rows exist -> 6, 7, 8 loaded, 9 dropped
    p = w.plan(np.array([6, 7, 8, 9]))
    assert sorted(ids(p.evicted)) == [1, 2, 5] and ids(p.loads) == [6, 7, 8] and ids(p.dropped) == [9]
    check_invariants(w)


def test_held_neurons_not_needed_age_out_after_k_tokens():
    w = NeuronWindow(10, WindowConfig(k=2, capacity=10))
    w.plan(np.array([1]))  # token 1 loads 1
    w.plan(np.array([2]))  # token 2 loads 2; 1 stays (used within the last 2 tokens)
    assert sorted(ids(w.held())) == [1, 2]
    w.plan(np.array([3]))  # token 3: 1 (last used token 1) leaves, 2 stays
    assert sorted(ids(w.held())) == [2, 3]
    w.plan(np.array([3]))  # token 4: 2 (token 2) leaves
    assert ids(w.held()) == [3]


def test_k0_reloads_everything_each_token():
    w = NeuronWindow(10, WindowConfig(k=0, capacity=10))
    w.plan(np.array([1, 2]))
    p = w.plan(np.array([2, 3]))
    assert ids(p.loads) == [2, 3] and sorted(ids(p.evicted)) == [1, 2]
    check_invariants(w)


def test_reset_forgets_everything():
    w = NeuronWindow(10, WindowConfig(k=3, capacity=10))
    w.plan(np.array([1, 2, 3]))
    w.reset()
    assert w.n == 0 and ids(w.plan(np.array([2])).loads) == [2]
    check_invariants(w)


def test_random_sequences_keep_the_invariants():
    rng = np.random.default_rng(0)
    w = NeuronWindow(64, WindowConfig(k=3, capacity=20))
    m = RowMatrix(20, 512)
    history: list[set[int]] = []
    for _ in range(300):
        needed = rng.choice(64, rng.integers(0, 12), replace=False)
        p = w.plan(needed)
        m.apply(p)
        m.rows(p.rows_start, p.n)[:, 0] = p.loads
        history.append(set(ids(needed)) - set(ids(p.dropped)))
        check_invariants(w)
        assert ids(m.array[: w.n, 0]) == ids(w.held())
        assert set(ids(needed)) - set(ids(p.dropped)) <= set(ids(w.held()))
        if w.n < w.capacity:  # without capacity pressure the window is exactly the last k tokens
            assert set(ids(w.held())) == set().union(*history[-3:])


def test_config_is_validated():
    with pytest.raises(ConfigError, match="k must be >= 0"):
        WindowConfig(k=-1)
    with pytest.raises(ConfigError, match="raise --dram-budget"):
        WindowConfig(capacity=0)
