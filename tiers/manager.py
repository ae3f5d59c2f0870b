"""Bookkeeping of the tiered store: the page table, pins, budgets and eviction decisions.

The manager moves no bytes (the transfer handler does) and takes no lock: every method expects
the caller (the store) to hold the store's lock.

Tiers, fastest first: ``device`` (optional), ``host``, ``storage``. Every page belongs to one
*arena*: a named share of the tiers' memory with its own pools (a budget per tier) and its own
eviction policy per tier, e.g. the streamed weights, each MoE layer's expert cache, the KV blocks.
Pages of one arena compete for room only with each other, so one kind of page never evicts another
and one arena's block sizes never fragment another's pool; the page table, the transfers, the
statistics and the invariants are the one store's. An arena's compute tier is the fastest tier it
has a pool in; its acquired pages are viewed there.

Page table invariants (``check_invariants`` asserts them):
  * A page's location is ``entry.tier``: its fastest complete copy (``storage`` when no faster tier
    holds one). Faster tiers hold a copy as a :class:`Block` of their pool in ``entry.blocks``.
    Lower tiers may keep a clean copy too (storage always does for pages registered from files;
    host keeps the staging copy of a device page until it is evicted); copies never go stale
    because pages are immutable.
  * A page *created* in memory (a KV block) has no storage copy until its last memory copy is
    evicted: eviction then writes it through its arena's write-back medium first (write-once), and
    only then frees the block. A page is never without a complete copy.
  * A page is in flight (``entry.hop``) from ``entry.tier`` to the next faster tier, at most one hop
    at a time, and only as part of a transfer job (``entry.route``). The hop's destination block is
    reserved in its pool for the whole flight.
  * An arena's pool in a tier is used by exactly its pages' blocks there plus the blocks reserved by
    hops into it, and never exceeds its budget (the pool's allocator cannot hand out more); a
    tier's usage is the sum over its arenas.
  * Never evicted: a copy that is the source or destination of a hop in flight; the location copy
    of a page that is acquired (``pins``) or resident-pinned (``resident``). Prefetched pages not
    yet acquired are evicted only by demand requests, after every other candidate.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from flashtier.tiers.base import Block, SlabPool
from flashtier.tiers.config import StoreConfig
from flashtier.tiers.jobs import TransferJob
from flashtier.tiers.page import PageDesc, PageId
from flashtier.tiers.policies import EvictionPolicy
from flashtier.tiers.stats import StoreStats, TierStats
from flashtier.tiers.storage import HostPlacement, StorageTier

TIER_ORDER = ("device", "host", "storage")
"""All tier names, fastest first."""

DEFAULT_ARENA = "default"
"""The arena a store's own :class:`StoreConfig` budgets describe."""

PoolKey = tuple[str, str]
"""``(arena, tier)``."""

PlacementListener = Callable[[PageId, str, "Block | None"], None]
"""Told ``(page, tier, block)`` when a page of an arena gains a copy in ``tier`` (``block``) or
loses it (None), under the store's lock: how an arena's owner keeps an index of where its pages
are (e.g. a KV block table of slot numbers) without asking the store for each page."""


class Room(enum.Enum):
    """Why a destination block could not be made."""

    WAIT = "wait"
    """Room is held by transfers in flight; it may free when one completes."""
    NEVER = "never"
    """Room is held by pinned pages (or the page exceeds the budget): only a release can help."""


@dataclass(frozen=True, slots=True)
class HopSpec:
    """One byte move for the transfer handler: a page from ``src`` into ``dst_block`` of ``dst``."""

    page_id: PageId
    desc: PageDesc
    arena: str
    src: str
    dst: str
    src_block: Block | None
    """The source copy (None when reading from storage)."""
    src_offset: int
    """Where the page's bytes start in ``src_block``."""
    dst_block: Block
    placement: HostPlacement
    """How the page lands in a host block (used when ``dst`` is host)."""
    priority: int
    """Lower runs first; demand 0, prefetches 1 + their priority."""
    wait_events: tuple[object, ...] = ()
    """CUDA events the copy must wait for before writing ``dst_block`` (reused device memory)."""


@dataclass(slots=True)
class PageEntry:
    """The page table row of one page."""

    desc: PageDesc
    placement: HostPlacement
    arena: str = DEFAULT_ARENA
    tier: str = "storage"
    blocks: dict[str, Block] = field(default_factory=dict)
    hop: HopSpec | None = None
    route: TransferJob | None = None
    pins: int = 0
    resident: bool = False
    prefetched_unused: bool = False
    """Announced by a prefetch and not acquired since (soft-protected from eviction)."""
    prefetch_seq: int = 0
    """Order of the last prefetch announcing the page."""
    view: torch.Tensor | None = None
    """Cached default view of the location copy (dropped when the location changes)."""
    release_event: object | None = None
    """CUDA event recorded when the page was last released on the device."""
    on_storage: bool = True
    """Whether storage holds a copy (False for a created page not written back yet)."""
    working: bool = False
    """A working page (``TieredStore.reserve``): its owner's memory, resident until forgotten."""
    held: str | None = None
    """A tier below the compute tier whose copy is kept (``TieredStore.hold``): e.g. weights the
    planner keeps in pinned host memory and copies to the device at each use."""
    host_pins: int = 0
    """Acquisitions of the host copy of a page whose arena computes on the device
    (``TieredStore.acquire_at``: e.g. an MoE expert computed on the CPU): that copy is kept."""


class PageManager:
    """Page table and eviction decisions (see the module docstring)."""

    def __init__(self, storage: StorageTier, config: StoreConfig) -> None:
        self.pools: dict[PoolKey, SlabPool] = {}
        self.policies: dict[PoolKey, EvictionPolicy] = {}
        self.stats: dict[str, StoreStats] = {}
        """Per arena."""
        self.storage = storage
        self.config = config
        self.rank = {t: i for i, t in enumerate(TIER_ORDER)}
        self.pages: dict[PageId, PageEntry] = {}
        self._tiers: dict[str, list[str]] = {}
        self._inflight: dict[PoolKey, int] = {}
        self._pending_events: dict[str, list[object]] = {}
        self._sizes: dict[str, int] = {}
        self._prefetch_seq = itertools.count(1)
        self.listeners: dict[str, PlacementListener] = {}
        self.write_back: Callable[[PageEntry, str], None] | None = None
        """Writes a created page's copy in a tier to storage (the store routes it to the transfer
        handler); called under the store's lock before the page's last memory copy is freed."""

    # -- arenas ------------------------------------------------------------------------------

    def add_arena(self, name: str, pools: dict[str, SlabPool], policies: dict[str, EvictionPolicy]) -> None:
        """Add arena ``name`` with a pool and a policy per tier it has room in ('host', maybe
        'device'); ValueError if the name is taken."""
        if name in self._tiers:
            raise ValueError(f"the store already has an arena named {name!r}")
        if "host" not in pools or set(pools) != set(policies):
            raise ValueError(f"arena {name!r} needs a host pool and one policy per pool")
        self._tiers[name] = [t for t in TIER_ORDER if t in pools or t == "storage"]
        for tier, pool in pools.items():
            self.pools[(name, tier)] = pool
            self.policies[(name, tier)] = policies[tier]
        for tier in self._tiers[name]:
            self._inflight[(name, tier)] = 0
        self._pending_events[name] = []
        self.stats[name] = StoreStats(tiers={t: TierStats() for t in self._tiers[name]})

    def remove_arena(self, name: str) -> None:
        """Drop an arena that holds no pages (its pools are released with it)."""
        if name == DEFAULT_ARENA or name not in self._tiers:
            raise ValueError(f"cannot remove arena {name!r}")
        assert not any(e.arena == name for e in self.pages.values()), f"arena {name!r} still has pages"
        for tier in self._tiers.pop(name):
            self.pools.pop((name, tier), None)
            self.policies.pop((name, tier), None)
            self._inflight.pop((name, tier), None)
        self._pending_events.pop(name, None)
        self.stats.pop(name, None)
        self.listeners.pop(name, None)

    @property
    def arenas(self) -> list[str]:
        return list(self._tiers)

    def tiers(self, arena: str) -> list[str]:
        """The tiers of ``arena``, fastest first (storage last)."""
        return self._tiers[arena]

    def compute_tier(self, arena: str) -> str:
        """Where ``arena``'s acquired pages live: its fastest tier."""
        return self._tiers[arena][0]

    def pool(self, entry: PageEntry, tier: str) -> SlabPool:
        return self.pools[(entry.arena, tier)]

    # -- registry ----------------------------------------------------------------------------

    def register(self, desc: PageDesc, arena: str = DEFAULT_ARENA) -> None:
        """Add a page at rest in storage to ``arena`` (idempotent for an identical descriptor)."""
        if arena not in self._tiers:
            raise KeyError(f"the store has no arena {arena!r}; add it with add_arena first")
        existing = self.pages.get(desc.page_id)
        if existing is not None:
            if existing.desc != desc or existing.arena != arena:
                raise ValueError(
                    f"page {desc.page_id!r} is already registered with {existing.desc} in arena "
                    f"{existing.arena!r}"
                )
            return
        self.storage.check_source(desc, self._sizes)
        self.pages[desc.page_id] = PageEntry(desc, self.storage.placement(desc), arena)

    def unregister(self, page_id: PageId) -> None:
        """Forget a page and free its copies; ValueError if it is pinned or in flight."""
        entry = self.entry(page_id)
        if entry.pins or entry.host_pins or entry.resident or entry.held or entry.hop is not None:
            raise ValueError(f"page {page_id!r} is in use (acquired, resident, held or in flight)")
        for tier, block in list(entry.blocks.items()):
            self.pool(entry, tier).release(block)
            self.policies[(entry.arena, tier)].remove(page_id)
            self._notify(entry, tier, None)
        del self.pages[page_id]

    def create(self, desc: PageDesc, arena: str) -> PageEntry:
        """Add a page created in memory (no storage copy yet) to ``arena``; ``place`` gives it its
        host block. ValueError if the id is taken."""
        if arena not in self._tiers:
            raise KeyError(f"the store has no arena {arena!r}; add it with add_arena first")
        if desc.page_id in self.pages:
            raise ValueError(f"page {desc.page_id!r} already exists")
        entry = PageEntry(desc, HostPlacement(desc.nbytes, 0), arena, on_storage=False)
        self.pages[desc.page_id] = entry
        return entry

    def place(self, entry: PageEntry, block: Block, tier: str = "host") -> None:
        """Record a created page's first copy: ``block`` of its arena's pool in ``tier`` (host; a
        working page may live in the device pool)."""
        entry.blocks[tier] = block
        entry.tier = tier
        entry.view = None
        policy = self.policies[(entry.arena, tier)]
        policy.place(entry.desc.page_id, block)
        policy.insert(entry.desc.page_id, entry.desc.nbytes, self.config.reload_cost_s(entry.desc.nbytes))
        self.stats[entry.arena].tiers[tier].bytes_written += entry.desc.nbytes
        self._notify(entry, tier, block)

    def _notify(self, entry: PageEntry, tier: str, block: Block | None) -> None:
        listener = self.listeners.get(entry.arena)
        if listener is not None:
            listener(entry.desc.page_id, tier, block)

    def entry(self, page_id: PageId) -> PageEntry:
        """The page table row of ``page_id``; KeyError naming it if unknown."""
        try:
            return self.pages[page_id]
        except KeyError:
            raise KeyError(f"page {page_id!r} is not registered with the store") from None

    # -- pins and accounting -----------------------------------------------------------------

    def pin(self, entry: PageEntry) -> None:
        """An acquire holds the page: its location copy is not evicted until ``unpin``."""
        entry.pins += 1
        entry.prefetched_unused = False

    def unpin(self, entry: PageEntry) -> None:
        if entry.pins <= 0:
            raise ValueError(f"page {entry.desc.page_id!r} is released more often than acquired")
        entry.pins -= 1

    def mark_prefetched(self, entry: PageEntry) -> None:
        """A prefetch announced the page as needed soon."""
        entry.prefetched_unused = True
        entry.prefetch_seq = next(self._prefetch_seq)

    def touch(self, entry: PageEntry) -> None:
        """Tell the location tier's policy the page is used (or wanted soon)."""
        if entry.tier in entry.blocks:
            self.policies[(entry.arena, entry.tier)].touch(entry.desc.page_id)

    def count_access(self, entry: PageEntry) -> None:
        """Hits and misses of one acquire, per tier, before any transfer it causes."""
        stats = self.stats[entry.arena]
        stats.acquires += 1
        if entry.hop is not None:
            stats.late += 1
        for tier in self._tiers[entry.arena]:
            tier_stats = stats.tiers[tier]
            if tier == entry.tier:
                tier_stats.hits += 1
                return
            tier_stats.misses += 1

    def at_or_above(self, entry: PageEntry, target: str) -> bool:
        """Whether the page's location is ``target`` or faster."""
        return self.rank[entry.tier] <= self.rank[target]

    def view(
        self,
        entry: PageEntry,
        dtype: torch.dtype | None = None,
        shape: tuple[int, ...] | None = None,
        tier: str | None = None,
    ) -> torch.Tensor:
        """A tensor over the page's copy in ``tier`` (default: its location; no copy); default
        dtype/shape from the desc."""
        if tier is not None and tier != entry.tier:
            return self._view_at(entry, dtype, shape, tier)
        default = dtype is None and shape is None
        if default and entry.view is not None:
            return entry.view
        tier = entry.tier
        offset = entry.placement.view_offset if tier == "host" else 0
        pool = self.pool(entry, tier)
        raw = pool.view(entry.blocks[tier], offset, entry.desc.nbytes)
        if shape is None:
            shape = entry.desc.shape if dtype is None else (-1,)
        tensor = raw.view(dtype or entry.desc.dtype).view(shape)
        if default and pool.stable_views:
            entry.view = tensor
        return tensor

    def _view_at(self, entry: PageEntry, dtype: torch.dtype | None, shape: tuple[int, ...] | None,
                 tier: str) -> torch.Tensor:
        offset = entry.placement.view_offset if tier == "host" else 0
        raw = self.pool(entry, tier).view(entry.blocks[tier], offset, entry.desc.nbytes)
        if shape is None:
            shape = entry.desc.shape if dtype is None else (-1,)
        return raw.view(dtype or entry.desc.dtype).view(shape)

    # -- hops --------------------------------------------------------------------------------

    def next_tier(self, entry: PageEntry, target: str) -> str | None:
        """The tier one step faster than the page's location, or None if it is at ``target``."""
        tiers = self._tiers[entry.arena]
        rank = tiers.index(entry.tier)
        return tiers[rank - 1] if self.rank[entry.tier] > self.rank[target] else None

    def prepare_hop(
        self, entry: PageEntry, dst: str, demand: bool, priority: int
    ) -> HopSpec | Room:
        """Reserve a block in ``dst`` (evicting if needed) and record the hop as in flight."""
        pool = self.pool(entry, dst)
        if dst == "host":
            need, dst_offset = entry.placement.block_bytes, entry.placement.view_offset
        else:
            need, dst_offset = entry.desc.nbytes, 0
        if pool.block_size(need) > pool.capacity:
            return Room.NEVER
        block = pool.try_allocate(need)
        if block is None:
            made = self._make_room(entry.arena, dst, pool.block_size(need), demand)
            if isinstance(made, Room):
                return made
            block = made
        src = entry.tier
        wait_events: tuple[object, ...] = ()
        pending = self._pending_events[entry.arena]
        if dst == "device" and pending:
            wait_events = tuple(pending)
            pending.clear()
        spec = HopSpec(
            page_id=entry.desc.page_id,
            desc=entry.desc,
            arena=entry.arena,
            src=src,
            dst=dst,
            src_block=entry.blocks.get(src),
            src_offset=entry.placement.view_offset if src == "host" else 0,
            dst_block=block,
            placement=entry.placement if dst == "host" else HostPlacement(need, dst_offset),
            priority=priority,
            wait_events=wait_events,
        )
        entry.hop = spec
        self._inflight[(entry.arena, src)] += 1
        self._inflight[(entry.arena, dst)] += 1
        return spec

    def complete_hop(self, spec: HopSpec, error: BaseException | None) -> PageEntry:
        """Record a hop's outcome: the page moves up to ``dst``, or stays and the block is freed."""
        entry = self.pages[spec.page_id]
        arena = spec.arena
        entry.hop = None
        self._inflight[(arena, spec.src)] -= 1
        self._inflight[(arena, spec.dst)] -= 1
        stats = self.stats[arena]
        if error is not None:
            self.pools[(arena, spec.dst)].release(spec.dst_block)
            self._pending_events[arena].extend(spec.wait_events)  # the next copy must still wait on them
            stats.transfers_failed += 1
            return entry
        nbytes = spec.desc.nbytes
        entry.blocks[spec.dst] = spec.dst_block
        entry.tier = spec.dst
        entry.view = None
        policy = self.policies[(arena, spec.dst)]
        policy.place(spec.page_id, spec.dst_block)
        policy.insert(spec.page_id, nbytes, self.config.reload_cost_s(nbytes))
        self._notify(entry, spec.dst, spec.dst_block)
        stats.tiers[spec.dst].bytes_written += nbytes
        stats.tiers[spec.src].bytes_read += nbytes
        return entry

    def room_denied_message(self, entry: PageEntry, tier: str) -> str:
        """Why ``tier`` cannot take ``entry`` now: need, budget, pinned bytes (for BudgetError)."""
        pool = self.pool(entry, tier)
        need = entry.placement.block_bytes if tier == "host" else entry.desc.nbytes
        pinned = sum(
            e.blocks[tier].nbytes
            for e in self.pages.values()
            if e.arena == entry.arena and tier in e.blocks and not self._evictable(e, tier, allow_unused=True)
        )
        flag = "--dram-budget" if tier == "host" else "--device-budget"
        where = f"the {tier} tier" if entry.arena == DEFAULT_ARENA else f"arena {entry.arena!r} of the {tier} tier"
        return (
            f"{where} cannot take page {entry.desc.page_id!r}: it needs "
            f"{pool.block_size(need)} bytes, the budget is {pool.capacity} bytes, "
            f"{pinned} bytes are held by acquired or resident pages, {pool.free_bytes} are free "
            f"(largest hole {pool.largest_hole()}); release pages before acquiring more, keep "
            f"fewer pages resident, or raise {flag}"
        )

    # -- eviction ----------------------------------------------------------------------------

    def _evictable(self, entry: PageEntry, tier: str, allow_unused: bool) -> bool:
        hop = entry.hop
        if hop is not None and (hop.src == tier or hop.dst == tier):
            return False
        if entry.held == tier or (tier == "host" and entry.host_pins):
            return False
        if entry.tier == tier:
            if entry.pins or entry.resident:
                return False
            if entry.prefetched_unused and not allow_unused:
                return False
        return True

    def _victims(self, arena: str, tier: str, demand: bool) -> Iterator[PageEntry]:
        """Evictable copies of ``arena`` in ``tier``, best victim first.

        First the policy's order, skipping pages prefetched but not yet used; then, for demands
        only, those prefetched pages, the most recently prefetched first (the one needed furthest
        ahead, when prefetches are issued in order of need).
        """
        unused: list[PageEntry] = []
        for key in self.policies[(arena, tier)].victims():
            candidate = self.pages[key]
            if not self._evictable(candidate, tier, allow_unused=True):
                continue
            if candidate.tier == tier and candidate.prefetched_unused:
                if demand:
                    unused.append(candidate)
                continue
            yield candidate
        unused.sort(key=lambda e: e.prefetch_seq, reverse=True)
        yield from unused

    def _make_room(self, arena: str, tier: str, need: int, demand: bool) -> Block | Room:
        """Evict from ``arena``'s pool in ``tier`` in ``_victims`` order until a ``need``-byte
        block can be allocated.

        Evicts only when enough candidates exist to cover ``need``.
        """
        pool = self.pools[(arena, tier)]
        while True:
            victims: list[PageEntry] = []
            freed = pool.free_bytes
            for candidate in self._victims(arena, tier, demand):
                victims.append(candidate)
                freed += candidate.blocks[tier].nbytes
                if freed >= need:
                    break
            if freed < need or not victims:
                break
            for victim in victims:
                self._evict(victim, tier)
            block = pool.try_allocate(need)
            if block is not None:
                return block
            # fragmented: free bytes suffice but no hole does; evict more
        if demand and self._inflight[(arena, tier)] == 0:
            return Room.NEVER
        return Room.WAIT

    def evict(self, entry: PageEntry, tier: str) -> None:
        """Drop ``entry``'s copy in ``tier`` (writing a created page back first if it is the last
        one); the caller checked that it is evictable. StorageError from a failed write-back leaves
        the copy in place."""
        self._evict(entry, tier)

    def victims(self, arena: str, tier: str) -> Iterator[PageEntry]:
        """Evictable copies of ``arena`` in ``tier``, best victim first (prefetched-unused last)."""
        return self._victims(arena, tier, demand=True)

    def make_room(self, arena: str, tier: str, need: int) -> Block | Room:
        """A ``need``-byte block of ``arena``'s pool in ``tier``, evicting as a demand would."""
        return self._make_room(arena, tier, need, demand=True)

    def _evict(self, entry: PageEntry, tier: str) -> None:
        arena = entry.arena
        if not entry.on_storage and len(entry.blocks) == 1:
            assert self.write_back is not None, "a created page needs the store's write-back route"
            self.write_back(entry, tier)  # raises before anything changed
            entry.on_storage = True
        block = entry.blocks.pop(tier)
        self.pools[(arena, tier)].release(block)
        self.policies[(arena, tier)].evict(entry.desc.page_id)
        tier_stats = self.stats[arena].tiers[tier]
        tier_stats.evictions += 1
        tier_stats.evicted_bytes += block.nbytes
        if entry.tier == tier:
            entry.tier = next((t for t in self._tiers[arena] if t in entry.blocks), "storage")
            entry.view = None
        if tier == "device" and entry.release_event is not None:
            self._pending_events[arena].append(entry.release_event)
            entry.release_event = None
        self._notify(entry, tier, None)

    # -- checks ------------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Assert the page table invariants of the module docstring (for tests)."""
        reserved = {key: 0 for key in self.pools}
        held = {key: 0 for key in self.pools}
        for page_id, e in self.pages.items():
            tiers = self._tiers[e.arena]
            fastest = next((t for t in tiers if t in e.blocks), "storage")
            assert e.tier == fastest, f"{page_id!r}: location {e.tier}, fastest copy {fastest}"
            assert e.pins >= 0 and e.host_pins >= 0
            assert e.on_storage or e.blocks, f"created page {page_id!r} has no copy anywhere"
            for tier, block in e.blocks.items():
                assert tier in tiers, f"{page_id!r} has a {tier} copy outside its arena's tiers"
                reserved[(e.arena, tier)] += block.nbytes
                held[(e.arena, tier)] += 1
            if e.hop is not None:
                assert e.route is not None, f"{page_id!r} in flight outside a job"
                assert e.hop.src == e.tier, f"{page_id!r} in flight from {e.hop.src}, at {e.tier}"
                assert e.hop.arena == e.arena
                assert tiers.index(e.hop.dst) == tiers.index(e.tier) - 1
                assert e.hop.dst not in e.blocks
                reserved[(e.arena, e.hop.dst)] += e.hop.dst_block.nbytes
        for key, pool in self.pools.items():
            assert pool.used == reserved[key], f"{key}: used {pool.used}, blocks {reserved[key]}"
            assert pool.used <= pool.capacity, f"{key} over budget"
            assert len(self.policies[key]) == held[key], f"{key} policy out of sync"
            pool.check()
