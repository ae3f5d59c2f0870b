"""A record of the one-time checks that passed, so a second load of the same files can skip them.

Opening a model runs some checks that read a whole file once: the crc32 of a converted folder's
expert extents before a resident load, an embedding table that paging reads row by row, the FFN
bundle files. :class:`VerifiedRecord` remembers that such a check passed, keyed by what was
checked and the identity of every file it read: resolved path, size, modification time, inode
change time (``st_ctime_ns``, which no user-space call can set back) and inode. Any write to a
file, a rename over it, or a copy in its place changes its stamp, and the check runs again.

What the record does not cover: a bit that rots on the medium without the file being written
(its stamp stays the same). Reads that check a crc32 each time (streamed pages, expert extents,
spill files) keep doing so whatever the record says; ``--reverify`` (no record) runs every one-time
check again.

The record is a small JSON file written atomically (temporary sibling + rename) with a crc32 of
its contents; a record that is missing, unreadable, corrupt or from another version counts as
empty (every check runs), and a record that cannot be written is not an error (the checks
passed; the next load runs them again). Concurrent writers may drop each other's entries, which
only costs a repeated check.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from flashtier.errors import StorageError
from flashtier.storage_backends.atomic import json_crc32, write_atomic

VERSION = 1
MAX_ENTRIES = 512
"""Entries kept (the oldest are dropped first)."""


def file_stamp(path: str | os.PathLike[str]) -> list[int | str]:
    """``[resolved path, size, mtime_ns, ctime_ns, inode, device]`` of ``path`` (OSError if gone)."""
    p = Path(path).resolve()
    st = p.stat()
    return [str(p), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


class VerifiedRecord:
    """Which checks passed on which exact files. ``path`` None: remembers nothing (every check runs)."""

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = Path(path) if path is not None else None

    def _key(self, what: str, files: Sequence[str | os.PathLike[str]]) -> str:
        return what + "|" + "|".join(str(Path(f).resolve()) for f in files)

    def _load(self) -> dict[str, list[list[int | str]]]:
        if self.path is None:
            return {}
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
            entries = doc["entries"]
            if doc.get("version") != VERSION or doc.get("crc32") != json_crc32(entries):
                return {}
            return dict(entries)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}

    def verified(self, what: str, files: Sequence[str | os.PathLike[str]]) -> bool:
        """True when check ``what`` passed on ``files`` and none of them changed since."""
        if self.path is None:
            return False
        stamps = self._load().get(self._key(what, files))
        try:
            return stamps is not None and stamps == [file_stamp(f) for f in files]
        except OSError:
            return False

    def mark(self, what: str, files: Sequence[str | os.PathLike[str]]) -> None:
        """Record that check ``what`` passed on ``files`` as they are now."""
        if self.path is None:
            return
        try:
            stamps = [file_stamp(f) for f in files]
        except OSError:
            return
        entries = self._load()
        key = self._key(what, files)
        entries.pop(key, None)
        entries[key] = stamps
        while len(entries) > MAX_ENTRIES:
            entries.pop(next(iter(entries)))
        doc = {"version": VERSION, "entries": entries, "crc32": json_crc32(entries)}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(str(self.path), [json.dumps(doc).encode()])
        except (OSError, StorageError):
            pass  # the check passed; without a record the next load only repeats it

