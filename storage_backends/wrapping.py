"""A backend that adds something to the reads of another one and delegates everything else.

:class:`WrappingBackend` is the base of the read wrappers (checksums, compressed copies): they
override ``submit_read`` and inherit the inner backend's placement plan, writes, file sizes and
counters (``stats()`` are the inner backend's: what really reached storage). ``close()`` closes
the inner backend only when the wrapper owns it.
"""

from __future__ import annotations

from collections.abc import Sequence

from flashtier.storage_backends.aligned import ReadPlan
from flashtier.storage_backends.base import BackendStats, Buffer, StorageBackend


class WrappingBackend(StorageBackend):
    """Delegates all but ``submit_read`` to ``inner`` (see the module docstring)."""

    def __init__(self, inner: StorageBackend, owns_inner: bool = False) -> None:
        super().__init__(inner.alignment)
        self._inner = inner
        self._owns_inner = owns_inner

    def plan(self, offset: int, length: int) -> ReadPlan:
        return self._inner.plan(offset, length)

    def write_atomic(self, path: str, chunks: Sequence[Buffer]) -> int:
        return self._inner.write_atomic(path, chunks)

    def file_size(self, path: str) -> int:
        return self._inner.file_size(path)

    def stats(self) -> BackendStats:
        return self._inner.stats()

    def close(self) -> None:
        if self._owns_inner:
            self._inner.close()
