"""bench-io: a small measurement end to end, the JSON cache, and the CLI subcommand."""

from __future__ import annotations

import argparse
import json
import zlib
import os

import pytest

from flashtier.apps.commands import bench_io as bench_io_command
from flashtier.errors import ConfigError
from flashtier.storage_backends.bench_io import (
    BenchIoResult,
    load_cached,
    run_bench_io,
)

MiB = 1 << 20


def test_small_run_measures_caches_and_cleans_up(tmp_path):
    scratch = tmp_path / "disk"
    scratch.mkdir()
    cache = tmp_path / "cache" / "bench_io.json"
    result = run_bench_io(
        str(scratch),
        file_bytes=8 * MiB,
        chunk_sizes=(1 * MiB, 2 * MiB),
        queue_depths=(2,),
        cache_path=str(cache),
    )
    assert os.listdir(scratch) == []  # scratch file removed
    assert len(result.points) == 2 and result.disk_read_gb_per_s > 0
    assert result.best_chunk_size in (1 * MiB, 2 * MiB)
    assert result.memcpy_gb_per_s > 0 and result.matvec_gb_per_s["float32"] > 0
    assert result.o_direct  # the work disk is ext4
    assert load_cached(str(cache)) == result


def test_load_cached_tolerates_missing_corrupt_and_newer_files(tmp_path):
    assert load_cached(str(tmp_path / "none.json")) is None
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert load_cached(str(bad)) is None
    fields = {
        "disk_read_gb_per_s": 1.3,
        "best_chunk_size": 8 * MiB,
        "best_queue_depth": 4,
        "memcpy_gb_per_s": 10.0,
        "o_direct": True,
        "file_bytes": MiB,
        "directory": "/x",
        "a_field_from_a_later_version": 1,
    }
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps({**fields, "crc32": zlib.crc32(json.dumps(fields, sort_keys=True).encode())}))
    cached = load_cached(str(newer))
    assert isinstance(cached, BenchIoResult) and cached.disk_read_gb_per_s == 1.3
    unchecked = tmp_path / "unchecked.json"  # no crc32 (or an older version's file): not trusted
    unchecked.write_text(json.dumps(fields))
    assert load_cached(str(unchecked)) is None
    edited = tmp_path / "edited.json"  # a field changed after the crc was taken
    edited.write_text(newer.read_text().replace('"disk_read_gb_per_s": 1.3', '"disk_read_gb_per_s": 9.9'))
    assert load_cached(str(edited)) is None


def test_missing_directory_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not a directory"):
        run_bench_io(str(tmp_path / "nope"), file_bytes=MiB, chunk_sizes=(MiB,))


def test_cli_subcommand_prints_one_json_object(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="flashtier")
    bench_io_command.register(parser.add_subparsers(dest="command"))
    cache = tmp_path / "c.json"
    args = parser.parse_args(
        ["bench-io", "--dir", str(tmp_path), "--size-mib", "4", "--chunk-mib", "1",
         "--queue-depth", "1,2", "--cache", str(cache), "--json"]
    )
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert {p["queue_depth"] for p in out["points"]} == {1, 2}
    stored = json.loads(cache.read_text())
    assert stored.pop("crc32") == zlib.crc32(json.dumps(stored, sort_keys=True).encode()) and stored == out


def test_cli_rejects_bad_lists():
    parser = argparse.ArgumentParser(prog="flashtier")
    bench_io_command.register(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit):
        parser.parse_args(["bench-io", "--queue-depth", "two"])
