"""An in-memory storage backend for tests, with fault injection.

Files are byte strings held in a dict. Reads run on IO threads through the same job machinery as
the real backend (chunks, placement, bounce buffers when ``alignment`` > 1), so tests exercise the
asynchronous paths. Faults: ``inject_fault('fail' | 'short', path, times)`` makes the next
``times`` matching reads fail or come back short; ``hold_reads(path)`` parks the reads of ``path``
(of every file if None) until ``release_reads()``, to observe pages in flight deterministically.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from flashtier.errors import StorageError
from flashtier.storage_backends.atomic import crc32
from flashtier.storage_backends.base import (
    Buffer,
    ChunkTask,
    ReadJob,
    StorageBackend,
    short_read_error,
    split_chunks,
)
from flashtier.storage_backends.io_workers import IoWorkerPool

FaultKind = Literal["fail", "short"]


@dataclass(slots=True)
class _Fault:
    kind: FaultKind
    path: str | None
    remaining: int


class MemoryBackend(StorageBackend):
    """Files in memory, read asynchronously on ``queue_depth`` threads. Thread-safe."""

    def __init__(
        self, *, alignment: int = 1, chunk_size: int = 1 << 20, queue_depth: int = 2
    ) -> None:
        super().__init__(alignment)
        if chunk_size < 1 or chunk_size % alignment:
            raise ValueError(f"chunk_size must be a positive multiple of {alignment}")
        self._chunk_size = chunk_size
        self._lock = threading.Lock()
        self._files: dict[str, bytes] = {}
        self._faults: list[_Fault] = []
        self._held: set[str | None] = set()
        self._released = threading.Condition(self._lock)
        self._pool = IoWorkerPool(queue_depth, "flashtier-memio")
        self.read_log: list[tuple[str, int, int]] = []
        """(path, offset, length) of every submitted read, in order."""

    # -- test controls -------------------------------------------------------------------------

    def add_file(self, path: str, data: Buffer) -> None:
        """Create or replace ``path`` with ``data``."""
        with self._lock:
            self._files[path] = bytes(data)

    def truncate(self, path: str, size: int) -> None:
        """Cut ``path`` to ``size`` bytes (later reads past it come back short)."""
        with self._lock:
            self._files[path] = self._files[path][:size]

    def remove(self, path: str) -> None:
        """Delete ``path`` (later reads fail)."""
        with self._lock:
            del self._files[path]

    def inject_fault(self, kind: FaultKind, path: str | None = None, times: int = 1) -> None:
        """Make the next ``times`` reads of ``path`` (any path if None) fail or return short."""
        with self._lock:
            self._faults.append(_Fault(kind, path, times))

    def hold_reads(self, path: str | None = None) -> None:
        """Park reads of ``path`` (all reads if None) before their IO until ``release_reads()``.

        A parked read occupies its IO thread: hold fewer files than ``queue_depth`` threads if
        other reads must proceed meanwhile.
        """
        with self._lock:
            self._held.add(path)

    def release_reads(self) -> None:
        """Let parked and later reads proceed."""
        with self._lock:
            self._held.clear()
            self._released.notify_all()

    # -- StorageBackend ------------------------------------------------------------------------

    def submit_read(
        self,
        path: str,
        offset: int,
        length: int,
        dest: memoryview | None = None,
        priority: int = 0,
    ) -> ReadJob:
        plan = self.plan(offset, length)
        placement = self._placement(plan, dest, aligned_io=self.alignment > 1)
        with self._lock:
            self.read_log.append((path, offset, length))
            fault = self._take_fault(path)
        chunks = list(
            split_chunks(
                placement.file_offset,
                len(placement.target),
                placement.required,
                placement.target,
                self._chunk_size,
            )
        )
        job = self._new_job(path, plan, len(chunks), placement.result, placement.bounce_src)
        for i, chunk in enumerate(chunks):
            chunk_fault = fault if i == len(chunks) - 1 else None  # the last chunk misbehaves
            self._pool.submit(
                lambda chunk=chunk, f=chunk_fault: self._read_chunk(job, chunk, f), priority
            )
        return job

    def _take_fault(self, path: str) -> FaultKind | None:
        for fault in self._faults:
            if fault.path in (None, path):
                fault.remaining -= 1
                if fault.remaining == 0:
                    self._faults.remove(fault)
                return fault.kind
        return None

    def _read_chunk(self, job: ReadJob, chunk: ChunkTask, fault: FaultKind | None) -> None:
        with self._lock:
            self._released.wait_for(lambda: not self._held.intersection((None, job.path)))
            data = self._files.get(job.path)
        if job.failed:
            job.chunk_finished(0, None)
            return
        if data is None:
            job.chunk_finished(0, StorageError(f"cannot read {job.path}: no such file"))
            return
        if fault == "fail":
            job.chunk_finished(
                0, StorageError(f"injected IO error reading {job.path} at {chunk.file_offset}")
            )
            return
        piece = data[chunk.file_offset : chunk.file_offset + len(chunk.target)]
        if fault == "short":
            piece = piece[: max(0, chunk.required - 1)]
        chunk.target[: len(piece)] = piece
        got = len(piece)
        error = short_read_error(job.path, job.plan, chunk, got) if got < chunk.required else None
        job.chunk_finished(got, error)

    def write_atomic(self, path: str, chunks: Sequence[Buffer]) -> int:
        data = b"".join(bytes(memoryview(c).cast("B")) for c in chunks)
        with self._lock:
            self._files[path] = data
        self._count_written(len(data))
        return crc32(data)

    def file_size(self, path: str) -> int:
        with self._lock:
            data = self._files.get(path)
        if data is None:
            raise StorageError(f"cannot stat {path}: no such file")
        return len(data)

    def close(self) -> None:
        self.release_reads()
        self._pool.close()
