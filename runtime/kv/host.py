"""Host tier of KV blocks: one slot pool for every layer, under a byte budget, spilling to storage.

Blocks arrive here when they leave the device window (``put``) and never change afterwards. Each
block is in exactly one of: a host slot (and maybe also on storage), or on storage only. When the
host tier is over its budget, the least recently used blocks are dropped from host memory, written
to storage first if they were never written (:class:`~flashtier.runtime.kv.spill.KVSpillStore`,
write-once). ``gather`` reads rows of one kv head (decode: the retrieved positions) and brings the
spilled blocks it needs back into host slots when there is room, else reads them through.
``read_blocks`` serves the exact prefill, which scans a layer's blocks in order, reading spilled
ones through without caching them (a scan would only evict what decode will want).

Blocks are kept as records of a :class:`~flashtier.runtime.kv.codec.KVCodec` (raw bytes by
default, or KIVI-quantised): slots are ``uint8 [record_bytes]``, spill files hold the same records,
budgets count record bytes, and reads decode (``gather`` only the rows it returns).

Budget: the host tier holds the blocks *and* whatever the caller reports as ``other_bytes`` (the
key indexes). ``plan`` sizes the slot pool once from the budget, the longest context and the
caller's estimate of those other bytes; ``enforce`` re-checks with the measured other bytes after
every demotion and spills more blocks if needed. Live host bytes never exceed the budget after
``put`` / ``enforce`` return; a budget that cannot hold the index plus one block raises
:class:`~flashtier.errors.BudgetError` saying how much is needed.
"""

from __future__ import annotations

import torch

from flashtier.errors import BudgetError, InputError
from flashtier.retrieval.buffer import GrowableRows
from flashtier.runtime.kv.codec import KVCodec, RawCodec
from flashtier.runtime.kv.layout import KVBlockLayout
from flashtier.runtime.kv.spill import KVSpillStore

NOT_HOST = -1
"""Slot-table entry of a block that is not in a host slot (on storage, or never demoted)."""


class HostKVPool:
    """Demoted KV blocks of all layers in host slots of encoded records ``uint8 [cap, R]`` (see
    module docstring)."""

    def __init__(self, layout: KVBlockLayout, budget: int | None, spill: KVSpillStore,
                 codec: KVCodec | None = None) -> None:
        self.codec = codec or RawCodec(layout)
        self._rec = self.codec.record_bytes  # R: bytes of one block in a slot
        if spill.record_bytes != self._rec:
            raise InputError(f"host KV: the spill store must hold the codec's {self._rec}-byte records "
                             f"({self.codec.name}), it holds {spill.record_bytes or 'raw blocks'}")
        if budget is not None and budget < self._rec:
            raise BudgetError(f"host KV budget {budget} B is smaller than one KV block ({self._rec} B); "
                              "raise --kv-dram-budget")
        self.layout, self.budget, self.spill = layout, budget, spill
        self._pool = torch.empty((0, self._rec), dtype=torch.uint8)  # [cap, R] encoded blocks
        self._max_slots: int | None = None  # from plan(); None = grow on demand
        self._slot_layer = torch.empty(0, dtype=torch.int64)  # [cap] owner layer, -1 = free
        self._slot_block = torch.empty(0, dtype=torch.int64)  # [cap] owner block
        self._last_used = torch.empty(0, dtype=torch.int64)  # [cap] tick of the last put / gather
        self._tables = [GrowableRows((), torch.int64) for _ in range(layout.num_layers)]  # per layer: block -> slot
        self._used = 0  # occupied slots
        self._free: list[int] = []  # free slots
        self._tick = 0
        self._other_bytes = 0
        self.gathers_from_storage = 0
        """Blocks that ``gather`` had to read from storage."""

    # ------------------------------------------------------------------ sizing
    def plan(self, max_blocks: int, other_bytes_estimate: int) -> None:
        """Size the pool for at most ``max_blocks`` blocks while leaving ``other_bytes_estimate``
        of the budget to the indexes (call before the first ``put``; later calls only grow it)."""
        if self.budget is None:
            return
        room = self.budget - other_bytes_estimate
        if room < self._rec:
            raise BudgetError(
                f"host KV budget {_mib(self.budget)} cannot hold the key index of this context (about "
                f"{_mib(other_bytes_estimate)}) plus one KV block ({_mib(self._rec)}); raise "
                f"--kv-dram-budget to at least {_mib(other_bytes_estimate + 16 * self._rec)} or shorten the context"
            )
        self._max_slots = max(self._max_slots or 0, min(max_blocks, room // self._rec))

    def host_block_bytes(self) -> int:
        """Bytes of blocks in host slots (encoded)."""
        return self._used * self._rec

    def allocated_bytes(self) -> int:
        """Bytes of the slot pool, free slots included."""
        return self._pool.shape[0] * self._rec

    def blocks_on_host(self) -> int:
        return self._used

    def num_blocks(self, layer: int) -> int:
        """Blocks of ``layer`` demoted so far (host or storage)."""
        return len(self._tables[layer])

    # ------------------------------------------------------------------ writing
    def put(self, layer: int, first_block: int, blocks: torch.Tensor) -> None:
        """Demote ``blocks [n, 2, H_kv, B, D]`` of ``layer`` as blocks ``first_block ..`` (the
        next ones of the layer, in order)."""
        if first_block != self.num_blocks(layer):
            raise InputError(f"host KV: layer {layer} expects block {self.num_blocks(layer)} next, got {first_block}")
        if tuple(blocks.shape[1:]) != self.layout.block_shape:
            raise InputError(f"host KV: blocks must be [n, {self.layout.block_shape}], got {tuple(blocks.shape)}")
        self._tick += 1
        records = self.codec.encode(blocks)  # [n, R]
        for i in range(blocks.shape[0]):
            slot = self._free_slot(protect=self._tick + 1)  # any block may go to storage to make room
            self._pool[slot] = records[i]
            self._slot_layer[slot], self._slot_block[slot], self._last_used[slot] = layer, first_block + i, self._tick
            self._used += 1
            self._tables[layer].append(torch.tensor([slot], dtype=torch.int64))

    def enforce(self, other_bytes: int) -> None:
        """Record the measured bytes of the indexes and spill blocks until host bytes fit the budget."""
        self._other_bytes = other_bytes
        if self.budget is None:
            return
        room = self.budget - other_bytes
        if room < self._rec:
            raise BudgetError(
                f"host KV budget {_mib(self.budget)} is used up by the key index ({_mib(other_bytes)}); raise "
                f"--kv-dram-budget or shorten the context"
            )
        while self._used * self._rec > room:
            self._evict(self._lru_slot(protect=self._tick + 1))

    # ------------------------------------------------------------------ reading
    def gather(self, layer: int, heads: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[R, n, D]`` at demoted ``positions [R, n]`` of ``layer``, row ``r`` from
        kv head ``heads[r]`` (``heads [R]``)."""
        b = self.layout.block_size
        blocks = torch.div(positions, b, rounding_mode="floor")  # [R, n]
        offsets = positions - blocks * b
        table = self._tables[layer].view()
        if positions.numel() and (int(blocks.min()) < 0 or int(blocks.max()) >= table.shape[0]):
            raise InputError(f"host KV: positions {positions.reshape(-1)[:4].tolist()}... of layer {layer} were never demoted")
        self._tick += 1
        heads = heads.unsqueeze(1)  # [R, 1]
        slots = table[blocks]  # [R, n]
        self._last_used[slots[slots != NOT_HOST]] = self._tick  # protected from eviction below
        if bool((slots == NOT_HOST).any()):
            self._bring_back(layer, torch.unique(blocks[slots == NOT_HOST]))
            slots = table[blocks]
            if bool((slots == NOT_HOST).any()):  # no room for all of them: read the rest through
                return self._gather_through(layer, heads, blocks, offsets)
        return self.codec.rows(self._pool, slots, heads, offsets)

    def read_blocks(self, layer: int, start: int, stop: int) -> torch.Tensor:
        """Blocks ``start .. stop-1`` of ``layer`` as ``[n, 2, H_kv, B, D]`` (a copy); spilled ones are
        read through storage (verified) without being cached."""
        table = self._tables[layer].view()
        if not 0 <= start <= stop <= table.shape[0]:
            raise InputError(f"host KV: layer {layer} has {table.shape[0]} blocks, asked {start}..{stop}")
        slots = table[start:stop]
        on_host = slots != NOT_HOST
        if bool(on_host.all()):
            return self.codec.decode(self._pool.index_select(0, slots))
        records = torch.empty((stop - start, self._rec), dtype=torch.uint8)
        records[on_host] = self._pool.index_select(0, slots[on_host])
        spilled = torch.nonzero(~on_host).squeeze(1).tolist()
        for i, data in zip(spilled, self.spill.read([(layer, start + i) for i in spilled])):
            records[i] = data
        return self.codec.decode(records)

    # ------------------------------------------------------------------ forgetting
    def truncate(self, layer: int, num_blocks: int) -> None:
        """Forget blocks ``num_blocks ..`` of ``layer`` (host slots freed, spill files deleted)."""
        table = self._tables[layer]
        if num_blocks >= len(table):
            return
        dropped = table.view()[num_blocks:]
        for slot in dropped[dropped != NOT_HOST].tolist():
            self._slot_layer[slot] = -1
            self._free.append(slot)
            self._used -= 1
        self.spill.discard([(layer, b) for b in range(num_blocks, len(table))])
        table.truncate(num_blocks)

    # ------------------------------------------------------------------ internals
    def _free_slot(self, protect: int) -> int:
        """A slot for one more block within the budget: a free one (the pool grows by doubling up
        to its limit), else the least recently used block's, evicted (never one used at ``protect``)."""
        limit = self._slot_limit()
        if limit is not None and self._used >= limit:
            self._evict(self._lru_slot(protect))
        if not self._free:
            cap = self._pool.shape[0]
            self._grow(max(16, 2 * cap) if limit is None else min(max(16, 2 * cap), max(limit, cap + 1)))
        return self._free.pop()

    def _slot_limit(self) -> int | None:
        """Most blocks the host may hold now: the planned pool size, and what the budget leaves
        beside the indexes (None = unlimited)."""
        if self.budget is None:
            return None
        by_budget = max(1, (self.budget - self._other_bytes) // self._rec)
        return by_budget if self._max_slots is None else min(by_budget, self._max_slots)

    def _grow(self, capacity: int) -> None:
        old = self._pool.shape[0]
        pool = torch.empty((capacity, self._rec), dtype=torch.uint8)
        pool[:old] = self._pool
        self._pool = pool
        self._free.extend(range(capacity - 1, old - 1, -1))  # pop() hands out the lowest first
        pad = capacity - old
        self._slot_layer = torch.cat([self._slot_layer, torch.full((pad,), -1, dtype=torch.int64)])
        self._slot_block = torch.cat([self._slot_block, torch.zeros(pad, dtype=torch.int64)])
        self._last_used = torch.cat([self._last_used, torch.zeros(pad, dtype=torch.int64)])

    def _lru_slot(self, protect: int) -> int:
        """The occupied slot used least recently, not used at tick ``protect``."""
        age = torch.where((self._slot_layer >= 0) & (self._last_used < protect), self._last_used,
                          torch.full_like(self._last_used, torch.iinfo(torch.int64).max))
        slot = int(torch.argmin(age))
        if int(age[slot]) == torch.iinfo(torch.int64).max:
            raise BudgetError(
                f"host KV budget {_mib(self.budget or 0)} holds only {self._pool.shape[0]} blocks, all needed at once; "
                "raise --kv-dram-budget"
            )
        return slot

    def _evict(self, slot: int) -> None:
        """Drop the block in ``slot`` from host memory, writing it to storage first if needed."""
        layer, block = int(self._slot_layer[slot]), int(self._slot_block[slot])
        self.spill.write((layer, block), self._pool[slot])  # no-op when already on storage
        self._tables[layer].view()[block] = NOT_HOST
        self._slot_layer[slot] = -1
        self._free.append(slot)
        self._used -= 1

    def _bring_back(self, layer: int, blocks: torch.Tensor) -> None:
        """Read spilled ``blocks`` of ``layer`` into host slots while there is room that the current
        gather does not use (the others stay on storage)."""
        limit = self._slot_limit()
        wanted = blocks.tolist()
        if limit is not None:
            in_use = int((self._last_used[self._slot_layer >= 0] == self._tick).sum())
            wanted = wanted[: max(0, limit - in_use)]
        table = self._tables[layer].view()
        for block, data in zip(wanted, self.spill.read([(layer, b) for b in wanted])):
            slot = self._free_slot(protect=self._tick)
            self._pool[slot] = data
            self._slot_layer[slot], self._slot_block[slot], self._last_used[slot] = layer, block, self._tick
            self._used += 1
            table[block] = slot
            self.gathers_from_storage += 1

    def _gather_through(self, layer: int, heads: torch.Tensor, blocks: torch.Tensor,
                        offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Like ``gather`` with some blocks read from storage into a temporary, not cached."""
        unique, inverse = torch.unique(blocks, return_inverse=True)  # inverse [R, n]
        table = self._tables[layer].view()
        data = torch.empty((unique.shape[0], self._rec), dtype=torch.uint8)
        slots = table[unique]
        on_host = slots != NOT_HOST
        data[on_host] = self._pool[slots[on_host]]
        spilled = torch.nonzero(~on_host).squeeze(1).tolist()
        for i, block in zip(spilled, self.spill.read([(layer, int(unique[i])) for i in spilled])):
            data[i] = block
            self.gathers_from_storage += 1
        return self.codec.rows(data, inverse, heads, offsets)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
