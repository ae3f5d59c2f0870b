"""Bookkeeping of the tiered store: the page table, pins, budgets and eviction decisions.

The manager moves no bytes (the transfer handler does) and takes no lock: every method expects
the caller (the store) to hold the store's lock.

Tiers, fastest first: ``device`` (optional), ``host``, ``storage``. The compute tier is the fastest
one present; acquired pages are viewed there.

Page table invariants (``check_invariants`` asserts them):
  * A page's location is ``entry.tier``: its fastest complete copy (``storage`` when no faster tier
    holds one). Faster tiers hold a copy as a :class:`Block` of their pool in ``entry.blocks``.
    Lower tiers may keep a clean copy too (storage always does; host keeps the staging copy of a
    device page until it is evicted); copies never go stale because pages are read-only.
  * A page is in flight (``entry.hop``) from ``entry.tier`` to the next faster tier, at most one hop
    at a time, and only as part of a transfer job (``entry.route``). The hop's destination block is
    reserved in its pool for the whole flight.
  * A tier's pool usage equals the sum of its pages' blocks plus the blocks reserved by hops into
    it, and never exceeds its budget (the pool's allocator cannot hand out more).
  * Never evicted: a copy that is the source or destination of a hop in flight; the location copy
    of a page that is acquired (``pins``) or resident-pinned (``resident``). Prefetched pages not
    yet acquired are evicted only by demand requests, after every other candidate.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from flashtier.tiers.base import Block, SlabPool
from flashtier.tiers.config import StoreConfig
from flashtier.tiers.jobs import TransferJob
from flashtier.tiers.page import PageDesc, PageId
from flashtier.tiers.policies import EvictionPolicy
from flashtier.tiers.stats import StoreStats
from flashtier.tiers.storage import HostPlacement, StorageTier

TIER_ORDER = ("device", "host", "storage")
"""All tier names, fastest first."""


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


class PageManager:
    """Page table and eviction decisions (see the module docstring)."""

    def __init__(
        self,
        pools: dict[str, SlabPool],
        policies: dict[str, EvictionPolicy],
        storage: StorageTier,
        config: StoreConfig,
        stats: StoreStats,
    ) -> None:
        self.pools = pools
        self.policies = policies
        self.storage = storage
        self.config = config
        self.stats = stats
        self.tiers = [t for t in TIER_ORDER if t in pools or t == "storage"]
        self.rank = {t: i for i, t in enumerate(self.tiers)}
        self.compute_tier = self.tiers[0]
        self.pages: dict[PageId, PageEntry] = {}
        self._inflight = {t: 0 for t in self.tiers}
        self._pending_events: list[object] = []
        self._sizes: dict[str, int] = {}
        self._prefetch_seq = itertools.count(1)

    # -- registry ----------------------------------------------------------------------------

    def register(self, desc: PageDesc) -> None:
        """Add a page at rest in storage (idempotent for an identical descriptor)."""
        existing = self.pages.get(desc.page_id)
        if existing is not None:
            if existing.desc != desc:
                raise ValueError(
                    f"page {desc.page_id!r} is already registered with {existing.desc}"
                )
            return
        self.storage.check_source(desc, self._sizes)
        self.pages[desc.page_id] = PageEntry(desc, self.storage.placement(desc))

    def unregister(self, page_id: PageId) -> None:
        """Forget a page and free its copies; ValueError if it is pinned or in flight."""
        entry = self.entry(page_id)
        if entry.pins or entry.resident or entry.hop is not None:
            raise ValueError(f"page {page_id!r} is in use (acquired, resident or in flight)")
        for tier, block in list(entry.blocks.items()):
            self.pools[tier].release(block)
            self.policies[tier].remove(page_id)
        del self.pages[page_id]

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
            self.policies[entry.tier].touch(entry.desc.page_id)

    def count_access(self, entry: PageEntry) -> None:
        """Hits and misses of one acquire, per tier, before any transfer it causes."""
        self.stats.acquires += 1
        if entry.hop is not None:
            self.stats.late += 1
        for tier in self.tiers:
            tier_stats = self.stats.tiers[tier]
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
    ) -> torch.Tensor:
        """A tensor over the page's location copy (no copy); default dtype/shape from the desc."""
        default = dtype is None and shape is None
        if default and entry.view is not None:
            return entry.view
        tier = entry.tier
        offset = entry.placement.view_offset if tier == "host" else 0
        raw = self.pools[tier].view(entry.blocks[tier], offset, entry.desc.nbytes)
        if shape is None:
            shape = entry.desc.shape if dtype is None else (-1,)
        tensor = raw.view(dtype or entry.desc.dtype).view(shape)
        if default:
            entry.view = tensor
        return tensor

    # -- hops --------------------------------------------------------------------------------

    def next_tier(self, entry: PageEntry, target: str) -> str | None:
        """The tier one step faster than the page's location, or None if it is at ``target``."""
        rank = self.rank[entry.tier]
        return self.tiers[rank - 1] if rank > self.rank[target] else None

    def prepare_hop(
        self, entry: PageEntry, dst: str, demand: bool, priority: int
    ) -> HopSpec | Room:
        """Reserve a block in ``dst`` (evicting if needed) and record the hop as in flight."""
        pool = self.pools[dst]
        if dst == "host":
            need, dst_offset = entry.placement.block_bytes, entry.placement.view_offset
        else:
            need, dst_offset = entry.desc.nbytes, 0
        if pool.block_size(need) > pool.capacity:
            return Room.NEVER
        block = pool.try_allocate(need)
        if block is None:
            made = self._make_room(dst, pool.block_size(need), demand)
            if isinstance(made, Room):
                return made
            block = made
        src = entry.tier
        wait_events: tuple[object, ...] = ()
        if dst == "device" and self._pending_events:
            wait_events = tuple(self._pending_events)
            self._pending_events.clear()
        spec = HopSpec(
            page_id=entry.desc.page_id,
            desc=entry.desc,
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
        self._inflight[src] += 1
        self._inflight[dst] += 1
        return spec

    def complete_hop(self, spec: HopSpec, error: BaseException | None) -> PageEntry:
        """Record a hop's outcome: the page moves up to ``dst``, or stays and the block is freed."""
        entry = self.pages[spec.page_id]
        entry.hop = None
        self._inflight[spec.src] -= 1
        self._inflight[spec.dst] -= 1
        if error is not None:
            self.pools[spec.dst].release(spec.dst_block)
            self._pending_events.extend(spec.wait_events)  # the next copy must still wait on them
            self.stats.transfers_failed += 1
            return entry
        nbytes = spec.desc.nbytes
        entry.blocks[spec.dst] = spec.dst_block
        entry.tier = spec.dst
        entry.view = None
        self.policies[spec.dst].insert(spec.page_id, nbytes, self.config.reload_cost_s(nbytes))
        self.stats.tiers[spec.dst].bytes_written += nbytes
        self.stats.tiers[spec.src].bytes_read += nbytes
        return entry

    def room_denied_message(self, entry: PageEntry, tier: str) -> str:
        """Why ``tier`` cannot take ``entry`` now: need, budget, pinned bytes (for BudgetError)."""
        pool = self.pools[tier]
        need = entry.placement.block_bytes if tier == "host" else entry.desc.nbytes
        pinned = sum(
            e.blocks[tier].nbytes
            for e in self.pages.values()
            if tier in e.blocks and not self._evictable(e, tier, allow_unused=True)
        )
        flag = "--dram-budget" if tier == "host" else "--device-budget"
        return (
            f"the {tier} tier cannot take page {entry.desc.page_id!r}: it needs "
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
        if entry.tier == tier:
            if entry.pins or entry.resident:
                return False
            if entry.prefetched_unused and not allow_unused:
                return False
        return True

    def _victims(self, tier: str, demand: bool) -> Iterator[PageEntry]:
        """Evictable copies in ``tier``, best victim first.

        First the policy's order, skipping pages prefetched but not yet used; then, for demands
        only, those prefetched pages, the most recently prefetched first (the one needed furthest
        ahead, when prefetches are issued in order of need).
        """
        unused: list[PageEntry] = []
        for key in self.policies[tier].victims():
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

    def _make_room(self, tier: str, need: int, demand: bool) -> Block | Room:
        """Evict from ``tier`` in ``_victims`` order until a ``need``-byte block can be allocated.

        Evicts only when enough candidates exist to cover ``need``.
        """
        pool = self.pools[tier]
        while True:
            victims: list[PageEntry] = []
            freed = pool.free_bytes
            for candidate in self._victims(tier, demand):
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
        if demand and self._inflight[tier] == 0:
            return Room.NEVER
        return Room.WAIT

    def _evict(self, entry: PageEntry, tier: str) -> None:
        block = entry.blocks.pop(tier)
        self.pools[tier].release(block)
        self.policies[tier].evict(entry.desc.page_id)
        tier_stats = self.stats.tiers[tier]
        tier_stats.evictions += 1
        tier_stats.evicted_bytes += block.nbytes
        if entry.tier == tier:
            entry.tier = next((t for t in self.tiers if t in entry.blocks), "storage")
            entry.view = None
        if tier == "device" and entry.release_event is not None:
            self._pending_events.append(entry.release_event)
            entry.release_event = None

    # -- checks ------------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Assert the page table invariants of the module docstring (for tests)."""
        reserved = {t: 0 for t in self.pools}
        for page_id, e in self.pages.items():
            fastest = next((t for t in self.tiers if t in e.blocks), "storage")
            assert e.tier == fastest, f"{page_id!r}: location {e.tier}, fastest copy {fastest}"
            assert e.pins >= 0
            for tier, block in e.blocks.items():
                reserved[tier] += block.nbytes
            if e.hop is not None:
                assert e.route is not None, f"{page_id!r} in flight outside a job"
                assert e.hop.src == e.tier, f"{page_id!r} in flight from {e.hop.src}, at {e.tier}"
                assert self.rank[e.hop.dst] == self.rank[e.tier] - 1
                assert e.hop.dst not in e.blocks
                reserved[e.hop.dst] += e.hop.dst_block.nbytes
        for tier, pool in self.pools.items():
            assert pool.used == reserved[tier], f"{tier}: used {pool.used}, blocks {reserved[tier]}"
            assert pool.used <= pool.capacity, f"{tier} over budget"
            resident_in_tier = sum(1 for e in self.pages.values() if tier in e.blocks)
            assert len(self.policies[tier]) == resident_in_tier, f"{tier} policy out of sync"
            pool.check()
