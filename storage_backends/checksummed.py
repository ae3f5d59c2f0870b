"""Checksummed reads: a storage backend wrapper that checks known byte ranges against their crc32.

A layout that records a checksum per extent (the expert extents of ``expert_layout``) registers
``(path, offset, length) -> (crc32, label)``. A read of exactly such a range completes only once its
bytes have been checked, on the IO thread that finished the read (zlib releases the GIL, so the
compute thread is not held up); a mismatch fails the read with IntegrityError naming the file, the
range and the label. A range that passed is not checked again (model files are read-only while a
model runs); ``always=True`` checks every read. Any other read passes through untouched.

The wrapper shares the inner backend's IO threads and counters and does not own it: ``close()``
leaves the inner backend open.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

from flashtier.errors import IntegrityError
from flashtier.storage_backends.atomic import crc32
from flashtier.storage_backends.base import ReadJob, StorageBackend
from flashtier.storage_backends.wrapping import WrappingBackend

RangeKey = tuple[str, int, int]
"""(path, offset, length) of a checksummed range."""


class _CheckedJob(ReadJob):
    """The job handed to the caller: completes after the inner read and the checksum check."""

    def __init__(self, job_id: int, inner: ReadJob, owner: ChecksummedBackend, key: RangeKey) -> None:
        super().__init__(job_id, inner.path, inner.plan, 1, memoryview(b""), None, _ignore)
        self._owner = owner
        self._key = key
        inner.add_done_callback(self._check)

    def _check(self, inner: ReadJob) -> None:
        """IO thread: the inner read finished; verify its bytes, then complete this job."""
        error = inner.exception()
        if error is None:
            data = inner.wait()
            error = self._owner._verify(self._key, data)
            self._result = data
        self.chunk_finished(0, error)


def _ignore(job: ReadJob, error: BaseException | None, transferred: int) -> None:
    return None


class ChecksummedBackend(WrappingBackend):
    """Verifies registered ranges on read (see the module docstring). Thread-safe."""

    def __init__(self, inner: StorageBackend, checksums: Mapping[RangeKey, tuple[int, str]], always: bool = False) -> None:
        super().__init__(inner)  # the inner backend belongs to the caller
        self._checksums = dict(checksums)
        self._always = always
        self._verified: set[RangeKey] = set()
        self._lock = threading.Lock()
        self.verified_bytes = 0
        """Bytes checked so far (for the statistics)."""

    def submit_read(self, path: str, offset: int, length: int, dest: memoryview | None = None,
                    priority: int = 0) -> ReadJob:
        key = (path, offset, length)
        job = self._inner.submit_read(path, offset, length, dest, priority)
        with self._lock:
            check = key in self._checksums and (self._always or key not in self._verified)
        if not check:
            return job
        return _CheckedJob(next(self._ids), job, self, key)

    def _verify(self, key: RangeKey, data: memoryview) -> IntegrityError | None:
        expected, label = self._checksums[key]
        actual = crc32(data)
        if actual != expected:
            path, offset, length = key
            return IntegrityError(
                f"{path}: checksum mismatch in {label} (bytes {offset}..{offset + length}): crc32 is "
                f"{actual:#010x}, the manifest says {expected:#010x}; the file is corrupt or was "
                "modified after conversion: convert the original checkpoint again, or use the original")
        with self._lock:
            self._verified.add(key)
            self.verified_bytes += len(data)
        return None
