"""Configuration of the tiered store."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from flashtier.errors import ConfigError
from flashtier.tiers.policies import available_policies

DevicePlacement = Literal["auto", "cuda", "cpu"]


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """Budgets and policies of a :class:`~flashtier.tiers.store.TieredStore`."""

    host_budget: int
    """Bytes of host DRAM for pages (one slab of this size is allocated up front)."""
    device_budget: int = 0
    """Bytes of device memory for pages; 0 means no device tier (compute on the host tier)."""
    host_policy: str = "lru"
    """Eviction policy of the host tier (see flashtier.tiers.policies)."""
    device_policy: str = "lru"
    """Eviction policy of the device tier."""
    device: DevicePlacement = "auto"
    """Where the device tier lives: 'cuda', 'cpu' (a stand-in with the same rules, for tests), or
    'auto' (cuda when available, else cpu)."""
    storage_gb_per_s: float = 1.3
    """Storage read bandwidth (from bench-io) used to estimate reload costs."""
    storage_latency_s: float = 1e-4
    """Storage read latency used to estimate reload costs."""
    host_tier_budget: int | None = None
    """The most host bytes all arenas together may be given (their shares are checked against it
    as they are added: one budget for the tier); None = the sum of what they are given."""
    huge_pages: bool = True
    """Back the host pools (the slab of each arena, the slot tables) with transparent huge pages
    where the kernel grants them (:mod:`flashtier.tiers.hugepages`): fewer TLB misses on streamed
    and scattered reads. A hint: without them the pools use 4 KiB pages as before."""

    def __post_init__(self) -> None:
        if self.host_budget <= 0:
            raise ConfigError(
                f"host budget must be > 0 bytes (pages are read from storage into host memory), "
                f"got {self.host_budget}; pass --dram-budget"
            )
        if self.device_budget < 0:
            raise ConfigError(f"device budget must be >= 0 bytes, got {self.device_budget}")
        if self.host_tier_budget is not None and self.host_tier_budget < self.host_budget:
            raise ConfigError(f"the host tier budget {self.host_tier_budget} cannot hold the default arena's "
                              f"{self.host_budget} bytes")
        _check_policies(self, "")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ConfigError(f"device must be 'auto', 'cuda' or 'cpu', got {self.device!r}")
        if self.storage_gb_per_s <= 0 or self.storage_latency_s < 0:
            raise ConfigError(
                "storage_gb_per_s must be > 0 and storage_latency_s >= 0 "
                "(run `flashtier bench-io` to measure them)"
            )

    def reload_cost_s(self, nbytes: int) -> float:
        """Estimated seconds to read ``nbytes`` back from storage."""
        return self.storage_latency_s + nbytes / (self.storage_gb_per_s * 1e9)


@dataclass(frozen=True, slots=True)
class ArenaConfig:
    """One arena of a store (see :mod:`flashtier.tiers.manager`): a named share of the tiers with
    its own budgets and eviction policies, for one kind of page (e.g. one MoE layer's experts)."""

    name: str
    """Unique within the store; also the key of its statistics."""
    host_budget: int
    """Bytes of host memory for the arena's pages."""
    device_budget: int = 0
    """Bytes of device memory; 0 = the arena computes on the host tier."""
    host_policy: str = "lru"
    """Eviction policy of the arena's host pool."""
    device_policy: str = "lru"
    """Eviction policy of the arena's device pool."""
    alignment: int = 4096
    """Alignment of its host blocks (4096: O_DIRECT reads land in place; smaller for pages that
    are never read from files, so that many small pages waste little)."""

    def __post_init__(self) -> None:
        if self.alignment < 1 or self.alignment & (self.alignment - 1):
            raise ConfigError(f"arena {self.name!r}: alignment must be a power of two, got {self.alignment}")
        if not self.name:
            raise ConfigError("an arena needs a name")
        if self.host_budget <= 0 or self.device_budget < 0:
            raise ConfigError(
                f"arena {self.name!r} needs a host budget > 0 and a device budget >= 0 bytes, got "
                f"{self.host_budget} and {self.device_budget}"
            )
        _check_policies(self, f" of arena {self.name!r}")


def _check_policies(config: StoreConfig | ArenaConfig, where: str) -> None:
    """ConfigError naming the valid policies if ``config``'s host or device policy is unknown."""
    for field_name in ("host_policy", "device_policy"):
        name = getattr(config, field_name)
        if name not in available_policies():
            raise ConfigError(
                f"{field_name} {name!r}{where} is unknown; choose one of {', '.join(available_policies())}"
            )
