"""The storage tier: pages at rest, read through a storage backend, or written back by an arena.

Unbounded. Pages registered from files always have their copy here (sources are read-only), so
such a page evicted from all faster tiers simply falls back here. Pages created in memory (KV
blocks) get their copy here when their arena's :class:`WriteBack` medium writes them (write-once,
checksummed, atomic), and are read back through it. This module knows how a page's source range lands in a host
block: the aligned span when the page's bytes can then be viewed in place (zero copy), or the exact
range through the backend's bounce buffer when the source offset would misalign the dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from flashtier.errors import StorageError
from flashtier.storage_backends.base import ReadJob, StorageBackend
from flashtier.tiers.page import PageDesc, PageId


class WriteBack(Protocol):
    """Where an arena's created pages go when their last memory copy is evicted.

    Contract: ``write`` is write-once (a second write of a page is a no-op) and atomic; ``read``
    returns exactly the bytes written, verified (IntegrityError otherwise, nothing returned);
    ``discard`` forgets pages (unknown ones are ignored)."""

    def write(self, page_id: PageId, data: torch.Tensor) -> None:
        """Store ``data`` (``uint8 [nbytes]``) as ``page_id``'s copy."""
        ...

    def read(self, page_ids: Sequence[PageId]) -> list[torch.Tensor]:
        """The bytes of ``page_ids``, in order (reads may run in parallel)."""
        ...

    def discard(self, page_ids: Sequence[PageId]) -> None:
        """Delete the copies of ``page_ids``."""
        ...


@dataclass(frozen=True, slots=True)
class HostPlacement:
    """How a page sits in its host block."""

    block_bytes: int
    """Bytes the host block must hold: the aligned span (in place) or the exact length (bounce)."""
    view_offset: int
    """Where the page's first byte lands in the block."""


class StorageTier:
    """Reads pages from their sources into host memory (see the module docstring)."""

    name = "storage"

    def __init__(self, backend: StorageBackend | None) -> None:
        """``backend`` None: a store of created pages only (registering a file page is an error)."""
        self.backend = backend
        self._backends: dict[str, StorageBackend] = {}
        self._write_backs: dict[str, WriteBack] = {}

    def set_write_back(self, arena: str, medium: WriteBack) -> None:
        """Write ``arena``'s created pages to ``medium`` (and read them back from it)."""
        self._write_backs[arena] = medium

    def write_back(self, arena: str) -> WriteBack | None:
        """The medium of ``arena``'s created pages (None for arenas of pages from files)."""
        return self._write_backs.get(arena)

    def forget_arena(self, arena: str) -> None:
        """Drop what is known about ``arena`` (its medium, its backend)."""
        self._write_backs.pop(arena, None)
        self._backends.pop(arena, None)

    def set_backend(self, arena: str, backend: StorageBackend) -> None:
        """Read ``arena``'s pages through ``backend`` (e.g. one that checks their checksums)
        instead of the store's."""
        self._backends[arena] = backend

    def placement(self, desc: PageDesc) -> HostPlacement:
        """Where ``desc``'s bytes go in a host block (zero copy unless the dtype would misalign)."""
        assert self.backend is not None  # check_source ran first
        plan = self.backend.plan(desc.source.offset, desc.source.length)
        if plan.head % desc.dtype.itemsize == 0:
            return HostPlacement(plan.span, plan.head)
        return HostPlacement(desc.source.length, 0)

    def load(
        self, desc: PageDesc, block: memoryview, placement: HostPlacement, priority: int,
        arena: str | None = None,
    ) -> ReadJob:
        """Start reading ``desc`` into ``block`` (laid out as ``placement``) through ``arena``'s
        backend; never blocks on IO."""
        src = desc.source
        # A span-sized dest makes the backend read in place; a length-sized one makes it bounce.
        dest = block[: placement.block_bytes]
        backend = self._backends.get(arena, self.backend) if arena is not None else self.backend
        assert backend is not None
        return backend.submit_read(src.path, src.offset, src.length, dest, priority)

    def check_source(self, desc: PageDesc, sizes: dict[str, int]) -> None:
        """StorageError if ``desc``'s range lies past the end of its file.

        ``sizes`` caches file sizes across calls.
        """
        src = desc.source
        if self.backend is None:
            raise ValueError(f"page {desc.page_id!r} comes from {src.path}, but this store has no storage backend "
                             "(it holds created pages only)")
        size = sizes.get(src.path)
        if size is None:
            size = sizes[src.path] = self.backend.file_size(src.path)
        if src.offset + src.length > size:
            raise StorageError(
                f"page {desc.page_id!r} needs bytes [{src.offset}, {src.offset + src.length}) of "
                f"{src.path}, which has {size} bytes; the checkpoint is truncated or the index "
                "is wrong"
            )
