"""Page-aligned buffers and the arithmetic of aligned read spans.

O_DIRECT needs the file offset, the length and the memory address of every read to be multiples of
the device's block size. A byte range ``[offset, offset + length)`` is therefore read as its aligned
superset ``[aligned_offset, aligned_offset + span)``; the asked bytes start ``head`` bytes into it.

Buffers come from anonymous ``mmap`` (page-aligned, zero-filled lazily, so untouched pages cost no
resident memory) and are exposed as writable ``memoryview`` objects that numpy and torch can view
without copying (``torch.frombuffer(buf, dtype=torch.uint8)``).
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

import numpy as np

DEFAULT_ALIGNMENT = 4096
"""Alignment used for O_DIRECT: the memory page size, a multiple of every common block size."""


def align_down(value: int, alignment: int) -> int:
    """Largest multiple of ``alignment`` that is <= ``value``."""
    return value - (value % alignment)


def align_up(value: int, alignment: int) -> int:
    """Smallest multiple of ``alignment`` that is >= ``value``."""
    return -(-value // alignment) * alignment


@dataclass(frozen=True, slots=True)
class ReadPlan:
    """Where an exact byte range sits inside its aligned superset.

    Invariant: ``aligned_offset <= offset`` and ``offset + length <= aligned_offset + span``;
    ``head = offset - aligned_offset``. With alignment 1 the plan is the range itself.
    """

    offset: int
    """First asked byte in the file."""
    length: int
    """Number of asked bytes."""
    aligned_offset: int
    """File offset where the aligned read starts."""
    span: int
    """Bytes read from ``aligned_offset`` (a multiple of the alignment)."""
    head: int
    """Position of the first asked byte inside the span."""

    @classmethod
    def for_range(cls, offset: int, length: int, alignment: int) -> ReadPlan:
        """The aligned superset of ``[offset, offset + length)``."""
        if offset < 0 or length < 0:
            raise ValueError(
                f"byte range must be non-negative, got offset={offset} length={length}"
            )
        if alignment < 1:
            raise ValueError(f"alignment must be >= 1, got {alignment}")
        start = align_down(offset, alignment)
        end = align_up(offset + length, alignment)
        return cls(offset, length, start, end - start, offset - start)


def allocate_aligned(nbytes: int) -> memoryview:
    """A zero-filled, page-aligned, writable buffer of ``nbytes`` bytes (``nbytes`` may be 0).

    The memory is released when the last view of it is garbage-collected.
    """
    if nbytes < 0:
        raise ValueError(f"buffer size must be >= 0, got {nbytes}")
    if nbytes == 0:
        return memoryview(bytearray(0))
    return memoryview(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))


def buffer_address(buf: memoryview) -> int:
    """The memory address of the first byte of ``buf`` (used to check O_DIRECT alignment)."""
    if len(buf) == 0:
        return 0
    return int(np.frombuffer(buf, dtype=np.uint8).ctypes.data)


def is_aligned(buf: memoryview, alignment: int) -> bool:
    """Whether ``buf`` starts at a multiple of ``alignment`` in memory."""
    return buffer_address(buf) % alignment == 0
