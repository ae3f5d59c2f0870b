"""The storage tier: pages at rest, read through a storage backend.

Unbounded and always holding every page (sources are read-only files), so a page evicted from all
faster tiers simply falls back here. This module knows how a page's source range lands in a host
block: the aligned span when the page's bytes can then be viewed in place (zero copy), or the exact
range through the backend's bounce buffer when the source offset would misalign the dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

from flashtier.errors import StorageError
from flashtier.storage_backends.base import ReadJob, StorageBackend
from flashtier.tiers.page import PageDesc


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

    def __init__(self, backend: StorageBackend) -> None:
        self.backend = backend
        self._backends: dict[str, StorageBackend] = {}

    def set_backend(self, arena: str, backend: StorageBackend) -> None:
        """Read ``arena``'s pages through ``backend`` (e.g. one that checks their checksums)
        instead of the store's."""
        self._backends[arena] = backend

    def placement(self, desc: PageDesc) -> HostPlacement:
        """Where ``desc``'s bytes go in a host block (zero copy unless the dtype would misalign)."""
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
        return backend.submit_read(src.path, src.offset, src.length, dest, priority)

    def check_source(self, desc: PageDesc, sizes: dict[str, int]) -> None:
        """StorageError if ``desc``'s range lies past the end of its file.

        ``sizes`` caches file sizes across calls.
        """
        src = desc.source
        size = sizes.get(src.path)
        if size is None:
            size = sizes[src.path] = self.backend.file_size(src.path)
        if src.offset + src.length > size:
            raise StorageError(
                f"page {desc.page_id!r} needs bytes [{src.offset}, {src.offset + src.length}) of "
                f"{src.path}, which has {size} bytes; the checkpoint is truncated or the index "
                "is wrong"
            )
