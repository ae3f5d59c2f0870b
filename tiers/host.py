"""The host DRAM tier: one slab allocated once up to the budget, with its own sub-allocator.

With CUDA the slab is pinned (page-locked) so host->device copies run asynchronously; without it
the slab is an anonymous ``mmap`` (page-aligned, so O_DIRECT reads land in it directly). Either way
the process's host memory for pages is bounded by the budget: nothing here allocates per page.
On a CPU-only machine this is the compute tier: acquired pages are used in place.
"""

from __future__ import annotations

import mmap

import torch

from flashtier.errors import BudgetError, ConfigError
from flashtier.tiers import hugepages
from flashtier.tiers.base import SlabPool, aligned_slab

HOST_ALIGNMENT = 4096
"""Block alignment of the host slab: the O_DIRECT alignment, so reads need no bounce buffer."""


class HostPool(SlabPool):
    """The host tier's slab (see the module docstring)."""

    def __init__(self, capacity: int, *, pinned: bool, alignment: int = HOST_ALIGNMENT,
                 huge_pages: bool = True) -> None:
        """``pinned`` asks for page-locked memory (needs CUDA); ``huge_pages`` advises an mmap slab
        for transparent huge pages (:mod:`flashtier.tiers.hugepages`)."""
        if capacity < 0:
            raise ConfigError(f"host budget must be >= 0 bytes, got {capacity}")
        if pinned and not torch.cuda.is_available():
            raise ConfigError(
                "pinned host memory needs CUDA; build the host tier with pinned=False"
            )
        self._mapping: mmap.mmap | None = None
        try:
            if capacity == 0:
                slab = torch.empty(0, dtype=torch.uint8)
            elif pinned:
                raw = torch.empty(capacity + alignment, dtype=torch.uint8, pin_memory=True)
                slab = aligned_slab(raw, capacity, alignment)
            else:
                self._mapping = hugepages.anonymous(capacity, huge=huge_pages)
                slab = torch.frombuffer(self._mapping, dtype=torch.uint8)
        except (RuntimeError, OSError) as e:
            raise BudgetError(
                f"cannot allocate the {capacity}-byte host slab "
                f"({'pinned' if pinned else 'mmap'}): "
                f"{e}; lower --dram-budget"
            ) from e
        super().__init__("host", slab, alignment)
        self.pinned = pinned
