"""Reads from local files with O_DIRECT on a pool of IO threads (the queue depth).

Each read is split into ``chunk_size`` pieces that the IO threads fill in parallel with
``os.preadv`` (which releases the GIL). O_DIRECT bypasses the page cache, so what the budgets say
is what the process uses. Whether a filesystem accepts O_DIRECT is probed once per filesystem
(open with O_DIRECT and read one aligned block); where it does not (tmpfs, some overlay and network
filesystems) the backend warns once and reads with buffered IO followed by
``posix_fadvise(POSIX_FADV_DONTNEED)`` on the range, so the page cache never becomes a hidden tier.

Open files are cached; a file replaced on disk (new inode, e.g. an atomic rewrite) is reopened on
the next read, and one removed makes the next read fail with StorageError.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from flashtier.errors import ConfigError, StorageError
from flashtier.storage_backends.aligned import DEFAULT_ALIGNMENT, allocate_aligned
from flashtier.storage_backends.atomic import write_atomic
from flashtier.storage_backends.base import (
    Buffer,
    ChunkTask,
    ReadJob,
    StorageBackend,
    short_read_error,
    split_chunks,
)
from flashtier.storage_backends.io_workers import IoWorkerPool

log = logging.getLogger(__name__)

MiB = 1 << 20

DirectIOMode = Literal["auto", "require", "off"]

ProbeFn = Callable[[str, int], bool]
"""``probe(path, alignment) -> bool``: whether O_DIRECT reads work on ``path``'s filesystem."""


@dataclass(frozen=True, slots=True)
class DirectFileConfig:
    """Settings of :class:`DirectFileBackend`. Defaults were measured on the work disk (see
    ``flashtier bench-io``): 8 MiB chunks at queue depth 4 reach the disk limit."""

    queue_depth: int = 4
    """IO threads, i.e. reads in flight at once (2-8 saturates most SSDs with MiB-sized chunks)."""
    chunk_size: int = 8 * MiB
    """Large reads are split into pieces of this many bytes, issued in parallel."""
    alignment: int = DEFAULT_ALIGNMENT
    """O_DIRECT alignment of offsets, lengths and buffer addresses (a power of two >= 512)."""
    direct_io: DirectIOMode = "auto"
    """'auto': O_DIRECT where the filesystem supports it; 'require': fail where it does not;
    'off': always buffered reads followed by FADV_DONTNEED."""

    def __post_init__(self) -> None:
        if not 1 <= self.queue_depth <= 256:
            raise ConfigError(f"queue_depth must be in 1..256, got {self.queue_depth}")
        if self.alignment < 512 or self.alignment & (self.alignment - 1):
            raise ConfigError(
                f"alignment must be a power of two >= 512 (the block size), got {self.alignment}"
            )
        if self.chunk_size < self.alignment or self.chunk_size % self.alignment:
            raise ConfigError(
                f"chunk_size must be a positive multiple of alignment ({self.alignment}), "
                f"got {self.chunk_size}; try {8 * MiB} (8 MiB)"
            )
        if self.direct_io not in ("auto", "require", "off"):
            raise ConfigError(
                f"direct_io must be 'auto', 'require' or 'off', got {self.direct_io!r}"
            )


def probe_o_direct(path: str, alignment: int) -> bool:
    """Whether ``path`` can be opened with O_DIRECT and read with an aligned read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise
    try:
        os.preadv(fd, [allocate_aligned(alignment)], 0)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise
    finally:
        os.close(fd)
    return True


class _OpenFile:
    """A cached descriptor; closed once retired and no read holds it (refcounted)."""

    __slots__ = ("fd", "inode", "direct", "_refs", "_retired", "_lock")

    def __init__(self, fd: int, inode: tuple[int, int], direct: bool) -> None:
        self.fd = fd
        self.inode = inode
        self.direct = direct
        self._refs = 1  # the cache's own reference
        self._retired = False
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            self._refs += 1

    def release(self) -> None:
        with self._lock:
            self._refs -= 1
            close = self._refs == 0
        if close:
            os.close(self.fd)

    def retire(self) -> None:
        """Drop the cache's reference (the file was replaced or the backend closes)."""
        with self._lock:
            if self._retired:
                return
            self._retired = True
        self.release()


class DirectFileBackend(StorageBackend):
    """O_DIRECT reads of local files on ``queue_depth`` IO threads. See the module docstring."""

    def __init__(
        self, config: DirectFileConfig | None = None, *, probe: ProbeFn = probe_o_direct
    ) -> None:
        """``probe`` decides per filesystem whether O_DIRECT works (inject one to test fallback)."""
        self.config = config or DirectFileConfig()
        super().__init__(self.config.alignment)
        self._probe = probe
        self._lock = threading.Lock()
        self._files: dict[str, _OpenFile] = {}
        self._direct_by_fs: dict[int, bool] = {}
        self._pool = IoWorkerPool(self.config.queue_depth, "flashtier-io")
        self._closed = False

    # -- reads ---------------------------------------------------------------------------------

    def submit_read(
        self,
        path: str,
        offset: int,
        length: int,
        dest: memoryview | None = None,
        priority: int = 0,
    ) -> ReadJob:
        plan = self.plan(offset, length)
        try:
            handle = self._open(path)
        except StorageError as e:
            placement = self._placement(plan, dest, aligned_io=False)
            job = self._new_job(path, plan, 1, placement.result, None)
            job.chunk_finished(0, e)
            return job
        try:
            placement = self._placement(plan, dest, aligned_io=handle.direct)
        except BaseException:
            handle.release()
            raise
        chunks = list(
            split_chunks(
                placement.file_offset,
                len(placement.target),
                placement.required,
                placement.target,
                self.config.chunk_size,
            )
        )
        job = self._new_job(path, plan, len(chunks), placement.result, placement.bounce_src)
        job.add_done_callback(lambda _job: handle.release())
        for chunk in chunks:
            self._pool.submit(
                lambda chunk=chunk: self._read_chunk(job, handle, chunk), priority
            )
        return job

    def _read_chunk(self, job: ReadJob, handle: _OpenFile, chunk: ChunkTask) -> None:
        """IO thread: fill one chunk, report its outcome to the job (never raises)."""
        if job.failed:  # a sibling chunk failed: the job is lost, skip the IO
            job.chunk_finished(0, None)
            return
        got = 0
        error: BaseException | None = None
        try:
            got = _pread_full(handle.fd, chunk, self.config.alignment if handle.direct else 0)
            if not handle.direct:
                os.posix_fadvise(handle.fd, chunk.file_offset, len(chunk.target),
                                 os.POSIX_FADV_DONTNEED)
            if got < chunk.required:
                error = short_read_error(job.path, job.plan, chunk, got)
        except OSError as e:
            error = StorageError(
                f"reading {job.path} failed: {job.plan.length} bytes at offset {job.plan.offset} "
                f"(chunk of {len(chunk.target)} bytes at {chunk.file_offset}): {e}"
            )
            error.__cause__ = e
        job.chunk_finished(got, error)

    # -- files ---------------------------------------------------------------------------------

    def _open(self, path: str) -> _OpenFile:
        """The cached descriptor of ``path``, (re)opened if replaced on disk, with one reference
        taken for the caller (``release()`` it when the read is done)."""
        try:
            st = os.stat(path)
        except OSError as e:
            raise StorageError(f"cannot read {path}: {e.strerror}") from e
        inode = (st.st_dev, st.st_ino)
        with self._lock:
            if self._closed:
                raise RuntimeError("storage backend is closed")
            handle = self._files.get(path)
            if handle is not None and handle.inode == inode:
                handle.acquire()
                return handle
            direct = self._direct_allowed(path, st.st_dev)
            try:
                fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
            except OSError as e:
                raise StorageError(f"cannot open {path}: {e.strerror}") from e
            new = _OpenFile(fd, inode, direct)
            new.acquire()
            self._files[path] = new
            if not direct:
                with self._stats_lock:
                    self._stats.buffered_files += 1
        if handle is not None:
            handle.retire()
        return new

    def _direct_allowed(self, path: str, device: int) -> bool:
        """Probe once per filesystem (caller holds ``self._lock``)."""
        mode = self.config.direct_io
        if mode == "off":
            return False
        known = self._direct_by_fs.get(device)
        if known is not None:
            return known
        try:
            ok = self._probe(path, self.config.alignment)
        except OSError as e:
            raise StorageError(f"cannot probe O_DIRECT on {path}: {e.strerror}") from e
        if not ok and mode == "require":
            raise StorageError(
                f"the filesystem of {path} does not support O_DIRECT; move the files to a local "
                "disk or set direct_io='auto' to fall back to buffered reads"
            )
        if not ok:
            log.warning(
                "O_DIRECT is not supported on the filesystem of %s; reading it with buffered IO "
                "and dropping the read pages from the page cache (FADV_DONTNEED)", path
            )
        self._direct_by_fs[device] = ok
        return ok

    def file_size(self, path: str) -> int:
        try:
            return os.stat(path).st_size
        except OSError as e:
            raise StorageError(f"cannot stat {path}: {e.strerror}") from e

    # -- writes and lifetime -------------------------------------------------------------------

    def write_atomic(self, path: str, chunks: Sequence[Buffer]) -> int:
        checksum = write_atomic(path, chunks)
        self._count_written(sum(memoryview(c).nbytes for c in chunks))
        return checksum

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._pool.close()
        with self._lock:
            handles = list(self._files.values())
            self._files.clear()
        for handle in handles:
            handle.retire()


def _pread_full(fd: int, chunk: ChunkTask, alignment: int) -> int:
    """Read into ``chunk.target`` until full or end of file; return the bytes read.

    With O_DIRECT (``alignment`` > 0) a read that ends off a block boundary has hit end of file.
    """
    target = chunk.target
    total = len(target)
    got = 0
    while got < total:
        n = os.preadv(fd, [target[got:]], chunk.file_offset + got)
        if n <= 0:
            break
        got += n
        if alignment and n % alignment:
            break
    return got
