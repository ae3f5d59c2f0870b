"""The tiered store: pages in device / host / storage tiers, moved by asynchronous transfer jobs.

Public contract (what the model integration relies on):
  * ``acquire(page_id)`` returns a tensor view of the page in the compute tier (device if there is
    a device tier, else host) with no copy once resident, and pins the page until ``release``.
    It is the only call that blocks, and only on the transfers that page needs. If the room the
    page needs is held by acquired or resident-pinned pages, it raises BudgetError naming the need
    at once instead of waiting for a release (a single compute thread would deadlock waiting).
    Room held by transfers in flight is waited for.
  * ``prefetch(page_id)`` never blocks on IO: it starts a transfer job toward the compute tier if
    the tier can make room by evicting unpinned pages that are not themselves prefetched-but-unused,
    and returns the job (or None if nothing was started).
  * Budgets are never exceeded; pinned and in-flight pages are never evicted; every page is at one
    location or in flight between two tiers (see :mod:`flashtier.tiers.manager`).
  * A failed read (short read, IO error) fails the jobs and acquires waiting on it with
    StorageError; the page stays where it was and the next request retries from scratch.

Pages belong to arenas (:class:`~flashtier.tiers.config.ArenaConfig`, see
:mod:`flashtier.tiers.manager`): the store's own config describes the ``default`` arena, and
``add_arena`` adds more (each MoE layer's expert cache, ...), so one store, one page table and one
set of transfer threads serve every kind of page while each arena keeps its own budgets and
policies. Bookkeeping lives in :class:`~flashtier.tiers.manager.PageManager`, byte moving in
:class:`~flashtier.tiers.transfer.TransferHandler`; this class holds the one lock (a Condition,
notified whenever a transfer completes) and wires them. The storage backend is the caller's: the
store does not close it.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from flashtier.errors import BudgetError, FlashtierError, StorageError
from flashtier.storage_backends.base import StorageBackend
from flashtier.tiers.base import SlabPool
from flashtier.tiers.config import ArenaConfig, StoreConfig
from flashtier.tiers.device import DevicePool
from flashtier.tiers.host import HostPool
from flashtier.tiers.jobs import TransferJob
from flashtier.tiers.manager import (
    DEFAULT_ARENA,
    HopSpec,
    PageEntry,
    PageManager,
    PlacementListener,
    Room,
)
from flashtier.tiers.page import PageDesc, PageId, PageSource
from flashtier.tiers.slots import UNLIMITED, HeapPool, SlotLRU, SlotPool
from flashtier.tiers.policies import make_policy
from flashtier.tiers.stats import StoreStats
from flashtier.tiers.storage import StorageTier, WriteBack
from flashtier.tiers.transfer import TransferHandler

DEMAND_PRIORITY = 0
"""IO priority of transfers a caller is blocked on; prefetches use 1 + their priority."""


@dataclass(frozen=True, slots=True)
class PageLocation:
    """Where a page is: its location tier, and the tier it is moving to if in flight."""

    tier: str
    in_flight_to: str | None
    pins: int
    resident: bool
    copies: tuple[str, ...] = ()
    """The memory tiers holding a copy, fastest first."""
    held: str | None = None
    """The tier whose copy ``hold`` keeps."""


@dataclass(frozen=True, slots=True)
class _Wait:
    job: TransferJob


@dataclass(frozen=True, slots=True)
class _Fail:
    job: TransferJob
    error: FlashtierError
    """What the blocked caller raises."""
    owner: bool
    """Whether this caller ended the job (and must settle it) or saw a transfer thread end it."""


class TieredStore:
    """Pages in a device / host / storage hierarchy (see the module docstring). Thread-safe."""

    def __init__(self, config: StoreConfig, backend: StorageBackend | None) -> None:
        """``backend`` reads pages registered from files (None: a store of created pages only)."""
        self.config = config
        self._device = _resolve_device(config)
        self._storage = StorageTier(backend)
        self._manager = PageManager(self._storage, config)
        self._handler = TransferHandler(self._storage, self._manager.pools)
        self._manager.write_back = self._write_back
        self._cond = threading.Condition()
        self._extensions: dict[str, int | None] = {}  # arenas whose share extends the host tier
        self._unbudgeted: set[str] = set()  # heap arenas: accounted, outside the tier budget
        self.add_arena(ArenaConfig(DEFAULT_ARENA, config.host_budget, config.device_budget,
                                   config.host_policy, config.device_policy))
        self._ids = itertools.count(1)
        self._closed = False

    @property
    def compute_tier(self) -> str:
        """Where the default arena's acquired pages live: 'device' with a device tier, else 'host'."""
        return self._manager.compute_tier(DEFAULT_ARENA)

    def compute_tier_of(self, page_id: PageId) -> str:
        """Where ``page_id``'s arena computes ('device' when it has a device pool, else 'host')."""
        with self._cond:
            return self._manager.compute_tier(self._manager.entry(page_id).arena)

    # -- arenas --------------------------------------------------------------------------------

    def add_arena(self, arena: ArenaConfig, backend: StorageBackend | None = None) -> None:
        """Add an arena: its own pools (allocated now) and policies, under its own budgets; its
        pages are read through ``backend`` when given (same files, e.g. checked against their
        checksums), else through the store's.

        Its host pool is pinned when it has a CUDA device pool. ValueError if the name is taken.
        """
        self._check_tier_share(arena.name, arena.host_budget)
        pools: dict[str, SlabPool] = {}
        if arena.device_budget > 0:
            pools["device"] = DevicePool(arena.device_budget, device=self._device)
        pinned = self._device.type == "cuda" and "device" in pools
        pools["host"] = HostPool(arena.host_budget, pinned=pinned, alignment=arena.alignment,
                                 huge_pages=self.config.huge_pages)
        policies = {t: make_policy(arena.host_policy if t == "host" else arena.device_policy) for t in pools}
        with self._cond:
            self._manager.add_arena(arena.name, pools, policies)
            if backend is not None:
                self._storage.set_backend(arena.name, backend)
        if "device" in pools:
            self._handler.enable_copies(pools["device"].device)

    def add_slot_arena(self, name: str, record_bytes: int, limit: int | None, write_back: WriteBack,
                       listener: PlacementListener | None = None, extends_tier: bool = False) -> None:
        """Add an arena of pages created in memory, all ``record_bytes`` long, in the host tier:
        at most ``limit`` of them there (None = no budget), ranked by :class:`SlotLRU`; evicted
        ones are written to ``write_back`` first and read back from it. ``listener`` is told where
        each page lands (see :data:`~flashtier.tiers.manager.PlacementListener`). With
        ``extends_tier`` its share is added to the host tier's budget (a share the user grants
        separately, e.g. ``--kv-dram-budget``; an unlimited arena makes the tier unlimited), else
        it must fit the tier's budget beside the other arenas."""
        if extends_tier:
            with self._cond:
                self._extensions[name] = None if limit is None else limit * record_bytes
        else:
            self._check_tier_share(name, UNLIMITED if limit is None else limit * record_bytes)
        pool = SlotPool(name, record_bytes, limit, huge_pages=self.config.huge_pages)
        with self._cond:
            self._manager.add_arena(name, {"host": pool}, {"host": SlotLRU(pool)})
            self._storage.set_write_back(name, write_back)
            if listener is not None:
                self._manager.listeners[name] = listener

    def add_heap_arena(self, name: str, limit: int | None = None, zeroed: bool = True) -> None:
        """Add an arena of working pages (``reserve``: each its own zeroed allocation, never
        evicted) of at most ``limit`` bytes together, a share of the host tier's budget; None:
        accounted but outside the tier budget (memory another component bounds). ValueError if the
        name is taken, BudgetError if the tier cannot give ``limit``."""
        if limit is not None:
            self._check_tier_share(name, limit)
        pool = HeapPool(name, limit, zeroed)
        with self._cond:
            self._manager.add_arena(name, {"host": pool}, {"host": make_policy("lru")})
            if limit is None:
                self._unbudgeted.add(name)

    def arena_limit(self, name: str, tier: str = "host") -> int | None:
        """The budget of ``name``'s pool in ``tier`` (None: unbudgeted)."""
        with self._cond:
            capacity = self._manager.pools[(name, tier)].capacity
            return None if capacity >= UNLIMITED else capacity

    @property
    def host_tier_budget(self) -> int | None:
        """The budget of the host tier shared by all arenas (None: unbounded)."""
        with self._cond:
            return self._tier_budget()

    def _tier_budget(self) -> int | None:
        base = self.config.host_tier_budget
        if base is None or any(v is None for v in self._extensions.values()):
            return None
        return base + sum(v for v in self._extensions.values() if v is not None)

    def _check_tier_share(self, name: str, nbytes: int) -> None:
        """BudgetError if the host tier's arenas plus ``nbytes`` for arena ``name`` would exceed
        the tier's budget."""
        with self._cond:
            budget = self._tier_budget()
            if budget is None:
                return
            given = {a: p.capacity for (a, t), p in self._manager.pools.items()
                     if t == "host" and a not in self._unbudgeted}
            if sum(given.values()) + nbytes > budget:
                shares = ", ".join(f"{a} {n}" for a, n in given.items())
                raise BudgetError(
                    f"arena {name!r} asks for {nbytes} bytes of host memory, but the host tier's budget of "
                    f"{budget} bytes is already given to {shares}; raise --dram-budget or give the other "
                    f"arenas less"
                )

    def remove_arena(self, name: str) -> None:
        """Forget arena ``name`` and all its pages (written-back copies included); its pools are
        freed. ValueError if one of its pages is in use."""
        with self._cond:
            ids = [pid for pid, e in self._manager.pages.items() if e.arena == name]
        self.forget(ids)
        with self._cond:
            self._manager.remove_arena(name)
            self._storage.forget_arena(name)
            self._extensions.pop(name, None)
            self._unbudgeted.discard(name)

    @property
    def arenas(self) -> list[str]:
        """Names of the store's arenas, in the order they were added."""
        with self._cond:
            return self._manager.arenas
    # -- registration --------------------------------------------------------------------------

    def register(self, desc: PageDesc, arena: str = DEFAULT_ARENA) -> None:
        """Add a streamed page at rest in storage to ``arena`` (idempotent); StorageError if its
        range is past the end of its file."""
        with self._cond:
            self._manager.register(desc, arena)

    def register_many(self, descs: Iterable[PageDesc], arena: str = DEFAULT_ARENA) -> None:
        """``register`` each descriptor in ``arena``."""
        with self._cond:
            for desc in descs:
                self._manager.register(desc, arena)

    def unregister(self, page_id: PageId) -> None:
        """Forget a page and free its copies; ValueError if acquired, resident or in flight."""
        self.forget([page_id])

    def forget(self, page_ids: Iterable[PageId]) -> None:
        """Forget pages and free their copies, written-back copies of created pages included, and
        working pages (``reserve``); ValueError (and nothing forgotten) if one is acquired,
        resident-pinned or in flight."""
        with self._cond:
            manager = self._manager
            entries = [manager.entry(pid) for pid in page_ids]
            busy = [e.desc.page_id for e in entries
                     if e.pins or e.hop is not None or e.held or (e.resident and not e.working)]
            if busy:
                raise ValueError(f"pages {busy[:4]!r} are in use (acquired, resident or in flight)")
            written: dict[str, list[PageId]] = {}
            for e in entries:
                if e.on_storage and self._storage.write_back(e.arena) is not None:
                    written.setdefault(e.arena, []).append(e.desc.page_id)
                e.resident = False  # a working page is its owner's to drop
                manager.unregister(e.desc.page_id)
        for arena, ids in written.items():
            medium = self._storage.write_back(arena)
            assert medium is not None
            medium.discard(ids)

    # -- pages created in memory -----------------------------------------------------------------

    def create(self, page_id: PageId, data: torch.Tensor, arena: str) -> None:
        """Add a page whose bytes are ``data`` (any dtype; copied) to ``arena``'s host pool,
        evicting (and writing back) that arena's least valuable pages if it is full.

        BudgetError if the arena cannot hold it (every page pinned); StorageError if a write-back
        failed (the page is then not created). The page is immutable from now on."""
        raw = data.detach().reshape(-1).contiguous().view(torch.uint8)
        desc = PageDesc(page_id, PageSource(f"<{arena}>", 0, raw.numel()))
        with self._cond:
            manager = self._manager
            if arena in manager.arenas and manager.compute_tier(arena) != "host":
                raise ValueError(f"pages are created in host memory; arena {arena!r} computes on "
                                 f"{manager.compute_tier(arena)}")
            entry = manager.create(desc, arena)
            try:
                pool = manager.pool(entry, "host")
                block = pool.try_allocate(desc.nbytes)
                if block is None:
                    made = manager.make_room(arena, "host", pool.block_size(desc.nbytes))
                    if isinstance(made, Room):
                        raise BudgetError(manager.room_denied_message(entry, "host"))
                    block = made
                pool.view(block, 0, desc.nbytes).copy_(raw)
                manager.place(entry, block)
            except BaseException:
                if not entry.blocks:
                    del manager.pages[page_id]
                raise

    def reserve(self, page_id: PageId, nbytes: int, arena: str, tier: str = "host") -> torch.Tensor:
        """A working page: ``nbytes`` of ``arena``'s pool in ``tier`` ('host', or 'device' for an
        arena with a device pool: e.g. weights the planner keeps on the GPU) that its owner reads
        and writes, resident and never evicted until ``forget``; its bytes are the owner's
        (uninitialised, never written back). BudgetError if the arena has no room there.
        Returns the page as ``uint8 [nbytes]``, aligned as the pool aligns blocks."""
        desc = PageDesc(page_id, PageSource(f"<{arena}>", 0, nbytes))
        with self._cond:
            manager = self._manager
            if arena in manager.arenas and tier not in manager.tiers(arena)[:-1]:
                raise ValueError(f"arena {arena!r} has no {tier} pool to reserve a working page in")
            entry = manager.create(desc, arena)
            pool = manager.pool(entry, tier)
            block = pool.try_allocate(nbytes)
            if block is None:
                del manager.pages[page_id]
                raise BudgetError(
                    f"arena {arena!r} cannot reserve {nbytes} bytes of its {tier} pool for {page_id!r}: "
                    f"{pool.free_bytes} of its {pool.capacity} bytes are free (largest hole {pool.largest_hole()})"
                )
            entry.resident = entry.working = True
            manager.place(entry, block, tier)
            return manager.view(entry)

    def hold(self, page_ids: Iterable[PageId], tier: str = "host") -> None:
        """Load pages into ``tier`` (below their arena's compute tier) and keep that copy until
        ``release_hold``, whatever the compute tier does with them: weights the planner keeps in
        (pinned) host memory and copies to the device window at each use, so that only the pages
        the plan streams are read from storage again. Blocks until loaded.

        BudgetError (nothing held) if the held pages would take more than the arena's pool in
        ``tier``; ValueError if ``tier`` is not a memory tier of their arena.
        """
        ids = list(dict.fromkeys(page_ids))
        manager = self._manager
        with self._cond:
            entries = [manager.entry(pid) for pid in ids]
            fresh = [e for e in entries if e.held != tier]
            for arena in dict.fromkeys(e.arena for e in fresh):
                if tier not in manager.tiers(arena)[:-1]:
                    raise ValueError(f"arena {arena!r} has no {tier} pool to hold pages in")
                pool = manager.pools[(arena, tier)]
                size = lambda e: pool.block_size(self._block_need(e, tier))  # noqa: E731
                need = sum(size(e) for e in fresh if e.arena == arena)
                held = sum(size(e) for e in manager.pages.values() if e.arena == arena and e.held == tier)
                if need + held > pool.capacity:
                    flag = "--dram-budget" if tier == "host" else "--device-budget"
                    raise BudgetError(
                        f"{len(fresh)} pages to hold need {need} bytes in arena {arena!r} of the {tier} tier, "
                        f"{held} are already held, its budget is {pool.capacity} bytes; hold fewer or raise {flag}"
                    )
            for e in fresh:
                e.held = tier
        try:
            for entry in entries:
                if tier not in entry.blocks:
                    self._bring_up(entry, tier)
        except BaseException:
            with self._cond:
                for e in fresh:
                    e.held = None
            raise

    def release_hold(self, page_ids: Iterable[PageId]) -> None:
        """Let held pages' copies be evicted again."""
        with self._cond:
            for pid in page_ids:
                self._manager.entry(pid).held = None

    def touch_slots(self, arena: str, slots: np.ndarray) -> None:
        """Tell a slot arena's policy that the pages in host ``slots`` were used (one call for a
        whole step; see :class:`SlotLRU`)."""
        with self._cond:
            policy = self._manager.policies[(arena, "host")]
            assert isinstance(policy, SlotLRU)
            policy.touch_slots(slots)

    def slot_table(self, arena: str) -> torch.Tensor:
        """A slot arena's host table ``uint8 [slots, R]``. Its owner may index it directly for
        pages the listener placed in host slots, between its own calls that can evict
        (``create``, ``prefetch``, ``set_slot_limit``) and after them fetch it again (an unbudgeted
        table grows by reallocation)."""
        with self._cond:
            pool = self._manager.pools[(arena, "host")]
            assert isinstance(pool, SlotPool)
            return pool.table

    def set_slot_limit(self, arena: str, slots: int) -> None:
        """Let a slot arena hold at most ``slots`` pages in host memory, evicting (writing back)
        the least recently used now if it holds more. BudgetError if the pages over the limit are
        pinned."""
        with self._cond:
            manager = self._manager
            pool = manager.pools[(arena, "host")]
            assert isinstance(pool, SlotPool)
            over = pool.used // pool.record_bytes - max(slots, 0)
            if over > 0:
                victims = list(itertools.islice(manager.victims(arena, "host"), over))
                if len(victims) < over:
                    raise BudgetError(
                        f"arena {arena!r} must drop {over} pages to fit {slots} slots but only "
                        f"{len(victims)} are not in use; release pages or raise the budget"
                    )
                for victim in victims:
                    manager.evict(victim, "host")
            pool.set_limit(slots)

    def read_through(self, page_ids: Sequence[PageId]) -> list[torch.Tensor]:
        """Copies of pages' bytes (``uint8``) wherever they are, without bringing any into a
        faster tier (a scan that must not evict what is cached); pages on storage only must be
        created pages (read back verified through their arena's medium)."""
        out: list[torch.Tensor | None] = [None] * len(page_ids)
        missing: dict[str, list[int]] = {}
        with self._cond:
            manager = self._manager
            for i, pid in enumerate(page_ids):
                entry = manager.entry(pid)
                tier = next((t for t in manager.tiers(entry.arena) if t in entry.blocks), None)
                if tier is not None:
                    offset = entry.placement.view_offset if tier == "host" else 0
                    out[i] = manager.pool(entry, tier).view(entry.blocks[tier], offset, entry.desc.nbytes).clone()
                else:
                    if self._storage.write_back(entry.arena) is None:
                        raise ValueError(f"read_through reads created pages from storage; {pid!r} comes from a file")
                    missing.setdefault(entry.arena, []).append(i)
        for arena, idx in missing.items():
            medium = self._storage.write_back(arena)
            assert medium is not None
            for i, data in zip(idx, medium.read([page_ids[i] for i in idx])):
                out[i] = data.reshape(-1).view(torch.uint8)
        return out  # type: ignore[return-value]

    # -- transfers -----------------------------------------------------------------------------

    def prefetch(self, page_id: PageId, priority: int = 0, tier: str | None = None) -> TransferJob | None:
        """Start bringing ``page_id`` to the compute tier; never blocks on IO.

        Returns the job moving the page (an existing one if it is already moving; an ended one if
        it is already there), or None when the tier has no evictable room: the prefetch is
        declined (counted in ``stats().prefetches_declined``) and the page stays where it is.
        Lower ``priority`` (>= 0) is served first; demand reads always go before prefetches.
        Until acquired, the page is protected from eviction by other prefetches
        (``cancel_prefetch`` lifts that). ``tier``: bring it only that far (e.g. 'host' when
        where it will be used is decided at its use); default the compute tier.
        """
        if priority < 0:
            raise ValueError(f"prefetch priority must be >= 0, got {priority}")
        with self._cond:
            manager = self._manager
            entry = manager.entry(page_id)
            manager.touch(entry)
            manager.mark_prefetched(entry)
            if entry.route is not None:
                return entry.route
            target = tier or manager.compute_tier(entry.arena)
            if manager.at_or_above(entry, target) or target in entry.blocks:
                dst = None
            else:
                dst = manager.next_tier(entry, target)
            job = TransferJob(next(self._ids), page_id, target, demand=False)
            if dst is None:
                job.reached = entry.tier
                outcome: HopSpec | Room | None = None
            else:
                outcome = manager.prepare_hop(entry, dst, demand=False, priority=1 + priority)
                stats = manager.stats[entry.arena]
                if not isinstance(outcome, HopSpec):
                    stats.prefetches_declined += 1
                    return None
                entry.route = job
                stats.prefetches += 1
        if outcome is None:
            job.settle()  # already there
        else:
            self._handler.start(outcome, self._on_hop_done)
        return job

    def cancel_prefetch(self, page_id: PageId) -> None:
        """Withdraw the "needed soon" mark of a prefetched page (e.g. a mispredicted expert), so
        it competes for eviction like any other. A transfer in flight still completes."""
        with self._cond:
            self._manager.entry(page_id).prefetched_unused = False

    def poll(self, job: TransferJob) -> bool:
        """Whether ``job`` has ended. Never blocks."""
        return job.done()

    def wait(self, job: TransferJob, timeout: float | None = None) -> str:
        """Block until ``job`` ends; return the tier reached or raise its error. Counted in
        ``stats().wait_s``."""
        start = time.perf_counter()
        try:
            return job.wait(timeout)
        finally:
            waited = time.perf_counter() - start
            with self._cond:
                entry = self._manager.pages.get(job.page_id)
                self._manager.stats[entry.arena if entry is not None else DEFAULT_ARENA].wait_s += waited

    # -- use -----------------------------------------------------------------------------------

    def acquire(
        self,
        page_id: PageId,
        dtype: torch.dtype | None = None,
        shape: tuple[int, ...] | None = None,
    ) -> torch.Tensor:
        """Pin ``page_id`` and return its bytes in the compute tier as a tensor, without copying.

        ``dtype`` / ``shape`` override the descriptor's. Blocks only until the page's transfers
        are done. Raises StorageError if a read fails, BudgetError if pinned pages hold the room
        it needs (nothing is left pinned in either case). Pair every acquire with ``release``.
        """
        manager = self._manager
        with self._cond:
            entry = manager.entry(page_id)
            manager.count_access(entry)
            manager.pin(entry)
            if manager.at_or_above(entry, manager.compute_tier(entry.arena)):
                manager.touch(entry)
                return manager.view(entry, dtype, shape)
        try:
            self._bring_up(entry)
            with self._cond:
                manager.touch(entry)
                return manager.view(entry, dtype, shape)
        except BaseException:
            with self._cond:
                manager.unpin(entry)
            raise

    def acquire_at(self, page_id: PageId, tier: str, dtype: torch.dtype | None = None,
                   shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Pin ``page_id``'s copy in ``tier`` (a memory tier below its arena's compute tier) and
        return it as a tensor, bringing it there from storage if needed: for work done where that
        copy lives (an MoE expert computed on the CPU while the model computes on the GPU). A copy
        in a faster tier is not used. Pair with ``release_at``. Errors as ``acquire``."""
        manager = self._manager
        with self._cond:
            entry = manager.entry(page_id)
            if tier not in manager.tiers(entry.arena)[1:-1]:
                raise ValueError(f"arena {entry.arena!r} has no {tier} tier below its compute tier")
            if tier not in entry.blocks and manager.rank[entry.tier] < manager.rank[tier]:
                raise ValueError(f"page {page_id!r} has a copy only in the {entry.tier} tier, none in {tier}")
            manager.count_access(entry)
            entry.host_pins += 1
            if tier in entry.blocks:
                return manager.view(entry, dtype, shape, tier)
        try:
            self._bring_up(entry, tier)
            with self._cond:
                return manager.view(entry, dtype, shape, tier)
        except BaseException:
            with self._cond:
                entry.host_pins -= 1
            raise

    def release_at(self, page_id: PageId, tier: str) -> None:
        """Unpin a copy pinned by ``acquire_at``."""
        with self._cond:
            entry = self._manager.entry(page_id)
            if tier != "host" or entry.host_pins <= 0:
                raise ValueError(f"page {page_id!r}'s {tier} copy is released more often than acquired")
            entry.host_pins -= 1

    def release(self, page_id: PageId) -> None:
        """Unpin a page acquired before; it stays cached until evicted."""
        with self._cond:
            entry = self._manager.entry(page_id)
            self._manager.unpin(entry)
            if entry.tier == "device" and self._device.type == "cuda":
                event = torch.cuda.Event()
                event.record()  # the compute stream's last use; reusing the block waits on it
                entry.release_event = event

    @contextmanager
    def use(
        self,
        page_id: PageId,
        dtype: torch.dtype | None = None,
        shape: tuple[int, ...] | None = None,
    ) -> Iterator[torch.Tensor]:
        """``with store.use(pid) as w:`` acquires for the block and releases after it."""
        tensor = self.acquire(page_id, dtype, shape)
        try:
            yield tensor
        finally:
            self.release(page_id)

    def make_resident(self, page_ids: Iterable[PageId]) -> None:
        """Load pages into the compute tier and keep them there until ``release_resident``
        (what the planner keeps resident: embeddings, norms, attention). Blocks until loaded.

        BudgetError if they, with the pages already resident, exceed the compute tier's budget;
        then none of ``page_ids`` is marked resident.
        """
        ids = list(dict.fromkeys(page_ids))
        manager = self._manager
        with self._cond:
            entries = [manager.entry(pid) for pid in ids]
            fresh = [e for e in entries if not e.resident]
            for arena in dict.fromkeys(e.arena for e in fresh):
                tier = manager.compute_tier(arena)
                pool = manager.pools[(arena, tier)]
                need = sum(pool.block_size(self._block_need(e, tier)) for e in fresh if e.arena == arena)
                held = sum(
                    pool.block_size(self._block_need(e, tier))
                    for e in manager.pages.values()
                    if e.resident and e.arena == arena
                )
                if need + held > pool.capacity:
                    where = f"the {tier} tier" if arena == DEFAULT_ARENA else f"arena {arena!r} of the {tier} tier"
                    raise BudgetError(
                        f"{len(fresh)} pages to keep resident need {need} bytes in {where}, "
                        f"{held} are already resident, the budget is {pool.capacity} bytes; keep fewer "
                        f"pages resident or raise "
                        f"{'--dram-budget' if tier == 'host' else '--device-budget'}"
                    )
            for e in fresh:
                e.resident = True
        try:
            for pid in ids:
                self.prefetch(pid)  # all reads in flight at once
            for entry in entries:
                self._bring_up(entry)
        except BaseException:
            with self._cond:
                for e in fresh:
                    e.resident = False
            raise
        finally:
            with self._cond:
                for e in entries:
                    e.prefetched_unused = False

    def release_resident(self, page_ids: Iterable[PageId]) -> None:
        """Let resident pages be evicted again."""
        with self._cond:
            for pid in page_ids:
                self._manager.entry(pid).resident = False

    def tick(self, arenas: Iterable[str] | None = None) -> None:
        """One step of the caller's clock passed (e.g. one forward pass): tell the eviction
        policies of ``arenas`` (all when None), for those that age by steps (``least-stale``)."""
        with self._cond:
            manager = self._manager
            for arena in manager.arenas if arenas is None else arenas:
                for tier in manager.tiers(arena)[:-1]:  # storage has no policy
                    manager.policies[(arena, tier)].tick()

    # -- introspection -------------------------------------------------------------------------

    def location(self, page_id: PageId) -> PageLocation:
        """Where ``page_id`` is now."""
        with self._cond:
            entry = self._manager.entry(page_id)
            hop = entry.hop
            return PageLocation(
                entry.tier, hop.dst if hop is not None else None, entry.pins, entry.resident,
                tuple(t for t in ("device", "host") if t in entry.blocks), entry.held,
            )

    def stats(self, arenas: Iterable[str] | None = None) -> StoreStats:
        """A snapshot of the counters of ``arenas`` (summed; every arena when None), with current
        pool usage."""
        with self._cond:
            manager = self._manager
            names = manager.arenas if arenas is None else list(arenas)
            total = StoreStats(tiers={})
            for arena in names:
                snapshot = manager.stats[arena].copy()
                for tier in manager.tiers(arena):
                    pool = manager.pools.get((arena, tier))
                    if pool is not None:
                        snapshot.tiers[tier].used_bytes = pool.used
                        snapshot.tiers[tier].capacity_bytes = pool.capacity
                total.add(snapshot)
            total.tiers = {t: total.tiers[t] for t in ("device", "host", "storage") if t in total.tiers}
            return total

    def memory_report(self) -> dict[str, dict[str, dict[str, int]]]:
        """What the store holds, per tier and arena: ``{tier: {arena: {"used_bytes",
        "capacity_bytes", "pages"}, "total": {...}}}`` (pages counted where they have a copy; an
        unbudgeted arena's capacity is its used bytes)."""
        with self._cond:
            manager = self._manager
            pages: dict[tuple[str, str], int] = {}
            for e in manager.pages.values():
                for tier in e.blocks:
                    pages[(e.arena, tier)] = pages.get((e.arena, tier), 0) + 1
            report: dict[str, dict[str, dict[str, int]]] = {}
            for (arena, tier), pool in manager.pools.items():
                capacity = pool.capacity if pool.capacity < UNLIMITED else pool.used
                row = {"used_bytes": pool.used, "capacity_bytes": capacity, "pages": pages.get((arena, tier), 0)}
                report.setdefault(tier, {})[arena] = row
            for per_tier in report.values():
                per_tier["total"] = {key: sum(row[key] for row in list(per_tier.values()))
                                     for key in ("used_bytes", "capacity_bytes", "pages")}
            out = {t: report[t] for t in ("device", "host") if t in report}
            budget = self._tier_budget()
            if "host" in out and budget is not None:
                out["host"]["total"]["tier_budget_bytes"] = budget
            return out

    def check_invariants(self) -> None:
        """Assert the page table invariants (for tests)."""
        with self._cond:
            self._manager.check_invariants()
            budget = self._tier_budget()
            if budget is not None:
                used = sum(p.used for (a, t), p in self._manager.pools.items() if t == "host" and a not in self._unbudgeted)
                assert used <= budget, f"host tier uses {used} of {budget} bytes"

    def close(self) -> None:
        """Wait for transfers in flight, then stop the copy thread. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.wait_for(
                lambda: all(e.hop is None for e in self._manager.pages.values())
            )
        self._handler.close()

    def __enter__(self) -> TieredStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------------

    def _write_back(self, entry: PageEntry, tier: str) -> None:
        """The manager's write-back hook: the page's bytes in ``tier`` to its arena's medium
        (store lock held)."""
        view = self._manager.pool(entry, tier).view(entry.blocks[tier], 0, entry.desc.nbytes)
        self._handler.write_back(entry.arena, entry.desc.page_id, view)
        self._manager.stats[entry.arena].tiers["storage"].bytes_written += entry.desc.nbytes

    def _block_need(self, entry: PageEntry, tier: str) -> int:
        return entry.placement.block_bytes if tier == "host" else entry.desc.nbytes

    def _bring_up(self, entry: PageEntry, target: str | None = None) -> None:
        """Block until ``entry`` is in ``target`` (default: its compute tier), driving its hops as
        a demand.

        The caller holds a pin (acquire), the resident mark or the hold, so the page cannot be
        evicted between the hop that brings it and the caller's use.
        """
        manager = self._manager
        target = target or manager.compute_tier(entry.arena)
        waited = 0.0
        try:
            while True:
                with self._cond:
                    while True:
                        step = self._demand_step(entry, target)
                        if not isinstance(step, _Wait):
                            break
                        start = time.perf_counter()
                        self._cond.wait()
                        waited += time.perf_counter() - start
                        if step.job.error is not None:
                            step = _Fail(step.job, step.job.error, owner=False)
                            break
                if step is None:
                    return
                if isinstance(step, _Fail):
                    if step.owner:
                        step.job.settle()
                    err = step.error
                    raise type(err)(str(err)) from err
                with self._cond:
                    job = entry.route
                self._handler.start(step, self._on_hop_done)
                if job is not None and job.error is not None:  # the hop failed on this thread
                    err = job.error
                    raise type(err)(str(err)) from err
        finally:
            if waited:
                with self._cond:
                    manager.stats[entry.arena].wait_s += waited

    def _demand_step(
        self, entry: PageEntry, target: str
    ) -> HopSpec | _Wait | _Fail | None:
        """Next action toward ``target`` for a blocked caller (store lock held)."""
        manager = self._manager
        if manager.at_or_above(entry, target) and entry.hop is None:
            return None
        route = entry.route
        if route is None:
            route = entry.route = TransferJob(next(self._ids), entry.desc.page_id, target, True)
        route.demand = True
        if entry.hop is not None:
            return _Wait(route)
        dst = manager.next_tier(entry, target)
        assert dst is not None
        outcome = manager.prepare_hop(entry, dst, demand=True, priority=DEMAND_PRIORITY)
        if isinstance(outcome, HopSpec):
            return outcome
        if outcome is Room.WAIT:
            return _Wait(route)
        # the job ends where the page is (others waiting on it see it stop short);
        # only this caller gets the BudgetError
        route.reached = entry.tier
        entry.route = None
        return _Fail(route, BudgetError(manager.room_denied_message(entry, dst)), owner=True)

    def _on_hop_done(self, spec: HopSpec, error: BaseException | None) -> None:
        """Transfer completion (IO / copy thread): update the table, chain the next hop."""
        manager = self._manager
        settle: TransferJob | None = None
        start: HopSpec | None = None
        with self._cond:
            entry = manager.complete_hop(spec, error)
            route = entry.route
            assert route is not None
            if error is not None:
                route.error = _as_flashtier_error(error, spec)
                entry.route, settle = None, route
            elif manager.at_or_above(entry, route.target):
                route.reached = entry.tier
                entry.route, settle = None, route
            else:
                dst = manager.next_tier(entry, route.target)
                assert dst is not None
                priority = DEMAND_PRIORITY if route.demand else spec.priority
                outcome = manager.prepare_hop(entry, dst, route.demand, priority)
                if isinstance(outcome, HopSpec):
                    start = outcome
                elif not route.demand:  # a prefetch stops where room ran out
                    route.reached = entry.tier
                    entry.route, settle = None, route
                # a stalled demand stays open: its blocked caller retries when woken
            self._cond.notify_all()
        if start is not None:
            self._handler.start(start, self._on_hop_done)
        if settle is not None:
            settle.settle()


def _resolve_device(config: StoreConfig) -> torch.device:
    """Where the device tier lives (the CPU stand-in when CUDA is absent and not required)."""
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _as_flashtier_error(error: BaseException, spec: HopSpec) -> FlashtierError:
    if isinstance(error, FlashtierError):
        return error
    wrapped = StorageError(
        f"moving page {spec.page_id!r} from {spec.src} to {spec.dst} failed: {error}"
    )
    wrapped.__cause__ = error
    return wrapped
