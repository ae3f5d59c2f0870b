"""Many small reads of one file, issued as a batch: O_DIRECT ``preadv`` calls grouped per IO thread.

:class:`~flashtier.storage_backends.direct_file.DirectFileBackend` spends roughly 100-200 us of
Python bookkeeping per read job (a future, locks, a callback, two thread hand-offs), which is more
than a 1.5 KiB O_DIRECT read takes on the work disk (~60 us). Sparse FFN neuron reads are many such
small reads per layer, so this reader takes the whole set at once: the ranges are cut into
``queue_depth + 1`` groups, each group but the first is one task on an IO thread that reads its
ranges one after the other (``os.preadv`` releases the GIL, so the groups overlap), the calling
thread reads the first group itself before returning (it would only wait otherwise), and a batch of
at most ``inline_max`` ranges is read on the calling thread with no hand-off at all. ``submit``
therefore blocks for one group's reads; ``wait`` for the rest.

Contract: every range's offset, length and destination address are multiples of the reader's
``alignment`` when the file is opened with O_DIRECT (callers align them; ``choose_alignment`` in
``bundles.py`` finds the smallest one the filesystem takes). Where O_DIRECT is unsupported the file
is read with buffered IO and the range dropped from the page cache (FADV_DONTNEED), as
``DirectFileBackend`` does. A failed or short read fails the batch with StorageError naming the
file, the offset and the lengths; ``wait`` raises it once no IO thread touches the destinations.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from flashtier.errors import ConfigError, StorageError
from flashtier.storage_backends.io_workers import IoWorkerPool


@dataclass(frozen=True, slots=True)
class BatchedReadConfig:
    """Settings of :class:`BatchedReader`."""

    queue_depth: int = 8
    """Groups of reads in flight at once (IO threads)."""
    inline_max: int = 2
    """Batches of at most this many ranges are read on the calling thread."""

    def __post_init__(self) -> None:
        if not 1 <= self.queue_depth <= 256:
            raise ConfigError(f"queue_depth must be in 1..256, got {self.queue_depth}")
        if self.inline_max < 0:
            raise ConfigError(f"inline_max must be >= 0, got {self.inline_max}")


@dataclass(slots=True)
class BatchedReadStats:
    batches: int = 0
    reads: int = 0
    bytes_transferred: int = 0
    failed_batches: int = 0


class _OpenFile:
    __slots__ = ("fd", "direct")

    def __init__(self, fd: int, direct: bool) -> None:
        self.fd = fd
        self.direct = direct


class Batch:
    """One submitted batch; ``wait()`` blocks until all its reads are done (raises StorageError)."""

    __slots__ = ("_remaining", "_lock", "_done", "_error", "started", "finished")

    def __init__(self, groups: int) -> None:
        self._remaining = groups
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._error: BaseException | None = None
        self.started = time.perf_counter()
        self.finished = self.started
        if groups == 0:
            self._done.set()

    def _group_done(self, error: BaseException | None) -> None:
        with self._lock:
            if error is not None and self._error is None:
                self._error = error
            self._remaining -= 1
            last = self._remaining == 0
        if last:
            self.finished = time.perf_counter()
            self._done.set()

    def wait(self) -> float:
        """Block until done; return the seconds from submission to completion of the last read
        (not to this call), or raise the first error."""
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self.finished - self.started


class BatchedReader:
    """Batches of small reads of files opened once (see module doc). Thread-safe."""

    def __init__(self, config: BatchedReadConfig = BatchedReadConfig(), *, direct: bool = True) -> None:
        """``direct``: open files with O_DIRECT (falls back to buffered IO where refused)."""
        self.config = config
        self._direct = direct
        self._pool = IoWorkerPool(config.queue_depth, "flashtier-batched-io")
        self._files: dict[str, _OpenFile] = {}
        self._lock = threading.Lock()
        self._stats = BatchedReadStats()
        self._closed = False

    def _open(self, path: str) -> _OpenFile:
        with self._lock:
            if self._closed:
                raise RuntimeError("batched reader is closed")
            f = self._files.get(path)
            if f is not None:
                return f
            direct = self._direct
            try:
                try:
                    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
                except OSError as e:
                    if not direct or e.errno != errno.EINVAL:
                        raise
                    direct = False
                    fd = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise StorageError(f"cannot open {path}: {e.strerror}") from e
            f = self._files[path] = _OpenFile(fd, direct)
            return f

    def submit(self, path: str, offsets: Sequence[int], dests: Sequence[memoryview], *,
               caller_reads: bool = True) -> Batch:
        """Read ``len(dests[k])`` bytes at ``offsets[k]`` into ``dests[k]`` for every k.

        ``caller_reads=False``: return at once and leave every read to the IO threads (for reads
        that should overlap the caller's own work, e.g. a prefetch)."""
        f = self._open(path)
        n = len(offsets)
        nbytes = sum(len(d) for d in dests)
        with self._lock:
            self._stats.batches += 1
            self._stats.reads += n
            self._stats.bytes_transferred += nbytes
        if caller_reads and n <= self.config.inline_max:
            batch = Batch(1)
            batch._group_done(self._read_group(path, f, offsets, dests, range(n)))
            return batch
        groups = [g for g in np.array_split(np.arange(n), min(n, self.config.queue_depth + caller_reads)) if g.size]
        batch = Batch(len(groups))
        for g in groups[1:] if caller_reads else groups:
            self._pool.submit(lambda g=g: batch._group_done(self._read_group(path, f, offsets, dests, g)))
        if caller_reads and groups:
            batch._group_done(self._read_group(path, f, offsets, dests, groups[0]))  # the caller reads too
        return batch

    def _read_group(self, path: str, f: _OpenFile, offsets: Sequence[int], dests: Sequence[memoryview],
                    idx: Sequence[int]) -> BaseException | None:
        """Read the ranges ``idx``; return the error instead of raising (runs on IO threads)."""
        for k in idx:
            dest, off = dests[k], int(offsets[k])
            got = 0
            try:
                while got < len(dest):
                    m = os.preadv(f.fd, [dest[got:]], off + got)
                    if m <= 0:
                        break
                    got += m
                if not f.direct:
                    os.posix_fadvise(f.fd, off, len(dest), os.POSIX_FADV_DONTNEED)
            except OSError as e:
                err = StorageError(f"reading {path} failed: {len(dest)} bytes at offset {off}: {e}")
                err.__cause__ = e
                return self._failed(err)
            if got < len(dest):
                return self._failed(StorageError(
                    f"short read from {path}: {got} of {len(dest)} bytes at offset {off} "
                    "(was the file truncated or replaced while running?)"))
        return None

    def _failed(self, err: StorageError) -> StorageError:
        with self._lock:
            self._stats.failed_batches += 1
        return err

    def stats(self) -> BatchedReadStats:
        with self._lock:
            return BatchedReadStats(**{k: getattr(self._stats, k) for k in BatchedReadStats.__slots__})

    @property
    def direct_files(self) -> bool:
        """Whether every file opened so far is read with O_DIRECT."""
        with self._lock:
            return all(f.direct for f in self._files.values())

    def close(self) -> None:
        """Finish queued reads, stop the IO threads, close the files. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._pool.close()
        with self._lock:
            for f in self._files.values():
                os.close(f.fd)
            self._files.clear()
