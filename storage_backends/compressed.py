"""Reads of a checkpoint served from its compressed side files (``flashtier compress``).

:class:`CompressedBackend` wraps the backend that does the IO. A read of a shard range that is a
run of whole segments (:meth:`~flashtier.storage_backends.compressed_layout.CompressedShard.run`:
a tensor, or an expert's neighbouring tensors) becomes reads of its stored records in the side
file (consecutive records together, up to ``read_bytes``); as each read arrives, the IO thread
that finished it checks each record's crc32 (on its first read, or always) and decodes it into its
place in the caller's buffer (:func:`~flashtier.storage_backends.weight_codec.decode_into`), so
reading the next records overlaps decoding the first. The job completes once every segment is decoded, with exactly the
bytes the shard holds: callers cannot tell the difference except by speed and by the inner
backend's counters (``stats()`` are the inner backend's: bytes that really came from storage).
Any other range reads the shard itself.

Memory: consecutive records of one request are read together, up to ``read_bytes`` (8 MiB) per
read, into staging buffers from a pool; at most ``max_in_flight`` (4) reads are outstanding (the
rest wait in priority order), so the staging memory is bounded by ``max_in_flight x read_bytes``
(32 MiB) whatever the caller prefetches, and each IO thread keeps one decode buffer of half a
segment.

Placement follows the backend contract (``base``): the logical plan is the inner backend's plan of
the shard range, so a ``dest`` of ``plan.span`` bytes gets the result at ``plan.head``.
"""

from __future__ import annotations

import heapq
import itertools
import os
import threading
import time

from flashtier.errors import IntegrityError, StorageError
from flashtier.storage_backends.aligned import ReadPlan, allocate_aligned
from flashtier.storage_backends.atomic import crc32
from flashtier.storage_backends.base import ReadJob, StorageBackend
from flashtier.storage_backends.compressed_layout import (
    CompressedIndex,
    CompressedShard,
    Segment,
)
from flashtier.storage_backends.weight_codec import decode_into
from flashtier.storage_backends.wrapping import WrappingBackend


def _ignore(job: ReadJob, error: BaseException | None, transferred: int) -> None:
    return None


class _DecodedJob(ReadJob):
    """The caller's job: one chunk per segment; completes when the last segment is decoded."""

    def __init__(self, job_id: int, shard: CompressedShard, run: tuple[Segment, ...], plan: ReadPlan,
                 result: memoryview) -> None:
        super().__init__(job_id, shard.shard, plan, len(run), result, None, _ignore)
        self.shard = shard
        self.result_view = result
        self.base = run[0].offset


class _StagingPool:
    """Aligned buffers of one size for stored records, reused (the pool never holds more than
    were in use at once)."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self._free: list[memoryview] = []
        self._lock = threading.Lock()

    def get(self) -> memoryview:
        with self._lock:
            if self._free:
                return self._free.pop()
        return allocate_aligned(self.nbytes)

    def put(self, buf: memoryview) -> None:
        with self._lock:
            self._free.append(buf)


class CompressedBackend(WrappingBackend):
    """Serves whole-segment reads of a checkpoint from its compressed side files (module doc).
    ``verify``: 'first-read' (each record's crc32 once), 'always', or 'off' (the zstd frame
    checksum still guards the compressed high bytes). ``owns_inner``: ``close()`` closes the
    inner backend."""

    def __init__(self, inner: StorageBackend, index: CompressedIndex, verify: str = "first-read",
                 owns_inner: bool = False, max_in_flight: int = 4, read_bytes: int = 8 << 20) -> None:
        super().__init__(inner, owns_inner)
        self.index, self._verify_mode = index, verify
        self._by_path: dict[str, CompressedShard | None] = {}
        self._verified: set[tuple[str, int]] = set()
        self._lock = threading.Lock()
        largest = max((s.stored_length for sh in index.shards.values() for s in sh.segments), default=0)
        self._read_bytes = max(read_bytes, largest)
        self._pool = _StagingPool(inner.plan(inner.alignment - 1, self._read_bytes).span)  # worst-case head
        self._max_in_flight = max_in_flight
        self._in_flight = 0
        self._queue: list[tuple[int, int, _DecodedJob, Segment]] = []  # (priority, seq, job, segment)
        self._seq = itertools.count()
        self.decoded_bytes = 0
        """Bytes restored by decoding so far."""
        self.decode_s = 0.0
        """Seconds the IO threads spent checking and decoding (summed over threads)."""

    # ------------------------------------------------------------------ reads
    def _shard(self, path: str) -> CompressedShard | None:
        shard = self._by_path.get(path, False)
        if shard is False:
            shard = self.index.shards.get(os.path.realpath(path))
            self._by_path[path] = shard
        return shard  # type: ignore[return-value]

    def submit_read(self, path: str, offset: int, length: int, dest: memoryview | None = None,
                    priority: int = 0) -> ReadJob:
        shard = self._shard(path)
        run = shard.run(offset, length) if shard is not None else None
        if run is None:
            return self._inner.submit_read(path, offset, length, dest, priority)
        plan = self.plan(offset, length)
        if dest is None:
            dest = allocate_aligned(plan.span)
        if dest.readonly:
            raise ValueError("read destination must be writable")
        if dest.ndim != 1 or dest.format != "B":
            dest = dest.cast("B")
        if len(dest) < length:
            raise ValueError(f"read destination holds {len(dest)} bytes, the read needs {length} "
                             f"(or {plan.span} for the aligned layout)")
        # The same layout as any backend's (base.placement): at plan.head when dest holds the span.
        result = dest[plan.head: plan.head + length] if len(dest) >= plan.span else dest[:length]
        job = _DecodedJob(next(self._ids), shard, run, plan, result)
        with self._lock:
            for seg in run:
                heapq.heappush(self._queue, (priority, next(self._seq), job, seg))
        self._pump()
        return job

    def _pump(self) -> None:
        """Start queued reads while fewer than ``max_in_flight`` are outstanding; consecutive
        segments of one job go in one read of up to ``read_bytes`` (large reads reach more of the
        disk's bandwidth than one read per 2.7 MB record)."""
        while True:
            with self._lock:
                if self._in_flight >= self._max_in_flight or not self._queue:
                    return
                priority, _, job, seg = heapq.heappop(self._queue)
                group = [seg]
                size = seg.stored_length
                while self._queue and self._queue[0][2] is job:
                    nxt = self._queue[0][3]
                    if nxt.stored_offset != group[-1].stored_offset + group[-1].stored_length or \
                            size + nxt.stored_length > self._read_bytes:
                        break
                    heapq.heappop(self._queue)
                    group.append(nxt)
                    size += nxt.stored_length
                self._in_flight += 1
            if job.failed:  # an earlier segment failed: skip the IO, count the chunks
                self._finished(job, group, None, None)
                continue
            staging = self._pool.get()
            try:
                inner = self._inner.submit_read(job.shard.side_file, seg.stored_offset, size, staging, priority)
            except (StorageError, ValueError, OSError) as e:
                self._finished(job, group, staging, e)
                continue
            inner.add_done_callback(
                lambda j, job=job, group=group, staging=staging: self._arrived(j, job, group, staging))

    def _arrived(self, inner: ReadJob, job: _DecodedJob, group: list[Segment], staging: memoryview) -> None:
        """IO thread: a read is in; check and decode its records, free its buffer, start the next."""
        error = inner.exception()
        if error is None and not job.failed:
            data = inner.wait()
            first = group[0].stored_offset
            try:
                for seg in group:
                    self._decode(job, seg, data[seg.stored_offset - first: seg.stored_offset - first + seg.stored_length])
            except IntegrityError as e:
                error = e
        self._finished(job, group, staging, error)

    def _finished(self, job: _DecodedJob, group: list[Segment], staging: memoryview | None,
                  error: BaseException | None) -> None:
        if staging is not None:
            self._pool.put(staging)
        with self._lock:
            self._in_flight -= 1
        for _ in group:
            job.chunk_finished(0, error)
        self._pump()

    def _decode(self, job: _DecodedJob, seg: Segment, record: memoryview) -> None:
        t0 = time.perf_counter()
        shard = job.shard
        key = (shard.side_file, seg.stored_offset)
        if self._verify_mode == "always" or (self._verify_mode == "first-read" and key not in self._verified):
            actual = crc32(record)
            if actual != seg.crc:
                raise IntegrityError(
                    f"{shard.side_file}: checksum mismatch in the record of bytes {seg.offset}..{seg.end} of "
                    f"{shard.shard} (crc32 {actual:#010x}, the manifest says {seg.crc:#010x}); the compressed "
                    "copy is corrupt: run `flashtier compress` again, or run with --compressed off")
            with self._lock:
                self._verified.add(key)
        out = job.result_view[seg.offset - job.base: seg.end - job.base]
        decode_into(record, seg.codec, out,
                    f"{shard.side_file} (bytes {seg.offset}..{seg.end} of {os.path.basename(shard.shard)})")
        with self._lock:
            self.decoded_bytes += seg.length
            self.decode_s += time.perf_counter() - t0
