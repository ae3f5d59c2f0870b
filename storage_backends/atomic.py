"""Atomic file writes and crc32 checksums (for spill files such as spilled KV blocks, and JSON caches).

``write_atomic`` writes to a temporary file in the same directory, fsyncs it, renames it over the
target and fsyncs the directory: a reader sees the old file or the whole new one, and a crash
leaves at most a stray ``.*.tmp-*`` file. Written pages are dropped from the page cache
(POSIX_FADV_DONTNEED) so the cache never becomes a hidden tier.
"""

from __future__ import annotations

import json
import os
import uuid
import zlib
from collections.abc import Iterable

from flashtier.errors import IntegrityError, StorageError


def crc32(data: bytes | bytearray | memoryview, start: int = 0) -> int:
    """zlib.crc32 of ``data`` continuing from ``start`` (an unsigned 32-bit value)."""
    return zlib.crc32(data, start) & 0xFFFFFFFF


def json_crc32(obj: object) -> int:
    """crc32 of ``obj`` as canonical JSON (sorted keys): the checksum of the small JSON files
    flashtier writes (caches, records), computed the same way wherever they are read."""
    return crc32(json.dumps(obj, sort_keys=True).encode())


def crc32_of_range(fd: int, offset: int, length: int, chunk: int = 8 << 20) -> tuple[int, int]:
    """crc32 of ``length`` bytes of the open file ``fd`` from ``offset``, read ``chunk`` bytes at a
    time with the pages dropped after each (a check must not fill the page cache with the model).
    Returns (crc32, bytes read): fewer than ``length`` where the file ends early."""
    crc, done = 0, 0
    while done < length:
        data = os.pread(fd, min(chunk, length - done), offset + done)
        os.posix_fadvise(fd, offset + done, len(data), os.POSIX_FADV_DONTNEED)
        if not data:
            break
        crc = crc32(data, crc)
        done += len(data)
    return crc, done


def verify_crc32(data: bytes | bytearray | memoryview, expected: int, where: str) -> None:
    """Raise IntegrityError naming ``where`` if ``data`` does not have checksum ``expected``."""
    actual = crc32(data)
    if actual != expected:
        raise IntegrityError(
            f"checksum mismatch in {where}: crc32 is {actual:#010x}, expected {expected:#010x}; "
            "the file is corrupt or was overwritten: delete it so it is rebuilt"
        )


def write_atomic(path: str, chunks: Iterable[bytes | bytearray | memoryview]) -> int:
    """Write the concatenation of ``chunks`` to ``path`` atomically; return its crc32. ``chunks``
    is iterated once, so a generator streams a large file without holding it in memory.

    Raises StorageError (with the OS error as cause) if any step fails; the target is then
    untouched.
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(
        directory, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:12]}"
    )
    checksum = 0
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            for chunk in chunks:
                view = memoryview(chunk).cast("B")
                checksum = zlib.crc32(view, checksum)
                while len(view):
                    written = os.write(fd, view)
                    view = view[written:]
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):
            raise StorageError(f"atomic write of {path} failed: {e}") from e
        raise
    return checksum & 0xFFFFFFFF
