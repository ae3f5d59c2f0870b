"""The transfer handler: moves the bytes of one hop, routed by (source tier, destination tier).

It makes no decisions (the manager has already reserved the destination block and pinned both
ends) and reports each hop exactly once through ``on_done(spec, error)``, called on an IO or copy
thread, or on the caller's thread if the hop fails before it starts. Routes:

  * storage -> host: the storage backend reads the page's source straight into the host block
    (O_DIRECT on its IO threads).
  * storage -> host of a page created in memory: read back through its arena's write-back medium
    (checksum verified), on the caller's thread.
  * host -> storage (``write_back``): a created page's bytes written once through its arena's
    medium, on the caller's thread, before the store frees its last memory copy.
  * host -> device: a copy thread; with CUDA the copy is issued on its own stream (after waiting on
    the events that guard reused device memory) and a completion thread waits for it before
    reporting, so the compute stream may use the page as soon as the store says it is there, while
    the copy thread has already queued the next copies (the link never idles between pages for
    Python's sake; both blocks stay reserved until the report). Without CUDA the copy thread
    copies on the CPU stand-in and reports.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from flashtier.storage_backends.base import ReadJob
from flashtier.storage_backends.io_workers import IoWorkerPool
from flashtier.tiers.base import SlabPool
from flashtier.tiers.manager import HopSpec, PoolKey
from flashtier.tiers.storage import StorageTier

HopDone = Callable[[HopSpec, BaseException | None], None]


class TransferHandler:
    """Moves bytes for hops (see the module docstring). Thread-safe."""

    def __init__(self, storage: StorageTier, pools: Mapping[PoolKey, SlabPool]) -> None:
        """``pools``: the store's pools by ``(arena, tier)`` (a live mapping: arenas added later
        are seen)."""
        self._storage = storage
        self._pools = pools
        self._copier: IoWorkerPool | None = None
        self._stream: torch.cuda.Stream | None = None
        self._completer: IoWorkerPool | None = None

    def enable_copies(self, device: torch.device) -> None:
        """Start the host -> device copy thread (once; with a CUDA stream on a GPU)."""
        if self._copier is None:
            self._copier = IoWorkerPool(1, "flashtier-h2d")
            if device.type == "cuda":
                self._stream = torch.cuda.Stream(device)
                self._completer = IoWorkerPool(1, "flashtier-h2d-done")

    def start(self, spec: HopSpec, on_done: HopDone) -> None:
        """Begin moving ``spec``'s bytes; never blocks on the transfer itself."""
        route = (spec.src, spec.dst)
        try:
            if route == ("storage", "host"):
                self._read(spec, on_done)
            elif route == ("host", "device") and self._copier is not None:
                self._copier.submit(lambda: self._copy(spec, on_done), spec.priority)
            else:
                raise ValueError(f"no transfer route from {spec.src} to {spec.dst}")
        except Exception as e:  # report synchronously; the manager rolls the hop back
            on_done(spec, e)

    def write_back(self, arena: str, page_id: object, data: torch.Tensor) -> None:
        """host -> storage: write a created page (``uint8 [nbytes]``) through ``arena``'s medium."""
        medium = self._storage.write_back(arena)
        if medium is None:
            raise ValueError(f"arena {arena!r} has no write-back medium for created pages")
        medium.write(page_id, data)

    def _read(self, spec: HopSpec, on_done: HopDone) -> None:
        medium = self._storage.write_back(spec.arena)
        if medium is not None:  # a created page: its copy is the medium's
            error: BaseException | None = None
            try:
                (data,) = medium.read([spec.page_id])
                pool = self._pools[(spec.arena, "host")]
                pool.view(spec.dst_block, spec.placement.view_offset, spec.desc.nbytes).copy_(data.view(torch.uint8).reshape(-1))
            except Exception as e:
                error = e
            on_done(spec, error)
            return
        block = self._pools[(spec.arena, "host")].buffer(spec.dst_block)
        job = self._storage.load(spec.desc, block, spec.placement, spec.priority, spec.arena)

        def finished(done: ReadJob) -> None:
            on_done(spec, done.exception())

        job.add_done_callback(finished)

    def _copy(self, spec: HopSpec, on_done: HopDone) -> None:
        """Copy thread: host block -> device block, then report."""
        assert spec.src_block is not None
        error: BaseException | None = None
        try:
            nbytes = spec.desc.nbytes
            src = self._pools[(spec.arena, "host")].view(spec.src_block, spec.src_offset, nbytes)
            dst = self._pools[(spec.arena, "device")].view(spec.dst_block, 0, nbytes)
            if self._stream is not None and self._completer is not None:
                for event in spec.wait_events:
                    self._stream.wait_event(event)  # type: ignore[arg-type]
                with torch.cuda.stream(self._stream):
                    dst.copy_(src, non_blocking=True)
                done = torch.cuda.Event()
                done.record(self._stream)
                # reported in issue order (one completion thread, one priority): no reordering
                self._completer.submit(lambda: self._complete(done, spec, on_done), 0)
                return
            dst.copy_(src)
        except Exception as e:
            error = e
        on_done(spec, error)

    @staticmethod
    def _complete(done: "torch.cuda.Event", spec: HopSpec, on_done: HopDone) -> None:
        """Completion thread: wait for a queued copy, then report it."""
        error: BaseException | None = None
        try:
            done.synchronize()
        except Exception as e:
            error = e
        on_done(spec, error)

    def close(self) -> None:
        """Finish queued copies and stop the copy thread (reads belong to the backend)."""
        if self._copier is not None:
            self._copier.close()
        if self._completer is not None:
            self._completer.close()  # after the copier: every queued copy has its completion queued
