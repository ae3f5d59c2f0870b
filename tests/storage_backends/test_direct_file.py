"""DirectFileBackend: exact bytes for any range, zero-copy placement, chunking, short reads,
replaced and removed files, and the buffered fallback when a filesystem lacks O_DIRECT."""

from __future__ import annotations

import logging
import os
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flashtier.errors import ConfigError, StorageError
from flashtier.storage_backends import (
    DirectFileBackend,
    DirectFileConfig,
    allocate_aligned,
    write_atomic,
)
from flashtier.storage_backends.aligned import buffer_address
from flashtier.storage_backends.io_workers import IoWorkerPool

FILE_BYTES = 1_000_003  # deliberately not a multiple of the alignment


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, bytes]:
    data = np.random.default_rng(0).integers(0, 256, FILE_BYTES, dtype=np.uint8).tobytes()
    path = tmp_path_factory.mktemp("direct") / "data.bin"
    path.write_bytes(data)
    return str(path), data


@pytest.fixture(scope="module")
def backend() -> DirectFileBackend:
    # small chunks so that ranges of a few hundred KiB split into several parallel chunks
    with DirectFileBackend(DirectFileConfig(chunk_size=64 * 1024, queue_depth=3)) as b:
        yield b


@settings(max_examples=60, deadline=None)
@given(offset=st.integers(0, FILE_BYTES - 1), length=st.integers(1, 300_000))
def test_any_range_returns_exactly_the_asked_bytes(backend, data_file, offset, length):
    path, data = data_file
    length = min(length, FILE_BYTES - offset)
    # dest=None: the backend allocates the aligned span
    assert bytes(backend.read_into(path, offset, length)) == data[offset : offset + length]
    # dest of exactly `length` bytes: goes through a bounce buffer when unaligned
    exact = bytearray(length)
    view = backend.read_into(path, offset, length, memoryview(exact))
    assert bytes(view) == data[offset : offset + length]
    assert bytes(exact) == data[offset : offset + length]


def test_span_sized_aligned_dest_is_filled_in_place(backend, data_file):
    path, data = data_file
    offset, length = 5_000, 200_000  # unaligned start and end
    plan = backend.plan(offset, length)
    assert plan.head == 5_000 % 4096 and plan.span % 4096 == 0
    dest = allocate_aligned(plan.span + 4096)
    bounces = backend.stats().bounce_copies
    view = backend.read_into(path, offset, length, dest)
    # the result is a view into dest at plan.head: no copy, no bounce
    assert buffer_address(view) == buffer_address(dest) + plan.head
    assert bytes(view) == data[offset : offset + length]
    assert backend.stats().bounce_copies == bounces


def test_large_read_is_split_into_parallel_chunks(backend, data_file):
    path, data = data_file
    chunks_before = backend.stats().chunks
    assert bytes(backend.read_into(path, 0, FILE_BYTES)) == data
    # 1 MB file in 64 KiB chunks
    assert backend.stats().chunks - chunks_before == -(-FILE_BYTES // (64 * 1024))


def test_read_at_end_of_file_ending_off_a_block_boundary(backend, data_file):
    path, data = data_file
    # the aligned span runs past EOF: the kernel returns fewer bytes, and that is fine
    assert bytes(backend.read_into(path, FILE_BYTES - 10, 10)) == data[-10:]


def test_read_past_end_is_a_short_read_naming_file_offset_and_lengths(backend, data_file):
    path, _ = data_file
    with pytest.raises(StorageError) as info:
        backend.read_into(path, FILE_BYTES - 10, 20)
    message = str(info.value)
    assert "short read" in message and path in message
    assert str(FILE_BYTES - 10) in message and "20 bytes" in message


def test_truncated_file_fails_then_backend_keeps_working(tmp_path, data_file):
    _, data = data_file
    path = tmp_path / "t.bin"
    path.write_bytes(data)
    with DirectFileBackend(DirectFileConfig(chunk_size=64 * 1024)) as b:
        assert bytes(b.read_into(str(path), 0, 300_000)) == data[:300_000]
        # truncate while the descriptor is open (same inode): the read comes back short
        os.truncate(path, 100_000)
        job = b.submit_read(str(path), 50_000, 200_000)
        with pytest.raises(StorageError, match="short read"):
            job.wait()
        assert b.stats().reads_failed == 1
        # the backend stays usable
        assert bytes(b.read_into(str(path), 0, 100_000)) == data[:100_000]


def test_removed_file_fails_clearly(tmp_path):
    path = tmp_path / "gone.bin"
    path.write_bytes(b"x" * 10_000)
    with DirectFileBackend() as b:
        assert bytes(b.read_into(str(path), 0, 4)) == b"xxxx"
        path.unlink()
        with pytest.raises(StorageError, match="gone.bin"):
            b.read_into(str(path), 0, 4)


def test_atomically_replaced_file_is_reopened(tmp_path):
    path = str(tmp_path / "spill.bin")
    with DirectFileBackend() as b:
        write_atomic(path, [b"old!" * 2000])
        assert bytes(b.read_into(path, 0, 4)) == b"old!"
        write_atomic(path, [b"new!" * 2000])
        assert bytes(b.read_into(path, 0, 4)) == b"new!"


def test_fallback_without_o_direct_reads_buffered_and_warns_once(tmp_path, data_file, caplog):
    _, data = data_file
    paths = []
    for name in ("a.bin", "b.bin"):
        p = tmp_path / name
        p.write_bytes(data)
        paths.append(str(p))
    probes: list[str] = []

    def no_o_direct(path: str, alignment: int) -> bool:  # a filesystem like tmpfs
        probes.append(path)
        return False

    with caplog.at_level(logging.WARNING), DirectFileBackend(probe=no_o_direct) as b:
        for path in paths:
            # unaligned range, exact-size destination: buffered reads need no bounce buffer
            view = b.read_into(path, 12_345, 500_000, memoryview(bytearray(500_000)))
            assert bytes(view) == data[12_345:512_345]
        stats = b.stats()
    # probed once for the filesystem, warned once, both files read buffered
    assert len(probes) == 1
    warnings = [r for r in caplog.records if "O_DIRECT" in r.getMessage()]
    assert len(warnings) == 1
    assert stats.buffered_files == 2 and stats.bounce_copies == 0


def test_require_mode_refuses_a_filesystem_without_o_direct(data_file):
    path, _ = data_file
    with DirectFileBackend(DirectFileConfig(direct_io="require"), probe=lambda p, a: False) as b:
        with pytest.raises(StorageError, match="does not support O_DIRECT"):
            b.read_into(path, 0, 10)


def test_off_mode_never_probes(data_file):
    path, data = data_file

    def must_not_probe(path: str, alignment: int) -> bool:
        raise AssertionError("probe called in 'off' mode")

    with DirectFileBackend(DirectFileConfig(direct_io="off"), probe=must_not_probe) as b:
        assert bytes(b.read_into(path, 7, 70)) == data[7:77]


def test_real_probe_accepts_this_disk(data_file):
    path, _ = data_file
    with DirectFileBackend() as b:
        b.read_into(path, 0, 1)
        # the work disk is ext4: O_DIRECT works, nothing is read through the page cache
        assert b.stats().buffered_files == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"queue_depth": 0}, "queue_depth"),
        ({"alignment": 1000}, "power of two"),
        ({"chunk_size": 5000}, "multiple of alignment"),
        ({"direct_io": "maybe"}, "direct_io"),
    ],
)
def test_config_validation_says_what_to_do(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DirectFileConfig(**kwargs)


def test_destination_too_small_or_readonly_is_a_caller_error(backend, data_file):
    path, _ = data_file
    with pytest.raises(ValueError, match="holds 10 bytes"):
        backend.submit_read(path, 0, 100, memoryview(bytearray(10)))
    with pytest.raises(ValueError, match="writable"):
        backend.submit_read(path, 0, 4, memoryview(b"abcd"))


def test_io_pool_runs_lower_priority_numbers_first():
    pool = IoWorkerPool(1, "test-io")
    gate = threading.Event()
    order: list[str] = []
    done = threading.Event()
    pool.submit(gate.wait)  # park the only worker so the next tasks queue up
    pool.submit(lambda: order.append("prefetch-1"), priority=2)
    pool.submit(lambda: order.append("prefetch-2"), priority=2)
    pool.submit(lambda: order.append("demand"), priority=0)
    pool.submit(done.set, priority=3)
    gate.set()
    done.wait(5)
    pool.close()
    assert order == ["demand", "prefetch-1", "prefetch-2"]
