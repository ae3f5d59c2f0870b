"""Statistics of the tiered store: per tier, and for the callers' waits.

Counters are updated under the store's lock and read through ``TieredStore.stats()``, which returns
a detached snapshot (``as_dict()`` is JSON-ready for ``generate --json``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields


@dataclass(slots=True)
class TierStats:
    """Counters of one tier."""

    bytes_read: int = 0
    """Bytes transferred out of this tier into a faster one (for storage: bytes read from disk)."""
    bytes_written: int = 0
    """Bytes transferred into this tier."""
    hits: int = 0
    """Acquires that found the page's fastest copy in this tier."""
    misses: int = 0
    """Acquires that had to go below this tier (counted for tiers above where the page was)."""
    evictions: int = 0
    """Pages evicted from this tier."""
    evicted_bytes: int = 0
    """Bytes evicted from this tier."""
    used_bytes: int = 0
    """Bytes allocated at snapshot time."""
    capacity_bytes: int = 0
    """The tier's budget (0 for storage: unbounded)."""

    def copy(self) -> TierStats:
        """A detached copy."""
        return TierStats(**{f.name: getattr(self, f.name) for f in fields(self)})


@dataclass(slots=True)
class StoreStats:
    """Counters of a store; ``tiers`` maps tier name to its :class:`TierStats`."""

    tiers: dict[str, TierStats] = field(default_factory=dict)
    """Per-tier counters, fastest tier first."""
    acquires: int = 0
    """Calls to acquire."""
    late: int = 0
    """Acquires whose page was still in flight (a prefetch that came too late)."""
    wait_s: float = 0.0
    """Seconds callers spent blocked in acquire / wait on transfers."""
    prefetches: int = 0
    """Prefetches that started a transfer."""
    prefetches_declined: int = 0
    """Prefetches dropped because the target tier had no evictable room."""
    transfers_failed: int = 0
    """Transfer hops that failed (their pages stayed where they were)."""

    def copy(self) -> StoreStats:
        """A detached copy."""
        return StoreStats(
            {name: t.copy() for name, t in self.tiers.items()},
            self.acquires,
            self.late,
            self.wait_s,
            self.prefetches,
            self.prefetches_declined,
            self.transfers_failed,
        )

    def add(self, other: StoreStats) -> None:
        """Add ``other``'s counters (and pool sizes) to these, tier by tier."""
        for name, t in other.tiers.items():
            mine = self.tiers.setdefault(name, TierStats())
            for f in fields(t):
                setattr(mine, f.name, getattr(mine, f.name) + getattr(t, f.name))
        self.acquires += other.acquires
        self.late += other.late
        self.wait_s += other.wait_s
        self.prefetches += other.prefetches
        self.prefetches_declined += other.prefetches_declined
        self.transfers_failed += other.transfers_failed

    def hit_rate(self, tier: str) -> float:
        """hits / (hits + misses) of ``tier`` (0.0 when it saw no acquire)."""
        t = self.tiers[tier]
        total = t.hits + t.misses
        return t.hits / total if total else 0.0

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready dict."""
        return {
            "tiers": {
                name: {f.name: getattr(t, f.name) for f in fields(t)}
                for name, t in self.tiers.items()
            },
            "acquires": self.acquires,
            "late": self.late,
            "wait_s": round(self.wait_s, 6),
            "prefetches": self.prefetches,
            "prefetches_declined": self.prefetches_declined,
            "transfers_failed": self.transfers_failed,
        }
