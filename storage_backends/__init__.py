"""flashtier.storage_backends: bytes at rest, read and written by (path, offset, length).

Knows nothing of tiers or models. ``StorageBackend`` is the interface; ``DirectFileBackend`` reads
local files with O_DIRECT on a thread pool; ``MemoryBackend`` is an in-memory stand-in for tests
with fault injection. ``write_atomic`` / ``crc32`` / ``verify_crc32`` serve spill files.
"""

from flashtier.storage_backends.aligned import (
    DEFAULT_ALIGNMENT,
    ReadPlan,
    allocate_aligned,
    is_aligned,
)
from flashtier.storage_backends.atomic import crc32, verify_crc32, write_atomic
from flashtier.storage_backends.base import BackendStats, ReadJob, StorageBackend
from flashtier.storage_backends.direct_file import (
    DirectFileBackend,
    DirectFileConfig,
    probe_o_direct,
)
from flashtier.storage_backends.memory import MemoryBackend

__all__ = [
    "DEFAULT_ALIGNMENT",
    "BackendStats",
    "DirectFileBackend",
    "DirectFileConfig",
    "MemoryBackend",
    "ReadJob",
    "ReadPlan",
    "StorageBackend",
    "allocate_aligned",
    "crc32",
    "is_aligned",
    "probe_o_direct",
    "verify_crc32",
    "write_atomic",
]
