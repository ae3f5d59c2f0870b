"""Host tier of KV blocks: one arena of a tiered store for every layer, under a byte budget,
spilling to storage.

Blocks arrive here when they leave the device window (``put``) and never change afterwards. Each
block is a page *created* in a slot arena of a :class:`~flashtier.tiers.store.TieredStore` (the
model's store when it has one, so the same page table, statistics and transfer routes serve
weights, experts and KV): a block is in a host slot (and maybe also on storage), or on storage
only. When the arena is over its budget the store evicts the least recently used blocks, writing
them first to the arena's write-back medium if they were never written
(:class:`~flashtier.runtime.kv.spill.KVSpillStore`, write-once). ``gather`` reads rows of one kv
head (decode: the retrieved positions) straight from the arena's slot table, and brings the spilled
blocks it needs back into host slots when there is room, else reads them through.
``read_blocks`` serves the exact prefill, which scans a layer's blocks in order, reading spilled
ones through without caching them (a scan would only evict what decode will want).

This class keeps, per layer, a table block -> host slot that the store's placement listener
updates (the store owns where a block is; the table lets a decode step find hundreds of rows with
one tensor indexing).

Blocks are kept as records of a :class:`~flashtier.runtime.kv.codec.KVCodec` (raw bytes by
default, or KIVI-quantised): slots are ``uint8 [record_bytes]``, spill files hold the same records,
budgets count record bytes, and reads decode (``gather`` only the rows it returns).

Budget: the host tier holds the blocks *and* whatever the caller reports as ``other_bytes`` (the
key indexes). ``plan`` sizes the slot limit once from the budget, the longest context and the
caller's estimate of those other bytes; ``enforce`` re-checks with the measured other bytes after
every demotion and spills more blocks if needed. Live host bytes never exceed the budget after
``put`` / ``enforce`` return; a budget that cannot hold the index plus one block raises
:class:`~flashtier.errors.BudgetError` saying how much is needed.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Sequence

import torch

from flashtier.errors import BudgetError, InputError
from flashtier.retrieval.buffer import GrowableRows
from flashtier.runtime.kv.codec import KVCodec, RawCodec
from flashtier.runtime.kv.layout import KVBlockLayout
from flashtier.runtime.kv.spill import KVSpillStore
from flashtier.tiers.base import Block
from flashtier.tiers.config import StoreConfig
from flashtier.tiers.store import TieredStore

try:
    from flashtier._native import kv_gather as _kv_gather
except ImportError:  # the extension is not built (or predates it): the torch path
    _kv_gather = None

NOT_HOST = -1
"""Slot-table entry of a block that is not in a host slot (on storage, or never demoted)."""

_ARENA_IDS = itertools.count()

KVPageId = tuple[str, int, int]
"""``(arena, layer, block)``: a KV block's page id in the store."""


class _SpillMedium:
    """The write-back medium of a KV arena: page ids ``(arena, layer, block)`` as the spill
    store's ``(layer, block)`` files."""

    def __init__(self, spill: KVSpillStore) -> None:
        self.spill = spill

    def write(self, page_id: KVPageId, data: torch.Tensor) -> None:
        self.spill.write((page_id[1], page_id[2]), data)

    def read(self, page_ids: Sequence[KVPageId]) -> list[torch.Tensor]:
        return self.spill.read([(p[1], p[2]) for p in page_ids])

    def discard(self, page_ids: Sequence[KVPageId]) -> None:
        self.spill.discard([(p[1], p[2]) for p in page_ids])


class HostKVPool:
    """Demoted KV blocks of all layers as pages of one store arena of encoded records
    ``uint8 [R]`` (see module docstring)."""

    def __init__(self, layout: KVBlockLayout, budget: int | None, spill: KVSpillStore,
                 codec: KVCodec | None = None, store: TieredStore | None = None, huge_pages: bool = True) -> None:
        """``store``: the tiered store to keep the blocks in (the model's); None = a store of
        this pool's own, on transparent huge pages when ``huge_pages``."""
        self.codec = codec or RawCodec(layout)
        self._rec = self.codec.record_bytes  # R: bytes of one block in a slot
        if spill.record_bytes != self._rec:
            raise InputError(f"host KV: the spill store must hold the codec's {self._rec}-byte records "
                             f"({self.codec.name}), it holds {spill.record_bytes or 'raw blocks'}")
        if budget is not None and budget < self._rec:
            raise BudgetError(f"host KV budget {budget} B is smaller than one KV block ({self._rec} B); "
                              "raise --kv-dram-budget")
        self.layout, self.budget, self.spill = layout, budget, spill
        self._own_store = store is None
        self.store = store if store is not None else TieredStore(StoreConfig(host_budget=4096, huge_pages=huge_pages), None)
        self.arena = f"kv.{next(_ARENA_IDS)}"
        self._max_slots: int | None = None  # from plan(); None = the budget's
        self._tables = [GrowableRows((), torch.int64) for _ in range(layout.num_layers)]  # per layer: block -> slot
        self._on_host = 0  # blocks in host slots
        self._high_water = 0  # slots ever used (what the table has committed)
        self._other_bytes = 0
        self.gathers_from_storage = 0
        """Blocks that ``gather`` had to read from storage."""
        self.store.add_slot_arena(self.arena, self._rec, None if budget is None else budget // self._rec,
                                  _SpillMedium(spill), _weak_listener(self), extends_tier=True)  # --kv-dram-budget

    def _placed(self, page_id: KVPageId, tier: str, block: Block | None) -> None:
        """The store's placement listener: keep the block tables in step (store lock held)."""
        table = self._tables[page_id[1]].view()
        if block is None:
            table[page_id[2]] = NOT_HOST
            self._on_host -= 1
        else:
            slot = block.offset // self._rec
            table[page_id[2]] = slot
            self._on_host += 1
            self._high_water = max(self._high_water, slot + 1)

    def _pid(self, layer: int, block: int) -> KVPageId:
        return (self.arena, layer, block)

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
        self._apply_limit()

    def host_block_bytes(self) -> int:
        """Bytes of blocks in host slots (encoded)."""
        return self._on_host * self._rec

    def allocated_bytes(self) -> int:
        """Bytes of the slots used so far (the table is committed as slots are first used)."""
        return self._high_water * self._rec

    def blocks_on_host(self) -> int:
        return self._on_host

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
        self.store.tick([self.arena])
        records = self.codec.encode(blocks)  # [n, R]
        table = self._tables[layer]
        for i in range(blocks.shape[0]):
            table.append(torch.tensor([NOT_HOST], dtype=torch.int64))
            try:  # any block may go to storage to make room
                self.store.create(self._pid(layer, first_block + i), records[i], self.arena)
            except BaseException:
                table.truncate(first_block + i)
                raise

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
        self._apply_limit()

    # ------------------------------------------------------------------ reading
    def gather(self, layer: int, heads: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[R, n, D]`` at demoted ``positions [R, n]`` of ``layer``, row ``r`` from
        kv head ``heads[r]`` (``heads [R]``)."""
        fast = self._gather_native(layer, heads, positions)
        if fast is not None:
            return fast
        b = self.layout.block_size
        blocks = torch.div(positions, b, rounding_mode="floor")  # [R, n]
        offsets = positions - blocks * b
        table = self._tables[layer].view()
        if positions.numel() and (int(blocks.min()) < 0 or int(blocks.max()) >= table.shape[0]):
            raise InputError(f"host KV: positions {positions.reshape(-1)[:4].tolist()}... of layer {layer} were never demoted")
        self.store.tick([self.arena])
        heads = heads.unsqueeze(1)  # [R, 1]
        slots = table[blocks]  # [R, n]
        on_host = slots != NOT_HOST
        self.store.touch_slots(self.arena, slots[on_host].numpy())
        if not bool(on_host.all()):
            self._bring_back(layer, blocks, on_host)
            slots = table[blocks]
            if bool((slots == NOT_HOST).any()):  # no room for all of them: read the rest through
                return self._gather_through(layer, heads, blocks, offsets)
        return self.codec.rows(self.store.slot_table(self.arena), slots, heads, offsets)

    def _gather_native(self, layer: int, heads: torch.Tensor, positions: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """:meth:`gather` in one native call (raw records, every block in host memory: the decode
        step's common case); None where it does not apply (then the general path runs)."""
        raw_rows = self.raw_rows(layer) if _kv_gather is not None and positions.dim() == 2 else None
        if raw_rows is None:
            return None
        records, table = raw_rows
        lay = self.layout
        rows = positions.to(torch.int64).contiguous()  # [R, n] (no copy when it already is)
        hs = heads.to(torch.int64).contiguous()  # [R]
        k = torch.empty((*rows.shape, lay.head_dim), dtype=lay.dtype)  # [R, n, D]
        v = torch.empty_like(k)
        slots = torch.empty(rows.numel(), dtype=torch.int64)
        elem = lay.dtype.itemsize
        raw = torch.int16 if elem == 2 else torch.int32  # the buffers as plain integers (numpy has no bf16)
        if _kv_gather(records.numpy(), table.numpy(), rows.numpy(), hs.numpy(), lay.block_size, lay.num_kv_heads,
                      lay.head_dim, elem, k.view(raw).numpy(), v.view(raw).numpy(), slots.numpy()):
            return None  # a block on storage, or a bad position: the general path brings it back or names it
        self.mark_read(slots)
        return k, v

    def raw_rows(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For a native reader of K/V rows in place: the pool's records ``[slots, record bytes]``
        (uint8; raw blocks ``[2, H_kv, B, D]``) and ``layer``'s block table ``[blocks]`` (int64 slot,
        ``NOT_HOST`` for a block not in host memory); None when the rows are not raw (a KIVI codec).
        Valid until the next demotion or eviction; a reader marks the slots it read with
        :meth:`mark_read`."""
        if type(self.codec) is not RawCodec:
            return None
        return self.store.slot_table(self.arena), self._tables[layer].view()

    def mark_read(self, slots: torch.Tensor) -> None:
        """Mark the host slots a native reader read (``slots`` int64) as just used (the eviction order)."""
        self.store.tick([self.arena])
        self.store.touch_slots(self.arena, slots.numpy())

    def read_blocks(self, layer: int, start: int, stop: int) -> torch.Tensor:
        """Blocks ``start .. stop-1`` of ``layer`` as ``[n, 2, H_kv, B, D]`` (a copy); spilled ones are
        read through storage (verified) without being cached."""
        table = self._tables[layer].view()
        if not 0 <= start <= stop <= table.shape[0]:
            raise InputError(f"host KV: layer {layer} has {table.shape[0]} blocks, asked {start}..{stop}")
        slots = table[start:stop]
        if bool((slots != NOT_HOST).all()):
            return self.codec.decode(self.store.slot_table(self.arena).index_select(0, slots))
        data = self.store.read_through([self._pid(layer, i) for i in range(start, stop)])
        return self.codec.decode(torch.stack(data) if data else torch.empty((0, self._rec), dtype=torch.uint8))

    # ------------------------------------------------------------------ forgetting
    def truncate(self, layer: int, num_blocks: int) -> None:
        """Forget blocks ``num_blocks ..`` of ``layer`` (host slots freed, spill files deleted)."""
        table = self._tables[layer]
        if num_blocks >= len(table):
            return
        self.store.forget([self._pid(layer, b) for b in range(num_blocks, len(table))])
        table.truncate(num_blocks)

    def close(self) -> None:
        """Forget every block (slots freed, spill files deleted) and the arena. Idempotent."""
        if self.arena in self.store.arenas:
            self.store.remove_arena(self.arena)
        if self._own_store:
            self.store.close()

    # ------------------------------------------------------------------ internals
    def _slot_limit(self) -> int | None:
        """Most blocks the host may hold now: the planned pool size, and what the budget leaves
        beside the indexes (None = unlimited)."""
        if self.budget is None:
            return None
        by_budget = max(1, (self.budget - self._other_bytes) // self._rec)
        return by_budget if self._max_slots is None else min(by_budget, self._max_slots)

    def _apply_limit(self) -> None:
        limit = self._slot_limit()
        if limit is not None:
            self.store.set_slot_limit(self.arena, limit)

    def _bring_back(self, layer: int, blocks: torch.Tensor, on_host: torch.Tensor) -> None:
        """Read spilled ``blocks`` of ``layer`` into host slots while there is room that the current
        gather does not use (the others stay on storage): the blocks it uses are pinned meanwhile."""
        store = self.store
        used = [self._pid(layer, int(x)) for x in torch.unique(blocks[on_host]).tolist()]
        wanted = [self._pid(layer, int(x)) for x in torch.unique(blocks[~on_host]).tolist()]
        pinned: list[KVPageId] = []
        try:
            for pid in used:
                store.acquire(pid)
                pinned.append(pid)
            for pid in wanted:
                job = store.prefetch(pid)
                if job is None:
                    break  # no room the gather does not use
                if store.wait(job) != "host":
                    break
                store.acquire(pid)
                pinned.append(pid)
                self.gathers_from_storage += 1
        finally:
            for pid in pinned:
                store.release(pid)

    def _gather_through(self, layer: int, heads: torch.Tensor, blocks: torch.Tensor,
                        offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Like ``gather`` with some blocks read from storage into a temporary, not cached."""
        unique, inverse = torch.unique(blocks, return_inverse=True)  # inverse [R, n]
        table = self._tables[layer].view()
        spilled = int((table[unique] == NOT_HOST).sum())
        data = self.store.read_through([self._pid(layer, int(u)) for u in unique.tolist()])
        self.gathers_from_storage += spilled
        return self.codec.rows(torch.stack(data), inverse, heads, offsets)


def _weak_listener(pool: HostKVPool) -> Callable[[KVPageId, str, Block | None], None]:
    """``pool._placed`` without a reference from the store back to the pool (no cycle: a dropped
    cache frees its own store and spill folder at once)."""
    ref = weakref.ref(pool)

    def placed(page_id: KVPageId, tier: str, block: Block | None) -> None:
        owner = ref()
        if owner is not None:
            owner._placed(page_id, tier, block)

    return placed


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
