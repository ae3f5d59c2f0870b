"""Base of the per-index config dataclasses (one per registered index)."""

from __future__ import annotations

from dataclasses import dataclass

from flashtier.errors import ConfigError


@dataclass(frozen=True)
class IndexConfig:
    """Knobs every index accepts."""

    scan_budget_fraction: float = 0.02
    """Share of the indexed keys an approximate index may score exactly per search (0, 1]."""
    seed: int = 0
    """Seed for the index's clustering, so builds are reproducible."""
    huge_pages: bool = True
    """Keep the large tables (keys, centroids, mean values) on transparent huge pages: a search
    reads them at scattered rows (:mod:`flashtier.tiers.hugepages`)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.scan_budget_fraction <= 1.0:
            raise ConfigError(
                f"scan_budget_fraction must be in (0, 1], got {self.scan_budget_fraction}; "
                "e.g. 0.02 scans 2% of the offloaded keys per search"
            )

    def bytes_per_key(self, dim: int) -> float:
        """Host bytes the index holds per indexed key of dimension ``dim`` (an estimate for
        planning budgets: an fp32 copy of the key and its int64 positions)."""
        return dim * 4 + 16

    def fixed_bytes(self, dim: int) -> int:
        """Host bytes the index may hold beside the per-key bytes (buffers of keys not yet
        indexed for good); an estimate for planning budgets."""
        return 0
