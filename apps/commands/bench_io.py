"""``flashtier bench-io``: measure disk read and memory bandwidth, and cache the result.

Writes a scratch file in ``--dir`` (default: the current folder; point it at the disk the model
lives on), reads it back with O_DIRECT at the given chunk sizes and queue depths, times a host
memory copy and host matrix-vector products, deletes the file, and stores the numbers as JSON at
``--cache`` (read by ``flashtier plan`` and the planner).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT_CACHE = Path.home() / ".cache" / "flashtier" / "bench_io.json"
MiB = 1 << 20


def _sizes(text: str) -> list[int]:
    """'4,8,16' (MiB) -> byte counts."""
    try:
        values = [int(float(part) * MiB) for part in text.split(",") if part.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated MiB values, got {text!r}"
        ) from e
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive MiB values, got {text!r}")
    return values


def _ints(text: str) -> list[int]:
    """'2,4,8' -> [2, 4, 8]."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench-io", help="measure disk and memory bandwidth (cached for plan)", description=__doc__
    )
    p.add_argument("--dir", default=".", help="folder on the disk to measure (default: current)")
    p.add_argument(
        "--size-mib", type=int, default=1024, help="scratch file size in MiB (default 1024)"
    )
    p.add_argument("--chunk-mib", type=_sizes, default=[8 * MiB], metavar="LIST",
                   help="read sizes to try, in MiB, comma-separated (default 8)")
    p.add_argument("--queue-depth", type=_ints, default=[4], metavar="LIST",
                   help="queue depths to try, comma-separated (default 4)")
    p.add_argument(
        "--cache", default=str(DEFAULT_CACHE), help=f"where to store the result (default {DEFAULT_CACHE})"
    )
    p.add_argument("--no-cache", action="store_true", help="do not write the cache")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flashtier.storage_backends.bench_io import run_bench_io

    result = run_bench_io(
        args.dir,
        file_bytes=args.size_mib * MiB,
        chunk_sizes=args.chunk_mib,
        queue_depths=args.queue_depth,
        cache_path=None if args.no_cache else args.cache,
    )
    if args.json:
        print(json.dumps(result.as_dict()))
        return 0
    print(f"disk read: {result.disk_read_gb_per_s:.2f} GB/s "
          f"({'O_DIRECT' if result.o_direct else 'buffered + FADV_DONTNEED'}, "
          f"best at {result.best_chunk_size // MiB} MiB x queue depth {result.best_queue_depth})")
    for point in result.points:
        print(f"  {point.chunk_size / MiB:g} MiB x {point.queue_depth}: {point.gb_per_s:.2f} GB/s")
    print(f"memory copy: {result.memcpy_gb_per_s:.1f} GB/s")
    for dtype, gbps in result.matvec_gb_per_s.items():
        print(f"matrix-vector ({dtype}): {gbps:.1f} GB/s of weights")
    if not args.no_cache:
        print(f"cached in {args.cache}")
    return 0
