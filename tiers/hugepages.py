"""Transparent huge pages for the large host buffers that decode reads at random or streams.

A decode step reads weights as long streams and the retrieval index, the host KV pool and the
expert caches at scattered rows. With 4 KiB pages each 4 KiB of a stream costs a TLB entry and the
hardware prefetchers stop at every page boundary; each scattered row costs a page walk. Backing
those buffers with 2 MiB pages (Linux transparent huge pages, asked for per mapping with
``madvise(MADV_HUGEPAGE)``, which works where the system setting is ``madvise`` or ``always``)
measured on this 2-core VM: the one-row bf16 kernel 15.3 -> 17.2 GB/s on one thread and 24.5 ->
29.7 on two, dense-1.7g's bf16 decode +10% (6 of 8 alternating pairs faster), with the kernel's
8-row tile of then (its one-row tile since streams 24-30 GB/s either way); no change measured for
the retrieval step nor for the quantized kernels, which are bound by instructions (README).

The advice is a hint: where the kernel has no huge pages to give (setting ``never``, memory too
fragmented) the buffer is backed by 4 KiB pages as before and nothing else changes. Memory: a huge
page is committed whole on its first touch, so a growing buffer filled only in part can hold up to
one 2 MiB page more than it wrote (growing buffers below :data:`GROWABLE_MIN_BYTES` are not
advised for that reason); a buffer written whole (a slab, a weight) costs nothing more.
"""

from __future__ import annotations

import math
import mmap

import torch

HUGE_PAGE = 2 << 20
"""Bytes of one transparent huge page on x86-64 and arm64 (4 KiB base pages)."""

MIN_BYTES = HUGE_PAGE
"""Mappings smaller than one huge page are not advised (they cannot hold one). A mapping of exactly
the bytes it holds costs nothing more: only 2 MiB ranges wholly inside it become huge pages."""

GROWABLE_MIN_BYTES = 4 * HUGE_PAGE
"""Least capacity of a growing buffer (:class:`~flashtier.retrieval.buffer.GrowableRows`) advised:
its first touch past the filled rows commits a whole huge page, so at most a quarter of it is slack."""


def advise(mapping: mmap.mmap) -> bool:
    """Ask for huge pages over all of ``mapping`` (an anonymous ``mmap`` not yet touched: pages
    faulted in before the advice stay small). False where the platform has no such advice or the
    kernel refuses it (THP compiled out); the mapping is unchanged then."""
    option = getattr(mmap, "MADV_HUGEPAGE", None)
    if option is None or len(mapping) == 0:
        return False
    try:
        mapping.madvise(option)
    except OSError:
        return False
    return True


def anonymous(nbytes: int, *, huge: bool) -> mmap.mmap:
    """A private anonymous mapping of ``nbytes`` (>= 1) zero bytes, advised for huge pages when
    ``huge`` and at least :data:`MIN_BYTES` long. OSError when the address space is exhausted."""
    mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge and nbytes >= MIN_BYTES:
        advise(mapping)
    return mapping


def empty(shape: tuple[int, ...], dtype: torch.dtype, *, huge: bool = True,
          min_bytes: int = MIN_BYTES, zeroed: bool = False) -> torch.Tensor:
    """An uninitialised (``zeroed``: zero-filled) CPU tensor ``shape`` of ``dtype``; at least
    ``min_bytes`` long and ``huge``, its own anonymous mapping advised for huge pages (zero-filled
    by the kernel), freed with the tensor. Smaller ones come from torch's allocator."""
    numel = math.prod(shape)
    nbytes = numel * dtype.itemsize
    if not huge or nbytes < max(min_bytes, MIN_BYTES):
        return torch.zeros(shape, dtype=dtype) if zeroed else torch.empty(shape, dtype=dtype)
    return torch.frombuffer(anonymous(nbytes, huge=True), dtype=dtype, count=numel).view(shape)


def advised_bytes() -> int:
    """Bytes of this process's mappings that carry the huge-page advice (``hg`` in their
    ``VmFlags``, /proc/self/smaps); 0 where smaps is not readable. For tests and diagnostics."""
    total = size = 0
    try:
        with open("/proc/self/smaps", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Size:"):
                    size = int(line.split()[1]) * 1024
                elif line.startswith("VmFlags:") and "hg" in line.split()[1:]:
                    total += size
    except OSError:
        return 0
    return total
