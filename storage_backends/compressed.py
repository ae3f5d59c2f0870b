"""Reads of a checkpoint served from its compressed side files (``flashtier compress``).

:class:`CompressedBackend` wraps the backend that does the IO. A read of a shard range that is a
run of whole tensors (:meth:`~flashtier.storage_backends.compressed_layout.CompressedShard.run`)
becomes one read of their stored records in the side file; when it completes, the IO thread that
finished it checks each record's crc32 (on its first read, or always) and decodes the records into
the caller's buffer (:func:`~flashtier.storage_backends.weight_codec.decode_into`). The job
completes only after that, with exactly the bytes the shard holds: callers cannot tell the
difference except by speed and by the inner backend's counters (``stats()`` are the inner
backend's: bytes that really came from storage). Any other range reads the shard itself.

Placement follows the backend contract (``base``): the logical plan is the inner backend's plan of
the shard range, so a ``dest`` of ``plan.span`` bytes gets the result at ``plan.head``. The stored
records land in a temporary aligned buffer (about 0.7x the range) that lives until the decode ends.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence

from flashtier.errors import IntegrityError
from flashtier.storage_backends.aligned import ReadPlan, allocate_aligned
from flashtier.storage_backends.atomic import crc32
from flashtier.storage_backends.base import BackendStats, Buffer, ReadJob, StorageBackend
from flashtier.storage_backends.compressed_layout import CompressedIndex, CompressedShard, Segment
from flashtier.storage_backends.weight_codec import decode_into


class _DecodedJob(ReadJob):
    """The caller's job: completes once the stored records are read, checked and decoded."""

    def __init__(self, job_id: int, inner: ReadJob, owner: CompressedBackend, shard: CompressedShard,
                 run: tuple[Segment, ...], plan: ReadPlan, result: memoryview) -> None:
        super().__init__(job_id, shard.shard, plan, 1, memoryview(b""), None, _ignore)
        self._owner, self._shard, self._run, self._decoded = owner, shard, run, result
        inner.add_done_callback(self._decode)

    def _decode(self, inner: ReadJob) -> None:
        """IO thread: the records are in; verify and decode them, then complete this job."""
        error = inner.exception()
        if error is None:
            try:
                self._owner._decode_run(self._shard, self._run, inner.wait(), self._decoded)
                self._result = self._decoded
            except IntegrityError as e:
                error = e
        self.chunk_finished(0, error)


def _ignore(job: ReadJob, error: BaseException | None, transferred: int) -> None:
    return None


class CompressedBackend(StorageBackend):
    """Serves whole-tensor reads of a checkpoint from its compressed side files (module doc).
    ``verify``: 'first-read' (each record's crc32 once), 'always', or 'off' (the zstd frame
    checksum still guards the compressed bytes). ``owns_inner``: ``close()`` closes the inner backend."""

    def __init__(self, inner: StorageBackend, index: CompressedIndex, verify: str = "first-read",
                 owns_inner: bool = False) -> None:
        super().__init__(inner.alignment)
        self._inner, self.index, self._verify_mode, self._owns = inner, index, verify, owns_inner
        self._by_path: dict[str, CompressedShard | None] = {}
        self._verified: set[tuple[str, int]] = set()
        self._lock = threading.Lock()
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
        start = run[0].stored_offset
        stored = run[-1].stored_offset + run[-1].stored_length - start
        inner = self._inner.submit_read(shard.side_file, start, stored, None, priority)
        return _DecodedJob(next(self._ids), inner, self, shard, run, plan, result)

    def _decode_run(self, shard: CompressedShard, run: tuple[Segment, ...], records: memoryview,
                    out: memoryview) -> None:
        t0 = time.perf_counter()
        base, first = run[0].offset, run[0].stored_offset
        for seg in run:
            rec = records[seg.stored_offset - first: seg.stored_offset - first + seg.stored_length]
            key = (shard.side_file, seg.stored_offset)
            if self._verify_mode == "always" or (self._verify_mode == "first-read" and key not in self._verified):
                actual = crc32(rec)
                if actual != seg.crc:
                    raise IntegrityError(
                        f"{shard.side_file}: checksum mismatch in the record of bytes {seg.offset}..{seg.end} of "
                        f"{shard.shard} (crc32 {actual:#010x}, the manifest says {seg.crc:#010x}); the compressed "
                        "copy is corrupt: run `flashtier compress` again, or run with --compressed off")
                with self._lock:
                    self._verified.add(key)
            decode_into(rec, seg.codec, out[seg.offset - base: seg.end - base],
                        f"{shard.side_file} (bytes {seg.offset}..{seg.end} of {os.path.basename(shard.shard)})")
        with self._lock:
            self.decoded_bytes += len(out)
            self.decode_s += time.perf_counter() - t0

    # ------------------------------------------------------------------ the rest: the inner backend's
    def plan(self, offset: int, length: int) -> ReadPlan:
        return self._inner.plan(offset, length)

    def write_atomic(self, path: str, chunks: Sequence[Buffer]) -> int:
        return self._inner.write_atomic(path, chunks)

    def file_size(self, path: str) -> int:
        return self._inner.file_size(path)

    def stats(self) -> BackendStats:
        return self._inner.stats()

    def close(self) -> None:
        if self._owns:
            self._inner.close()
