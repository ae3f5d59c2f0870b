"""Pools for pages made in memory: equal slots with an LRU that ranks them in bulk, and a heap of
working pages.

Pages created in memory by the model (KV blocks) are many (tens of thousands at 128K tokens), all
of one size, and read in bulk by index (a decode step gathers rows of hundreds of blocks with one
tensor indexing). :class:`SlotPool` keeps them as rows of one table ``uint8 [slots, R]``, so a
page's block is a row (``Block.offset == slot * R``) and its owner can index the table by slot
numbers; :class:`SlotLRU` keeps the last use of every slot in an array, so a step that used
hundreds of pages tells it with one vectorised ``touch_slots``.

The table is one anonymous mapping of the arena's whole budget, committed page by page as rows
are first written (an unused budget costs no memory). Without a budget (``limit=None``) it grows
by doubling, copying the rows: an owner that keeps the table must fetch it again after allocating.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator

import numpy as np
import torch

from flashtier.errors import BudgetError
from flashtier.tiers import hugepages
from flashtier.tiers.base import Block, TierPool
from flashtier.tiers.policies import EvictionPolicy, Key

UNLIMITED = 1 << 62
"""The capacity an unbudgeted slot pool reports."""


class SlotPool(TierPool):
    """``limit`` slots of ``record_bytes`` each in host memory (module docstring). Not
    thread-safe (the store locks)."""

    stable_views = False  # the table is reallocated to grow

    def __init__(self, name: str, record_bytes: int, limit: int | None, initial: int = 16,
                 huge_pages: bool = True) -> None:
        """``huge_pages``: advise the slot table for transparent huge pages."""
        if record_bytes <= 0:
            raise ValueError(f"a slot must hold at least one byte, got {record_bytes}")
        if limit is not None and limit < 1:
            raise ValueError(f"a slot pool needs at least one slot, got a limit of {limit}")
        self.name = name
        self.record_bytes = record_bytes
        self._limit = limit
        self._huge_pages = huge_pages
        self._mapping: mmap.mmap | None = None
        self._table = self._new_table(limit if limit is not None else initial)  # uint8 [slots, R]
        self._free: list[int] = list(range(self._table.shape[0] - 1, -1, -1))  # pop() = lowest first
        self._used = 0
        self._high_water = 0

    def _new_table(self, slots: int) -> torch.Tensor:
        nbytes = slots * self.record_bytes
        try:
            self._mapping = hugepages.anonymous(max(nbytes, 1), huge=self._huge_pages)
        except OSError as e:
            raise BudgetError(f"cannot map {nbytes} bytes for the {self.name} slots: {e}; lower the budget") from e
        with torch.inference_mode(False):  # long-lived state: writable outside a forward's inference mode
            return torch.frombuffer(self._mapping, dtype=torch.uint8)[:nbytes].view(slots, self.record_bytes)

    # -- TierPool ----------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return UNLIMITED if self._limit is None else self._limit * self.record_bytes

    @property
    def used(self) -> int:
        return self._used * self.record_bytes

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def largest_hole(self) -> int:
        return self.record_bytes if self._used < self.slot_limit else 0

    def block_size(self, nbytes: int) -> int:
        return self.record_bytes if nbytes <= self.record_bytes else UNLIMITED

    def try_allocate(self, nbytes: int) -> Block | None:
        if nbytes > self.record_bytes or self._used >= self.slot_limit:
            return None
        if not self._free:
            self._grow(2 * self._table.shape[0])
        slot = self._free.pop()
        self._used += 1
        self._high_water = max(self._high_water, slot + 1)
        return Block(slot * self.record_bytes, self.record_bytes)

    def release(self, block: Block) -> None:
        slot = block.offset // self.record_bytes
        self._free.append(slot)
        self._used -= 1

    def view(self, block: Block, byte_offset: int, nbytes: int) -> torch.Tensor:
        if byte_offset < 0 or byte_offset + nbytes > self.record_bytes:
            raise ValueError(f"view [{byte_offset}, {byte_offset + nbytes}) lies outside a {self.record_bytes}-byte slot")
        return self._table[block.offset // self.record_bytes, byte_offset : byte_offset + nbytes]

    def buffer(self, block: Block) -> memoryview:
        return memoryview(self._table[block.offset // self.record_bytes].numpy())

    # -- slots -------------------------------------------------------------------------------

    @property
    def table(self) -> torch.Tensor:
        """All slots ``uint8 [slots, R]`` (replaced when an unbudgeted pool grows)."""
        return self._table

    @property
    def slot_limit(self) -> int:
        """Most slots the pool may hold now."""
        return UNLIMITED if self._limit is None else self._limit

    @property
    def touched_bytes(self) -> int:
        """Bytes of the slots ever handed out (what the process has committed for the table)."""
        return self._high_water * self.record_bytes

    def slot_of(self, block: Block) -> int:
        return block.offset // self.record_bytes

    def set_limit(self, slots: int) -> None:
        """Lower or raise the slots the pool may hold (raising past the table reallocates it); the
        caller evicts first so that ``used`` fits."""
        if self._limit is None:
            raise ValueError(f"the {self.name} slots have no budget to lower")
        if slots > self._table.shape[0]:
            self._grow(slots)
        self._limit = max(0, slots)

    def _grow(self, slots: int) -> None:
        old = self._table
        self._table = self._new_table(slots)
        self._table[: old.shape[0]] = old
        self._free.extend(range(slots - 1, old.shape[0] - 1, -1))

    def check(self) -> None:
        """Assert the free list and the count agree (for tests)."""
        assert len(set(self._free)) == len(self._free), "a slot is free twice"
        assert self._used + len(self._free) == self._table.shape[0], "slots lost"
        assert self._used <= self.slot_limit, "over the slot limit"


class SlotLRU(EvictionPolicy):
    """Least recently used over the slots of one :class:`SlotPool`, with bulk touches.

    The clock advances on ``tick`` (the owner ticks once per operation: a put, a gather), every
    page touched in that operation gets the same time, and victims come oldest first (ties: the
    lowest slot)."""

    def __init__(self, pool: SlotPool) -> None:
        self._pool = pool
        self._slot_of: dict[Key, int] = {}
        self._key_of: dict[int, Key] = {}
        self._last = np.zeros(0, dtype=np.int64)
        self._clock = 0

    def place(self, key: Key, block: Block) -> None:
        slot = self._pool.slot_of(block)
        self._slot_of[key] = slot
        self._key_of[slot] = key
        if slot >= self._last.shape[0]:
            grown = np.zeros(max(2 * self._last.shape[0], slot + 1, 16), dtype=np.int64)
            grown[: self._last.shape[0]] = self._last
            self._last = grown

    def insert(self, key: Key, nbytes: int, reload_cost_s: float) -> None:
        if key not in self._slot_of:
            raise ValueError(f"slot policy: page {key!r} arrived without a slot (place it first)")
        self._last[self._slot_of[key]] = self._clock

    def touch(self, key: Key) -> None:
        slot = self._slot_of.get(key)
        if slot is not None:
            self._last[slot] = self._clock

    def touch_slots(self, slots: np.ndarray) -> None:
        """Touch the pages in ``slots`` (occupied slots of the pool) at once."""
        self._last[slots] = self._clock

    def remove(self, key: Key) -> None:
        slot = self._slot_of.pop(key)
        del self._key_of[slot]

    def victims(self) -> Iterator[Key]:
        if not self._key_of:
            return
        slots = np.fromiter(self._key_of, dtype=np.int64, count=len(self._key_of))
        ages = self._last[slots]
        oldest = ages == ages.min()  # usually one victim is enough: avoid sorting them all
        first = int(slots[oldest].min())
        yield self._key_of[first]
        for i in np.lexsort((slots, ages)):
            if int(slots[i]) != first:
                yield self._key_of[int(slots[i])]

    def tick(self) -> None:
        self._clock += 1

    def __len__(self) -> int:
        return len(self._slot_of)


class HeapPool(TierPool):
    """Working pages allocated one by one (each its own zeroed tensor), at most ``limit`` bytes
    together: for pages of varying sizes that come and go (the block pools of full-attention KV
    caches: the conversation's and each batched sequence's). Not thread-safe (the store locks)."""

    def __init__(self, name: str, limit: int | None = None, zeroed: bool = True) -> None:
        """``limit``: the most bytes its pages may take together (None: no limit). ``zeroed``: pages
        start zeroed (False: uninitialised, committed by the OS only as they are written)."""
        self.name = name
        self.limit = limit
        self.zeroed = zeroed
        self._pages: dict[int, torch.Tensor] = {}
        self._ids = 0
        self._used = 0

    @property
    def capacity(self) -> int:
        return UNLIMITED if self.limit is None else self.limit

    @property
    def used(self) -> int:
        return self._used

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def largest_hole(self) -> int:
        return self.capacity - self._used

    def block_size(self, nbytes: int) -> int:
        return nbytes

    def try_allocate(self, nbytes: int) -> Block | None:
        if self.limit is not None and self._used + nbytes > self.limit:
            return None
        self._ids += 1
        alloc = torch.zeros if self.zeroed else torch.empty
        with torch.inference_mode(False):  # long-lived state: writable outside a forward's inference mode
            self._pages[self._ids] = alloc(max(nbytes, 1), dtype=torch.uint8)
        self._used += nbytes
        return Block(self._ids, nbytes)

    def release(self, block: Block) -> None:
        del self._pages[block.offset]
        self._used -= block.nbytes

    def view(self, block: Block, byte_offset: int, nbytes: int) -> torch.Tensor:
        return self._pages[block.offset][byte_offset : byte_offset + nbytes]

    def buffer(self, block: Block) -> memoryview:
        return memoryview(self._pages[block.offset].numpy())

    def check(self) -> None:
        """Assert every page is counted (for tests)."""
        assert self._used <= sum(b.numel() for b in self._pages.values()), "heap pool accounting"
