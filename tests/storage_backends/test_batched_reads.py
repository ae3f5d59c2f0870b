"""Batched small reads: every range lands where asked, inline and pooled; faults name the file."""

from __future__ import annotations

import os

import numpy as np
import pytest

from flashtier.errors import ConfigError, StorageError
from flashtier.storage_backends.aligned import allocate_aligned
from flashtier.storage_backends.batched_reads import BatchedReadConfig, BatchedReader

SECTOR = 512


@pytest.fixture
def data_file(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 256 * SECTOR, dtype=np.uint8)
    path = tmp_path / "data.bin"
    path.write_bytes(data.tobytes())
    return str(path), data


@pytest.mark.parametrize("queue_depth,inline_max,n", [(1, 0, 7), (4, 0, 40), (8, 2, 2), (8, 100, 30)])
def test_every_range_lands_in_its_destination(data_file, queue_depth, inline_max, n):
    path, data = data_file
    rng = np.random.default_rng(n)
    blocks = rng.choice(250, n, replace=False)
    lengths = rng.integers(1, 4, n) * SECTOR
    buf = allocate_aligned(int(lengths.sum()))
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    views = [buf[int(s) : int(s + ln)] for s, ln in zip(starts, lengths)]
    reader = BatchedReader(BatchedReadConfig(queue_depth=queue_depth, inline_max=inline_max))
    try:
        seconds = reader.submit(path, [int(b) * SECTOR for b in blocks], views).wait()
        assert seconds >= 0
        for b, v in zip(blocks, views):
            assert bytes(v) == data[int(b) * SECTOR : int(b) * SECTOR + len(v)].tobytes()
        stats = reader.stats()
        assert stats.reads == n and stats.bytes_transferred == int(lengths.sum()) and stats.batches == 1
        assert reader.direct_files or os.uname().sysname != "Linux"
    finally:
        reader.close()


def test_a_read_past_the_end_fails_the_batch_naming_the_file(data_file):
    path, _ = data_file
    reader = BatchedReader(BatchedReadConfig(queue_depth=2, inline_max=0))
    buf = allocate_aligned(8 * SECTOR)
    views = [buf[k * SECTOR : (k + 1) * SECTOR] for k in range(8)]
    offsets = [k * SECTOR for k in range(7)] + [256 * SECTOR]  # the last is past the end
    try:
        with pytest.raises(StorageError, match=r"short read from .*data\.bin"):
            reader.submit(path, offsets, views).wait()
        assert reader.stats().failed_batches == 1
        reader.submit(path, offsets[:7], views[:7]).wait()  # the reader stays usable
    finally:
        reader.close()


def test_a_missing_file_is_a_storage_error(tmp_path):
    reader = BatchedReader()
    try:
        with pytest.raises(StorageError, match="cannot open"):
            reader.submit(str(tmp_path / "nope.bin"), [0], [allocate_aligned(SECTOR)])
    finally:
        reader.close()


def test_config_is_validated():
    with pytest.raises(ConfigError, match="queue_depth"):
        BatchedReadConfig(queue_depth=0)
