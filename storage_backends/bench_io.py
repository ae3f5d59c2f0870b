"""Measure what the machine can move: O_DIRECT read bandwidth of a disk, memory copy bandwidth.

``run_bench_io`` writes a scratch file (deleted afterwards), reads it back through
:class:`DirectFileBackend` at one or several (chunk size, queue depth) settings, times a large
memory copy, and stores the result as JSON at a path the caller gives (the CLI defaults it to
``~/.cache/flashtier/bench_io.json``). ``load_cached`` reads that file back. The planner and the
cost model use the numbers; nothing here reads the environment.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from flashtier.errors import ConfigError, StorageError
from flashtier.storage_backends.aligned import allocate_aligned
from flashtier.storage_backends.atomic import json_crc32, write_atomic
from flashtier.storage_backends.direct_file import DirectFileBackend, DirectFileConfig

MiB = 1 << 20
GB = 1e9


@dataclass(frozen=True, slots=True)
class ReadPoint:
    """One measured read setting."""

    chunk_size: int
    """Bytes per read issued to the kernel."""
    queue_depth: int
    """Reads in flight at once."""
    gb_per_s: float
    """Read bandwidth in 1e9 bytes per second."""


@dataclass(frozen=True, slots=True)
class BenchIoResult:
    """What ``run_bench_io`` measured. ``best`` is the fastest read setting."""

    disk_read_gb_per_s: float
    """Best O_DIRECT (or fallback) read bandwidth over the settings tried."""
    best_chunk_size: int
    """Chunk size of the best setting."""
    best_queue_depth: int
    """Queue depth of the best setting."""
    memcpy_gb_per_s: float
    """Single large host memory copy bandwidth (torch copy_, current thread settings)."""
    matvec_gb_per_s: dict[str, float]
    """Weight bytes per second a host matrix-vector product streams, by dtype name."""
    o_direct: bool
    """Whether the scratch file's filesystem accepted O_DIRECT."""
    file_bytes: int
    """Size of the scratch file read."""
    directory: str
    """Directory (filesystem) that was measured."""
    points: list[ReadPoint] = field(default_factory=list)
    """Every setting measured."""
    measured_at: float = 0.0
    """Unix time of the measurement."""
    host: str = ""
    """Machine name, to notice a cache copied from elsewhere."""

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> BenchIoResult:
        """Inverse of ``as_dict``; keys this version does not know are ignored."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        points = values.get("points", [])
        values["points"] = [ReadPoint(**p) for p in points]  # type: ignore[union-attr]
        values.setdefault("matvec_gb_per_s", {})
        return cls(**values)  # type: ignore[arg-type]


def write_scratch_file(directory: str, nbytes: int) -> str:
    """Create a ``nbytes`` non-sparse scratch file in ``directory``; return its path."""
    fd, path = tempfile.mkstemp(prefix=".flashtier-bench-", suffix=".bin", dir=directory)
    block = os.urandom(4 * MiB)
    try:
        left = nbytes
        while left > 0:
            left -= os.write(fd, block[: min(left, len(block))])
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError as e:
        os.close(fd)
        os.unlink(path)
        raise StorageError(f"cannot write a {nbytes}-byte scratch file in {directory}: {e}") from e
    os.close(fd)
    return path


def measure_read(path: str, nbytes: int, chunk_size: int, queue_depth: int) -> float:
    """Read the first ``nbytes`` of ``path`` in ``chunk_size`` reads at ``queue_depth``; GB/s."""
    config = DirectFileConfig(queue_depth=queue_depth, chunk_size=chunk_size)
    n_reads = max(1, nbytes // chunk_size)
    in_flight = queue_depth * 2  # keep the IO threads fed while completed reads are reaped
    buffers = [allocate_aligned(chunk_size) for _ in range(in_flight)]
    with DirectFileBackend(config) as backend:
        backend.read_into(path, 0, min(chunk_size, nbytes), buffers[0])  # open + probe
        jobs = []
        start = time.perf_counter()
        for i in range(n_reads):
            if len(jobs) == in_flight:
                jobs.pop(0).wait()
            dest = buffers[i % in_flight]
            jobs.append(backend.submit_read(path, i * chunk_size, chunk_size, dest))
        for job in jobs:
            job.wait()
        elapsed = time.perf_counter() - start
    return n_reads * chunk_size / elapsed / GB


def measure_memcpy(nbytes: int = 256 * MiB, repeats: int = 3) -> float:
    """Best-of-``repeats`` bandwidth of one ``nbytes`` host copy, in GB/s (bytes copied / s)."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return nbytes / best / GB


def measure_matvec(
    dtypes: Sequence[torch.dtype] = (torch.float16, torch.bfloat16, torch.float32),
    nbytes: int = 64 * MiB,
    repeats: int = 3,
) -> dict[str, float]:
    """Best-of-``repeats`` weight bandwidth of ``W @ x`` (W of ``nbytes``), GB/s per dtype name."""
    result = {}
    for dtype in dtypes:
        cols = 4096
        rows = max(1, nbytes // (cols * dtype.itemsize))
        weight = torch.ones(rows, cols, dtype=dtype)
        x = torch.ones(cols, dtype=dtype)
        torch.mv(weight, x)  # warm up
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mv(weight, x)
            best = min(best, time.perf_counter() - start)
        result[str(dtype).removeprefix("torch.")] = round(weight.nbytes / best / GB, 3)
    return result


def run_bench_io(
    directory: str,
    *,
    file_bytes: int = 1024 * MiB,
    chunk_sizes: Sequence[int] = (8 * MiB,),
    queue_depths: Sequence[int] = (4,),
    cache_path: str | None = None,
) -> BenchIoResult:
    """Measure read bandwidth in ``directory`` and memory copy bandwidth; optionally cache it.

    The scratch file is removed before returning, also on error.
    """
    if file_bytes < max(chunk_sizes):
        raise ConfigError(f"file_bytes ({file_bytes}) must be at least the largest chunk size")
    if not os.path.isdir(directory):
        raise ConfigError(f"{directory} is not a directory; pass the folder the model lives in")
    path = write_scratch_file(directory, file_bytes)
    try:
        with DirectFileBackend() as probe_backend:
            probe_backend.read_into(path, 0, 4096)
            o_direct = probe_backend.stats().buffered_files == 0
        points = [
            ReadPoint(cs, qd, round(measure_read(path, file_bytes, cs, qd), 3))
            for cs in chunk_sizes
            for qd in queue_depths
        ]
    finally:
        os.unlink(path)
    best = max(points, key=lambda p: p.gb_per_s)
    result = BenchIoResult(
        disk_read_gb_per_s=best.gb_per_s,
        best_chunk_size=best.chunk_size,
        best_queue_depth=best.queue_depth,
        memcpy_gb_per_s=round(measure_memcpy(), 3),
        matvec_gb_per_s=measure_matvec(),
        o_direct=o_direct,
        file_bytes=file_bytes,
        directory=os.path.abspath(directory),
        points=points,
        measured_at=time.time(),
        host=platform.node(),
    )
    if cache_path is not None:
        save_cached(result, cache_path)
    return result


def save_cached(result: BenchIoResult, cache_path: str) -> None:
    """Write ``result`` as JSON to ``cache_path`` with a crc32 of its fields (atomically; parent
    folders created). StorageError if it cannot be written."""
    target = Path(cache_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    data = result.as_dict()
    write_atomic(str(target), [json.dumps({**data, "crc32": json_crc32(data)}, indent=2).encode()])


def load_cached(cache_path: str) -> BenchIoResult | None:
    """The result cached at ``cache_path``, or None if there is none, it is unreadable or its
    crc32 does not match (cut, edited, or written before caches carried one): measure again."""
    try:
        data = json.loads(Path(cache_path).read_text())
        if not isinstance(data, dict) or data.pop("crc32", None) != json_crc32(data):
            return None
        return BenchIoResult.from_dict(data)
    except (OSError, ValueError, TypeError):
        return None
