"""A best-fit range allocator over one slab of ``capacity`` bytes.

Invariants: allocated ranges never overlap and all lie in ``[0, capacity)``; ``used`` is the sum
of allocated sizes (each rounded up to ``alignment``), so ``used <= capacity`` always; free ranges
are kept sorted by offset and coalesced with their neighbours on free.

Best fit keeps large holes for large pages; the free list stays short when pages are few and
large (MBs), which is the case here, so linear scans are cheap.
"""

from __future__ import annotations

import bisect


class RangeAllocator:
    """Hands out aligned ``(offset, size)`` ranges of a slab. Not thread-safe (the store locks)."""

    __slots__ = ("capacity", "alignment", "_free_offsets", "_free_sizes", "_allocated", "_used")

    def __init__(self, capacity: int, alignment: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        if alignment < 1:
            raise ValueError(f"alignment must be >= 1, got {alignment}")
        usable = capacity - capacity % alignment
        self.capacity = capacity
        self.alignment = alignment
        self._free_offsets: list[int] = [0] if usable else []
        self._free_sizes: list[int] = [usable] if usable else []
        self._allocated: dict[int, int] = {}
        self._used = 0

    @property
    def used(self) -> int:
        """Bytes currently allocated (alignment padding included)."""
        return self._used

    @property
    def free_bytes(self) -> int:
        """Bytes not allocated (possibly split into several holes)."""
        return self.capacity - self._used

    def largest_hole(self) -> int:
        """Size of the largest free range."""
        return max(self._free_sizes, default=0)

    def rounded(self, nbytes: int) -> int:
        """What an allocation of ``nbytes`` actually takes."""
        return -(-nbytes // self.alignment) * self.alignment

    def allocate(self, nbytes: int) -> int | None:
        """Offset of a new range of ``nbytes`` (rounded up), or None if no hole is big enough."""
        size = max(self.rounded(nbytes), self.alignment)
        best = -1
        best_size = 0
        for i, hole in enumerate(self._free_sizes):
            if hole >= size and (best < 0 or hole < best_size):
                best, best_size = i, hole
                if hole == size:
                    break
        if best < 0:
            return None
        offset = self._free_offsets[best]
        if best_size == size:
            del self._free_offsets[best]
            del self._free_sizes[best]
        else:
            self._free_offsets[best] = offset + size
            self._free_sizes[best] = best_size - size
        self._allocated[offset] = size
        self._used += size
        return offset

    def free(self, offset: int) -> int:
        """Return the range at ``offset`` to the free list; return its size."""
        size = self._allocated.pop(offset, None)
        if size is None:
            raise ValueError(f"offset {offset} is not an allocated range")
        self._used -= size
        i = bisect.bisect_left(self._free_offsets, offset)
        merge_prev = i > 0 and self._free_offsets[i - 1] + self._free_sizes[i - 1] == offset
        merge_next = i < len(self._free_offsets) and offset + size == self._free_offsets[i]
        if merge_prev and merge_next:
            self._free_sizes[i - 1] += size + self._free_sizes[i]
            del self._free_offsets[i]
            del self._free_sizes[i]
        elif merge_prev:
            self._free_sizes[i - 1] += size
        elif merge_next:
            self._free_offsets[i] = offset
            self._free_sizes[i] += size
        else:
            self._free_offsets.insert(i, offset)
            self._free_sizes.insert(i, size)
        return size

    def check(self) -> None:
        """Assert the invariants (for tests)."""
        ranges = sorted(
            [(o, s, "used") for o, s in self._allocated.items()]
            + [(o, s, "free") for o, s in zip(self._free_offsets, self._free_sizes)]
        )
        pos = ranges[0][0] if ranges else 0
        for offset, size, _ in ranges:
            assert offset >= pos, f"overlapping ranges at {offset}"
            pos = offset + size
        assert pos <= self.capacity, "a range lies past the capacity"
        assert self._used == sum(self._allocated.values()) <= self.capacity
        assert self._free_offsets == sorted(self._free_offsets)
