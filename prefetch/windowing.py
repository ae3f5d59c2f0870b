"""Neuron windowing ("LLM in a flash"): keep the FFN neurons used in the last k tokens in DRAM.

Per sparse FFN layer there is one preallocated matrix of neuron rows (:class:`RowMatrix`, bytes)
and one :class:`NeuronWindow` (bookkeeping: which neuron is in which row, when it was last used).
Each token the window is told which neurons the token needs (the predictor's choice, best first);
:meth:`NeuronWindow.plan` answers with a :class:`WindowPlan`:

  * evict the neurons not used in the last ``k`` tokens (this one included); if the new ones still
    do not fit, also the least recently used ones not needed now;
  * deletion keeps the used rows dense: the freed slots below the new row count are filled by
    moving the last used rows down (``moves``); nothing else moves;
  * the needed neurons not held (``loads``, sorted by id so runs of adjacent neurons get adjacent
    rows and read as one extent) are appended at ``rows_start``; what does not fit even then is
    ``dropped`` (lowest priority first).

A speculative prefetch may come first: ``plan(guess, tentative=True)`` loads a guess made before
the token's real selection is known, and ``extend(selected)`` then adds what the guess missed
(within the same token; unconfirmed guesses are the first rows given up for room).

A token's needed neurons count as used at that token; a held neuron it does not need ages out after
``k`` tokens. (The sparse FFN computes each row over its own selection only, so what the window
holds besides changes what is read, never what is computed.) Invariants:
``row_of[neuron_of_row[r]] == r`` for every ``r < n``; a neuron is held iff it has a row;
``n <= capacity``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from flashtier.errors import ConfigError
from flashtier.storage_backends.aligned import allocate_aligned

_NONE = np.iinfo(np.int64).min  # "never used": older than any step


@dataclass(frozen=True, slots=True)
class WindowConfig:
    """Windowing of one layer."""

    k: int = 4
    """Tokens a used neuron stays held (the window length, current token included); 0 turns
    windowing off (every token reads all it needs: the "predictor only" ablation)."""
    capacity: int = 1024
    """Rows of the preallocated matrix: the most neurons held at once."""

    def __post_init__(self) -> None:
        if self.k < 0:
            raise ConfigError(f"window k must be >= 0 tokens, got {self.k}")
        if self.capacity < 1:
            raise ConfigError(f"window capacity must be >= 1 row, got {self.capacity}; raise --dram-budget")


@dataclass(frozen=True, slots=True)
class WindowPlan:
    """What one token's step changes: apply ``moves`` (row ``src[j]`` -> row ``dst[j]``), then read
    ``loads`` into rows ``rows_start .. rows_start + len(loads) - 1``; afterwards ``n`` rows are used."""

    moves_src: np.ndarray
    moves_dst: np.ndarray
    loads: np.ndarray
    """Neuron ids to read, ascending."""
    rows_start: int
    n: int
    evicted: np.ndarray
    """Neuron ids that left the window."""
    dropped: np.ndarray
    """Needed neuron ids that did not fit (capacity), not loaded."""


class NeuronWindow:
    """Which neurons of one layer are held, in which rows (bookkeeping only; see module doc)."""

    def __init__(self, neurons: int, config: WindowConfig) -> None:
        if neurons < 1:
            raise ConfigError(f"a layer needs at least one neuron, got {neurons}")
        self.neurons = neurons
        self.config = config
        self.capacity = min(config.capacity, neurons)
        self.step = 0
        self.n = 0
        self.neuron_of_row = np.zeros(self.capacity, dtype=np.int64)
        self.row_of = np.full(neurons, -1, dtype=np.int64)  # -1: not held
        self.last_used = np.full(neurons, _NONE, dtype=np.int64)

    def held(self) -> np.ndarray:
        """Neuron ids held, in row order (row 0 first)."""
        return self.neuron_of_row[: self.n].copy()

    def plan(self, needed: np.ndarray, *, tentative: bool = False) -> WindowPlan:
        """Advance one token needing ``needed`` (unique ids, highest priority first) and return the
        changes; the bookkeeping already reflects them (apply the plan's moves before reading).

        ``tentative``: ``needed`` is only a guess (a speculative prefetch before the token's real
        selection is known): new rows are not stamped as used, so they are the first to go when
        :meth:`extend` needs room and leave at the next token unless the token uses them."""
        self.step += 1
        return self._admit(np.asarray(needed, dtype=np.int64), window_evict=True, stamp=not tentative)

    def extend(self, needed: np.ndarray) -> WindowPlan:
        """Within the current token, also hold ``needed`` (the real selection after a tentative
        :meth:`plan`): only rows not needed now are evicted for room, least recently used first."""
        return self._admit(np.asarray(needed, dtype=np.int64), window_evict=False, stamp=True)

    def _admit(self, needed: np.ndarray, window_evict: bool, stamp: bool) -> WindowPlan:
        step, k = self.step, self.config.k
        need_mask = np.zeros(self.neurons, dtype=bool)
        need_mask[needed] = True
        held_ids = self.neuron_of_row[: self.n]
        missing = needed[self.row_of[needed] < 0]  # priority order

        keep = np.ones(self.n, dtype=bool)
        if window_evict:  # 1. the window: drop what was not used in the last k tokens, not needed now
            keep = (self.last_used[held_ids] > step - k) | need_mask[held_ids]
            if k == 0:
                keep[:] = False
                missing = needed
        # 2. still short of room: drop least recently used not needed now
        short = len(missing) - (self.capacity - int(keep.sum()))
        if short > 0:
            cand = np.flatnonzero(keep & ~need_mask[held_ids])
            order = cand[np.argsort(self.last_used[held_ids[cand]], kind="stable")]
            keep[order[:short]] = False
        # 3. still short: load only the highest-priority missing neurons
        room = self.capacity - int(keep.sum())
        dropped = missing[room:]
        loads = np.sort(missing[:room])

        evict_rows = np.flatnonzero(~keep)
        evicted = held_ids[evict_rows].copy()
        new_n = self.n - evict_rows.size
        holes = evict_rows[evict_rows < new_n]
        fillers = np.flatnonzero(keep[new_n:]) + new_n  # kept rows past the new end
        self.row_of[evicted] = -1
        self.last_used[evicted] = _NONE
        self.neuron_of_row[holes] = self.neuron_of_row[fillers]
        self.row_of[self.neuron_of_row[holes]] = holes
        rows = np.arange(new_n, new_n + loads.size)
        self.neuron_of_row[rows] = loads
        self.row_of[loads] = rows
        self.n = new_n + loads.size
        if stamp:
            used = needed[self.row_of[needed] >= 0]
            self.last_used[used] = step
        return WindowPlan(fillers, holes, loads, new_n, self.n, evicted, dropped)

    def reset(self) -> None:
        """Forget everything (the matrix contents become meaningless)."""
        self.row_of[self.neuron_of_row[: self.n]] = -1
        self.last_used[:] = _NONE
        self.n = 0


class RowMatrix:
    """A preallocated, page-aligned ``[capacity, row_bytes]`` uint8 matrix of neuron rows.

    Rows are read into directly from storage (O_DIRECT needs aligned addresses: ``row_bytes`` must
    be a multiple of the read alignment). ``apply`` performs a plan's moves."""

    def __init__(self, capacity: int, row_bytes: int, buffer: torch.Tensor | None = None) -> None:
        """``buffer``: the matrix's memory (``uint8 [capacity * row_bytes]``, page-aligned, e.g. a
        working page reserved in the store's window arena); None = allocate one."""
        self.capacity = capacity
        self.row_bytes = row_bytes
        if buffer is not None:
            if buffer.dtype != torch.uint8 or buffer.numel() != capacity * row_bytes:
                raise ValueError(f"a {capacity} x {row_bytes} row matrix needs {capacity * row_bytes} bytes, "
                                 f"got {buffer.numel()} {buffer.dtype}")
            self._buf = buffer.numpy()
        else:
            self._buf = allocate_aligned(capacity * row_bytes)
        self.array = np.frombuffer(self._buf, dtype=np.uint8).reshape(capacity, row_bytes)
        self.tensor = torch.from_numpy(self.array)  # shares memory

    @property
    def nbytes(self) -> int:
        return self.capacity * self.row_bytes

    def apply(self, plan: WindowPlan) -> None:
        """Move rows as the plan says (sources all lie past destinations: no overlap)."""
        if plan.moves_src.size:
            self.array[plan.moves_dst] = self.array[plan.moves_src]

    def rows(self, start: int, stop: int) -> np.ndarray:
        """A writable view of rows ``start .. stop - 1``."""
        return self.array[start:stop]
