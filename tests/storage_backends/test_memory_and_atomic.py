"""MemoryBackend fault injection, aligned-span arithmetic, atomic writes and checksums."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flashtier.errors import IntegrityError, StorageError
from flashtier.storage_backends import (
    MemoryBackend,
    ReadPlan,
    allocate_aligned,
    crc32,
    is_aligned,
    verify_crc32,
    write_atomic,
)

DATA = bytes(range(256)) * 200  # 51200 bytes


@pytest.fixture
def mem() -> MemoryBackend:
    b = MemoryBackend(alignment=4096, chunk_size=8192)
    b.add_file("f", DATA)
    yield b
    b.close()


@given(
    offset=st.integers(0, 1 << 40),
    length=st.integers(0, 1 << 30),
    alignment=st.sampled_from([1, 512, 4096]),
)
def test_read_plan_is_the_smallest_aligned_superset(offset, length, alignment):
    plan = ReadPlan.for_range(offset, length, alignment)
    assert plan.aligned_offset % alignment == 0 and plan.span % alignment == 0
    assert plan.aligned_offset <= offset
    assert offset + length <= plan.aligned_offset + plan.span
    assert plan.head == offset - plan.aligned_offset < alignment
    assert plan.span - (plan.head + length) < alignment


def test_allocated_buffers_are_page_aligned():
    assert is_aligned(allocate_aligned(12345), 4096)
    assert len(allocate_aligned(0)) == 0


def test_memory_backend_reads_exact_bytes_through_several_chunks(mem):
    assert bytes(mem.read_into("f", 3, 30_000)) == DATA[3:30_003]
    assert mem.stats().chunks >= 4


def test_injected_failure_then_recovery(mem):
    # fail the next read of "f" -> StorageError; the one after works
    mem.inject_fault("fail", "f")
    with pytest.raises(StorageError, match="injected"):
        mem.read_into("f", 0, 100)
    assert bytes(mem.read_into("f", 0, 100)) == DATA[:100]


def test_injected_short_read_names_file_and_offset(mem):
    mem.inject_fault("short")
    with pytest.raises(StorageError, match=r"short read from f: asked 20000 bytes at offset 10"):
        mem.read_into("f", 10, 20_000)
    assert mem.stats().reads_failed == 1


def test_truncate_and_remove(mem):
    mem.truncate("f", 1000)
    with pytest.raises(StorageError, match="short read"):
        mem.read_into("f", 500, 1000)
    mem.remove("f")
    with pytest.raises(StorageError, match="no such file"):
        mem.read_into("f", 0, 10)


def test_hold_reads_keeps_jobs_in_flight(mem):
    mem.hold_reads()
    job = mem.submit_read("f", 0, 10)
    assert not job.done()
    mem.release_reads()
    assert bytes(job.wait(5)) == DATA[:10]


def test_completion_callbacks_run_once_after_the_result(mem):
    seen = []
    job = mem.submit_read("f", 0, 10)
    job.add_done_callback(lambda j: seen.append(bytes(j.wait())))
    job.wait(5)
    job.add_done_callback(lambda j: seen.append(b"late"))  # already done: runs at once
    assert seen[0] == DATA[:10] and seen[1] == b"late"


def test_write_atomic_returns_crc_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "spill.bin"
    checksum = write_atomic(str(path), [b"abc", memoryview(b"defg")])
    assert path.read_bytes() == b"abcdefg"
    assert checksum == crc32(b"abcdefg")
    assert os.listdir(tmp_path) == ["spill.bin"]
    verify_crc32(path.read_bytes(), checksum, str(path))
    with pytest.raises(IntegrityError, match="spill.bin"):
        verify_crc32(b"abcdefX", checksum, str(path))


def test_failed_atomic_write_leaves_target_untouched(tmp_path, monkeypatch):
    path = tmp_path / "keep.bin"
    path.write_bytes(b"original")

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(StorageError, match="keep.bin.*No space left"):
        write_atomic(str(path), [b"partial"])
    assert path.read_bytes() == b"original"
    assert os.listdir(tmp_path) == ["keep.bin"]


def test_write_atomic_into_missing_folder_is_a_storage_error(tmp_path):
    with pytest.raises(StorageError, match="atomic write"):
        write_atomic(str(tmp_path / "no" / "such" / "f.bin"), [b"x"])


def test_memory_backend_write_atomic(mem):
    checksum = mem.write_atomic("g", [b"hello"])
    assert checksum == crc32(b"hello") and bytes(mem.read_into("g", 1, 3)) == b"ell"
    assert mem.stats().bytes_written == 5
