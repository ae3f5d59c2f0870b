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

    def __post_init__(self) -> None:
        if self.host_budget <= 0:
            raise ConfigError(
                f"host budget must be > 0 bytes (pages are read from storage into host memory), "
                f"got {self.host_budget}; pass --dram-budget"
            )
        if self.device_budget < 0:
            raise ConfigError(f"device budget must be >= 0 bytes, got {self.device_budget}")
        for field_name in ("host_policy", "device_policy"):
            name = getattr(self, field_name)
            if name not in available_policies():
                raise ConfigError(
                    f"{field_name} {name!r} is unknown; choose one of "
                    f"{', '.join(available_policies())}"
                )
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
