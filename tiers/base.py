"""The interface of a capacity-bounded tier, and the slab pool that host and device tiers share.

A tier pool owns one slab of ``capacity`` bytes, allocated once when the pool is built, and hands
out :class:`Block` ranges of it through a best-fit sub-allocator. It only does accounting and
views: it never decides what to evict (the store's manager does) and never moves bytes (the
transfer handler does). Invariant: ``used <= capacity`` at all times, so the process's memory for
this tier is bounded by the slab.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from flashtier.tiers.allocator import RangeAllocator


@dataclass(frozen=True, slots=True)
class Block:
    """A range of a tier's slab: ``nbytes`` (alignment-rounded) from ``offset``."""

    offset: int
    nbytes: int


class TierPool(ABC):
    """A capacity-bounded pool of bytes in one kind of memory (see the module docstring)."""

    name: str
    """Tier name used in the page table and the statistics ('device', 'host')."""
    stable_views: bool = True
    """Whether a view of a block stays valid while the block is allocated (False for pools that
    reallocate their memory to grow: the store then does not cache page views)."""

    @property
    @abstractmethod
    def capacity(self) -> int:
        """The byte budget; allocations never exceed it."""

    @property
    @abstractmethod
    def used(self) -> int:
        """Bytes allocated now."""

    @property
    def free_bytes(self) -> int:
        """Bytes not allocated (maybe fragmented)."""
        return self.capacity - self.used

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Where the slab lives."""

    @abstractmethod
    def largest_hole(self) -> int:
        """The largest allocation that can succeed now."""

    @abstractmethod
    def block_size(self, nbytes: int) -> int:
        """What an allocation of ``nbytes`` takes from the budget."""

    @abstractmethod
    def try_allocate(self, nbytes: int) -> Block | None:
        """A block of at least ``nbytes``, or None if no free range is large enough."""

    @abstractmethod
    def release(self, block: Block) -> None:
        """Give ``block`` back. The caller guarantees nothing reads or writes it any more."""

    @abstractmethod
    def view(self, block: Block, byte_offset: int, nbytes: int) -> torch.Tensor:
        """A uint8 tensor over ``nbytes`` of ``block`` from ``byte_offset``; no copy."""

    @abstractmethod
    def buffer(self, block: Block) -> memoryview:
        """The block's bytes as a writable memoryview (host-addressable tiers only)."""


class SlabPool(TierPool):
    """A tier pool over one preallocated uint8 slab tensor. Not thread-safe (the store locks)."""

    def __init__(self, name: str, slab: torch.Tensor, alignment: int) -> None:
        if slab.dtype != torch.uint8 or slab.dim() != 1:
            raise ValueError("a slab must be a 1-D uint8 tensor")
        if alignment & (alignment - 1):
            raise ValueError(f"alignment must be a power of two, got {alignment}")
        self.name = name
        self._slab = slab
        self._alloc = RangeAllocator(slab.numel(), alignment)
        self._host_bytes: np.ndarray | None = slab.numpy() if slab.device.type == "cpu" else None

    @property
    def capacity(self) -> int:
        return self._alloc.capacity

    @property
    def used(self) -> int:
        return self._alloc.used

    @property
    def device(self) -> torch.device:
        return self._slab.device

    @property
    def alignment(self) -> int:
        """Alignment of every block's offset (and of the slab's base address)."""
        return self._alloc.alignment

    def largest_hole(self) -> int:
        return self._alloc.largest_hole()

    def block_size(self, nbytes: int) -> int:
        return max(self._alloc.rounded(nbytes), self._alloc.alignment)

    def try_allocate(self, nbytes: int) -> Block | None:
        offset = self._alloc.allocate(nbytes)
        if offset is None:
            return None
        return Block(offset, self.block_size(nbytes))

    def release(self, block: Block) -> None:
        self._alloc.free(block.offset)

    def view(self, block: Block, byte_offset: int, nbytes: int) -> torch.Tensor:
        if byte_offset < 0 or byte_offset + nbytes > block.nbytes:
            raise ValueError(
                f"view [{byte_offset}, {byte_offset + nbytes}) lies outside a "
                f"{block.nbytes}-byte block"
            )
        start = block.offset + byte_offset
        return self._slab[start : start + nbytes]

    def buffer(self, block: Block) -> memoryview:
        if self._host_bytes is None:
            raise TypeError(f"the {self.name} tier lives on {self.device}, not in host memory")
        return memoryview(self._host_bytes[block.offset : block.offset + block.nbytes])

    def check(self) -> None:
        """Assert the allocator's invariants (for tests)."""
        self._alloc.check()


def aligned_slab(raw: torch.Tensor, capacity: int, alignment: int) -> torch.Tensor:
    """The ``capacity``-byte sub-tensor of ``raw`` that starts at an ``alignment``-aligned address.

    ``raw`` must hold at least ``capacity + alignment`` bytes.
    """
    skip = (-raw.data_ptr()) % alignment
    return raw[skip : skip + capacity]
