"""Storage tier of KV blocks: spill files written atomically with a crc32, verified on every read.

A KV block is immutable once it left the device window, so it is written to storage at most once;
the host tier may then drop its copy and read it back whenever needed. Each block is one file
``kv-l{layer}-b{block}.bin`` holding the raw bytes of its ``[2, H_kv, B, D]`` tensor, written with
the backend's ``write_atomic`` (a reader sees no file or the whole file). The crc32 and size of
every file stay in memory (the manifest); a read whose bytes do not match raises
:class:`~flashtier.errors.IntegrityError` naming the block and the file, and its bytes are never
returned.

The spill folder is a fresh sub-folder (of ``directory``, or of the system temp folder) created at
the first spill and removed by :meth:`KVSpillStore.close` or when the store is garbage collected.
Reads go through a :class:`~flashtier.storage_backends.base.StorageBackend` (O_DIRECT by default):
all blocks of one ``read`` are submitted before the first wait, so they are read in parallel.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from flashtier.errors import IntegrityError, StorageError
from flashtier.runtime.kv.layout import BlockKey, KVBlockLayout
from flashtier.storage_backends.atomic import verify_crc32
from flashtier.storage_backends.base import StorageBackend


@dataclass(frozen=True, slots=True)
class SpillRecord:
    """Manifest entry of one spilled block."""

    path: str
    nbytes: int
    crc32: int


@dataclass(slots=True)
class SpillCounters:
    """What the storage tier did since it was created."""

    blocks_written: int = 0
    bytes_written: int = 0
    blocks_read: int = 0
    bytes_read: int = 0


class KVSpillStore:
    """Write-once files of KV blocks with checksums (see the module docstring)."""

    def __init__(self, layout: KVBlockLayout, directory: str | None = None, backend: StorageBackend | None = None,
                 record_bytes: int | None = None) -> None:
        """``record_bytes``: store encoded records of that many bytes (``uint8 [record_bytes]``, e.g.
        KIVI-quantised blocks, see ``kv_codec``) instead of raw blocks ``[2, H_kv, B, D]``."""
        self.layout = layout
        self.record_bytes = record_bytes
        self._parent = directory
        self._backend = backend
        self._owns_backend = backend is None
        self._dir: str | None = None
        self._cleanup: weakref.finalize | None = None
        self._records: dict[BlockKey, SpillRecord] = {}
        self.counters = SpillCounters()

    def __contains__(self, key: BlockKey) -> bool:
        return key in self._records

    def __len__(self) -> int:
        """Blocks on storage."""
        return len(self._records)

    def nbytes(self) -> int:
        """Bytes of the spill files."""
        return len(self._records) * (self.record_bytes or self.layout.block_bytes)

    def write(self, key: BlockKey, block: torch.Tensor) -> None:
        """Write ``block [2, H_kv, B, D]`` of ``key = (layer, block)`` once (a second write of the
        same key is a no-op: blocks are immutable)."""
        if key in self._records:
            return
        shape, dtype = self._record_spec()
        if tuple(block.shape) != shape or block.dtype != dtype:
            raise StorageError(f"KV spill: block {key} must be {shape} {dtype}, got {tuple(block.shape)} {block.dtype}")
        raw = block.detach().cpu().contiguous().view(torch.uint8).reshape(-1).numpy()
        path = os.path.join(self._folder(), f"kv-l{key[0]:03d}-b{key[1]:07d}.bin")
        crc = self._need_backend().write_atomic(path, [memoryview(raw)])
        self._records[key] = SpillRecord(path, raw.nbytes, crc)
        self.counters.blocks_written += 1
        self.counters.bytes_written += raw.nbytes

    def read(self, keys: Sequence[BlockKey]) -> list[torch.Tensor]:
        """The blocks ``[2, H_kv, B, D]`` of ``keys``, each verified against its crc32.

        Raises StorageError for a key never spilled or a failed read, IntegrityError for bytes
        that do not match their checksum (nothing of such a block is returned)."""
        backend = self._need_backend()
        missing = [k for k in keys if k not in self._records]
        if missing:
            raise StorageError(f"KV spill: blocks {missing[:4]} were never written to storage")
        jobs = [(k, self._records[k], backend.submit_read(self._records[k].path, 0, self._records[k].nbytes))
                for k in keys]
        out = []
        shape, dtype = self._record_spec()
        for key, record, job in jobs:
            try:
                data = job.wait()
            except IntegrityError:
                raise
            except StorageError as e:  # the file was removed, truncated or replaced under the run
                raise StorageError(f"KV spill block (layer {key[0]}, block {key[1]}): {e}; if another program "
                                   "changed the spill folder, keep --kv-spill-dir private to this run") from e
            verify_crc32(data, record.crc32, f"KV spill block (layer {key[0]}, block {key[1]}) in {record.path}")
            flat = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            out.append(flat.view(dtype).reshape(shape))
            self.counters.blocks_read += 1
            self.counters.bytes_read += record.nbytes
        return out

    def _record_spec(self) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype of what ``write`` takes and ``read`` returns."""
        if self.record_bytes is None:
            return self.layout.block_shape, self.layout.dtype
        return (self.record_bytes,), torch.uint8

    def discard(self, keys: Sequence[BlockKey]) -> None:
        """Forget and delete the files of ``keys`` (unknown keys are ignored)."""
        for key in keys:
            record = self._records.pop(key, None)
            if record is not None:
                try:
                    os.unlink(record.path)
                except FileNotFoundError:
                    pass

    def keys(self) -> list[BlockKey]:
        """Keys of the blocks on storage."""
        return list(self._records)

    def path_of(self, key: BlockKey) -> str:
        """The spill file of ``key`` (for tools and tests)."""
        return self._records[key].path

    def close(self) -> None:
        """Delete the spill folder and close the backend this store opened. Idempotent."""
        self._records.clear()
        if self._cleanup is not None:
            self._cleanup()
        if self._owns_backend and self._backend is not None:
            self._backend.close()
            self._backend = None

    def _folder(self) -> str:
        if self._dir is None:
            try:
                if self._parent is not None:  # a file in the way is an OSError too (FileExistsError)
                    os.makedirs(self._parent, exist_ok=True)
                self._dir = tempfile.mkdtemp(prefix="flashtier-kv-", dir=self._parent)
            except OSError as e:
                why = "it is a file, not a folder" if isinstance(e, FileExistsError) else e.strerror or e
                raise StorageError(f"cannot create a KV spill folder under {self._parent or tempfile.gettempdir()}: "
                                   f"{why}; pass a writable folder with --kv-spill-dir") from e
            self._cleanup = weakref.finalize(self, shutil.rmtree, self._dir, True)
        return self._dir

    def _need_backend(self) -> StorageBackend:
        if self._backend is None:
            from flashtier.storage_backends.direct_file import DirectFileBackend

            self._backend = DirectFileBackend()
            self._owns_backend = True
        return self._backend
