"""The device tier: accelerator memory when CUDA is available, else a CPU stand-in.

The stand-in follows the same budget rules (one slab, the same sub-allocator, the same pinning and
eviction by the store), so every bit of tier logic is tested on CPU-only machines; only the byte
copies differ (the transfer handler uses a CUDA stream when the slab is on a GPU). A device budget
of 0 means no device tier: the store then computes on the host tier.
"""

from __future__ import annotations

import torch

from flashtier.errors import BudgetError, ConfigError
from flashtier.tiers.base import SlabPool, aligned_slab

DEVICE_ALIGNMENT = 256
"""Block alignment in device memory (what CUDA kernels expect of tensor starts)."""


class DevicePool(SlabPool):
    """The device tier's slab on ``device`` ('cuda[:n]' or 'cpu' for the stand-in)."""

    def __init__(
        self, capacity: int, *, device: torch.device, alignment: int = DEVICE_ALIGNMENT
    ) -> None:
        if capacity <= 0:
            raise ConfigError(
                f"device budget must be > 0 bytes to build a device tier, got {capacity}; "
                "use device budget 0 to run without one"
            )
        if device.type not in ("cuda", "cpu"):
            raise ConfigError(f"device tier must be on 'cuda' or 'cpu' (stand-in), got {device}")
        try:
            if device.type == "cuda":
                slab = torch.empty(capacity, dtype=torch.uint8, device=device)
            else:
                raw = torch.empty(capacity + alignment, dtype=torch.uint8)
                slab = aligned_slab(raw, capacity, alignment)
        except RuntimeError as e:
            raise BudgetError(
                f"cannot allocate the {capacity}-byte device slab on {device}: {e}; "
                "lower --device-budget"
            ) from e
        super().__init__("device", slab, alignment)

    @property
    def is_cuda(self) -> bool:
        """Whether the slab is accelerator memory (copies then use a CUDA stream)."""
        return self.device.type == "cuda"
