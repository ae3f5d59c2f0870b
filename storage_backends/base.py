"""The storage backend interface: bytes at rest, read and written by (path, offset, length).

A backend knows nothing of tiers or models. Reads are asynchronous jobs: ``submit_read`` returns a
:class:`ReadJob` at once; the bytes land in the caller's buffer on IO threads; ``job.wait()``
returns a ``memoryview`` of exactly the asked bytes.

Placement contract (what lets callers avoid copies):
  * ``plan = backend.plan(offset, length)`` gives the aligned superset the backend reads.
  * If ``dest`` holds at least ``plan.span`` bytes and starts at an aligned address, the backend
    reads straight into it and the result is ``dest[plan.head : plan.head + length]``: no copy.
  * If ``dest`` holds at least ``length`` bytes only, the result is ``dest[:length]``; the backend
    reads through an aligned bounce buffer when its IO mode needs one (one extra copy, counted in
    ``stats().bounce_copies``).
  * With ``dest=None`` the backend allocates an aligned buffer of ``plan.span`` bytes.
Bytes of ``dest`` outside the result but inside the span may be overwritten.

Errors: a failed or short read completes its job with :class:`~flashtier.errors.StorageError`
naming the file, the offset and the lengths; the job signals completion only once no IO thread
touches ``dest`` any more, and the backend stays usable for the next read.
"""

from __future__ import annotations

import itertools
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, fields

from flashtier.errors import StorageError
from flashtier.storage_backends.aligned import ReadPlan, allocate_aligned, is_aligned

Buffer = bytes | bytearray | memoryview
"""Anything exposing the buffer protocol as contiguous bytes."""


@dataclass(slots=True)
class BackendStats:
    """Counters of one backend since it was opened. ``snapshot()`` returns a detached copy."""

    reads_submitted: int = 0
    """Read jobs submitted."""
    reads_failed: int = 0
    """Read jobs that completed with an error (short reads included)."""
    bytes_read: int = 0
    """Bytes asked by completed read jobs (not counting alignment padding)."""
    bytes_transferred: int = 0
    """Bytes actually read from storage, alignment padding included."""
    chunks: int = 0
    """Chunk reads issued to IO threads."""
    bounce_copies: int = 0
    """Reads that went through a bounce buffer because ``dest`` could not hold the span."""
    bytes_written: int = 0
    """Bytes written by ``write_atomic``."""
    buffered_files: int = 0
    """Files read with buffered IO (+ FADV_DONTNEED) because O_DIRECT was unavailable."""

    def snapshot(self) -> BackendStats:
        """A copy that later IO does not change."""
        return BackendStats(**{f.name: getattr(self, f.name) for f in fields(self)})

    def as_dict(self) -> dict[str, int]:
        """The counters as a JSON-ready dict."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(slots=True)
class _ChunkOutcome:
    first_error: BaseException | None = None
    remaining: int = 0
    transferred: int = 0


class ReadJob:
    """One submitted read, split into chunks that IO threads fill in parallel.

    ``done()`` never blocks; ``wait()`` blocks until every chunk has finished and returns the
    result view (or raises the job's StorageError). Completion callbacks run on the IO thread that
    finished the last chunk, after the result is set.
    """

    __slots__ = (
        "job_id", "path", "plan", "_result", "_bounce_src", "_future", "_lock", "_outcome",
        "_on_finish",
    )

    def __init__(
        self,
        job_id: int,
        path: str,
        plan: ReadPlan,
        n_chunks: int,
        result: memoryview,
        bounce_src: memoryview | None,
        on_finish: Callable[[ReadJob, BaseException | None, int], None],
    ) -> None:
        self.job_id = job_id
        self.path = path
        self.plan = plan
        self._result = result
        self._bounce_src = bounce_src
        self._future: Future[memoryview] = Future()
        self._lock = threading.Lock()
        self._outcome = _ChunkOutcome(remaining=n_chunks)
        self._on_finish = on_finish
        if n_chunks == 0:
            self._finish()

    @property
    def failed(self) -> bool:
        """Whether a chunk has already failed (later chunks skip their IO)."""
        return self._outcome.first_error is not None

    def done(self) -> bool:
        """Whether the job has completed, successfully or not. Never blocks."""
        return self._future.done()

    def wait(self, timeout: float | None = None) -> memoryview:
        """Block until complete; return a view of exactly the asked bytes or raise StorageError."""
        return self._future.result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Block until complete; return the job's error, or None on success."""
        return self._future.exception(timeout)

    def add_done_callback(self, fn: Callable[[ReadJob], None]) -> None:
        """Call ``fn(job)`` once the job completes (at once if it already has)."""
        self._future.add_done_callback(lambda _f: fn(self))

    def chunk_finished(self, transferred: int, error: BaseException | None) -> None:
        """Record one chunk's outcome (called by IO threads); the last one completes the job."""
        with self._lock:
            outcome = self._outcome
            outcome.transferred += transferred
            if error is not None and outcome.first_error is None:
                outcome.first_error = error
            outcome.remaining -= 1
            last = outcome.remaining == 0
        if last:
            self._finish()

    def _finish(self) -> None:
        error = self._outcome.first_error
        if error is None and self._bounce_src is not None:
            self._result[:] = self._bounce_src
        self._bounce_src = None
        self._on_finish(self, error, self._outcome.transferred)
        if error is None:
            self._future.set_result(self._result)
        else:
            self._future.set_exception(error)


@dataclass(frozen=True, slots=True)
class Placement:
    """Where one read lands: ``required`` bytes needed from ``file_offset`` into ``target``."""

    file_offset: int
    """First file byte the IO reads."""
    target: memoryview
    """Buffer the IO fills (the span, or the exact range for unaligned IO)."""
    required: int
    """Leading bytes of ``target`` the job needs; a read returning fewer is short."""
    result: memoryview
    """What the job hands back: exactly the asked bytes."""
    bounce_src: memoryview | None
    """Sub-view of a bounce ``target`` to copy into ``result`` on success, or None."""


@dataclass(frozen=True, slots=True)
class ChunkTask:
    """One contiguous piece of a read: ``nbytes`` from ``file_offset`` into ``target``.

    ``required`` is how many of those bytes the job needs (less than ``nbytes`` only for the last
    chunk, whose alignment padding may lie beyond the end of the file).
    """

    file_offset: int
    target: memoryview
    required: int


def split_chunks(
    start: int, nbytes: int, required: int, target: memoryview, chunk_size: int
) -> Iterator[ChunkTask]:
    """Cut ``nbytes`` from file offset ``start`` into ``chunk_size`` pieces over ``target``.

    ``required`` is how many leading bytes of the range the job needs; pieces past it still read
    (the padding of an aligned span) but need nothing.
    """
    for pos in range(0, nbytes, chunk_size):
        size = min(chunk_size, nbytes - pos)
        need = max(0, min(size, required - pos))
        yield ChunkTask(start + pos, target[pos : pos + size], need)


def short_read_error(
    path: str, plan: ReadPlan, chunk: ChunkTask, got: int
) -> StorageError:
    """The StorageError for a chunk that returned fewer bytes than the job needs."""
    return StorageError(
        f"short read from {path}: asked {plan.length} bytes at offset {plan.offset}; "
        f"the chunk at offset {chunk.file_offset} returned {got} of {chunk.required} needed bytes "
        "(was the file truncated or replaced while running?)"
    )


class StorageBackend(ABC):
    """Reads and writes named byte ranges of files. Thread-safe; see the module docstring."""

    def __init__(self, alignment: int) -> None:
        if alignment < 1:
            raise ValueError(f"alignment must be >= 1, got {alignment}")
        self._alignment = alignment
        self._ids = itertools.count(1)
        self._stats = BackendStats()
        self._stats_lock = threading.Lock()

    @property
    def alignment(self) -> int:
        """Alignment of offsets, lengths and addresses of the reads this backend issues."""
        return self._alignment

    def plan(self, offset: int, length: int) -> ReadPlan:
        """The aligned superset read for ``[offset, offset + length)`` (see module docstring)."""
        return ReadPlan.for_range(offset, length, self._alignment)

    @abstractmethod
    def submit_read(
        self,
        path: str,
        offset: int,
        length: int,
        dest: memoryview | None = None,
        priority: int = 0,
    ) -> ReadJob:
        """Start reading ``length`` bytes of ``path`` at ``offset``; never blocks on IO.

        Lower ``priority`` values are served first. Raises ValueError if ``dest`` is too small or
        read-only; IO errors surface from the job, as StorageError.
        """

    def read_into(
        self, path: str, offset: int, length: int, dest: memoryview | None = None
    ) -> memoryview:
        """Synchronous read: ``submit_read(...).wait()``."""
        return self.submit_read(path, offset, length, dest).wait()

    @abstractmethod
    def write_atomic(self, path: str, chunks: Sequence[Buffer]) -> int:
        """Write the concatenation of ``chunks`` to ``path`` atomically; return its zlib.crc32.

        Readers see either the old file or the whole new one, never a torn write.
        """

    @abstractmethod
    def file_size(self, path: str) -> int:
        """Current size of ``path`` in bytes; StorageError if it cannot be read."""

    def stats(self) -> BackendStats:
        """A snapshot of this backend's counters."""
        with self._stats_lock:
            return self._stats.snapshot()

    @abstractmethod
    def close(self) -> None:
        """Finish queued reads, stop IO threads, close files. Idempotent."""

    def __enter__(self) -> StorageBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- helpers for implementations ---------------------------------------------------------

    def _placement(self, plan: ReadPlan, dest: memoryview | None, aligned_io: bool) -> Placement:
        """Choose where the read lands (see the module docstring for the contract).

        With ``aligned_io`` the whole span is read from ``plan.aligned_offset`` into an aligned
        buffer (``dest`` itself when it can hold the span, else a bounce buffer). Without it the
        exact range is read straight into the result view.
        """
        if dest is not None:
            if dest.readonly:
                raise ValueError("read destination must be writable")
            if dest.ndim != 1 or dest.format != "B":
                dest = dest.cast("B")
            if len(dest) < plan.length:
                raise ValueError(
                    f"read destination holds {len(dest)} bytes, the read needs {plan.length} "
                    f"(or {plan.span} aligned for a zero-copy read)"
                )
        if dest is None:
            dest = allocate_aligned(plan.span)
        fits_span = len(dest) >= plan.span
        result = dest[plan.head : plan.head + plan.length] if fits_span else dest[: plan.length]
        if not aligned_io:
            return Placement(plan.offset, result, plan.length, result, None)
        if fits_span and is_aligned(dest, self._alignment):
            span = dest[: plan.span]
            return Placement(plan.aligned_offset, span, plan.head + plan.length, result, None)
        bounce = allocate_aligned(plan.span)
        with self._stats_lock:
            self._stats.bounce_copies += 1
        return Placement(
            plan.aligned_offset,
            bounce,
            plan.head + plan.length,
            result,
            bounce[plan.head : plan.head + plan.length],
        )

    def _new_job(
        self,
        path: str,
        plan: ReadPlan,
        n_chunks: int,
        result: memoryview,
        bounce_src: memoryview | None,
    ) -> ReadJob:
        with self._stats_lock:
            self._stats.reads_submitted += 1
            self._stats.chunks += n_chunks
        job_id = next(self._ids)
        return ReadJob(job_id, path, plan, n_chunks, result, bounce_src, self._job_finished)

    def _job_finished(self, job: ReadJob, error: BaseException | None, transferred: int) -> None:
        with self._stats_lock:
            self._stats.bytes_transferred += transferred
            if error is None:
                self._stats.bytes_read += job.plan.length
            else:
                self._stats.reads_failed += 1

    def _count_written(self, nbytes: int) -> None:
        with self._stats_lock:
            self._stats.bytes_written += nbytes
