"""How fast can this machine read one MoE expert from storage, and does splitting the read help?

    python -m flashtier.benchmarks.bench_expert_reads [--model bench_out/moe-1.3g-experts] \
        [--experts 12] [--rounds 3] [--parts 1,2,4,8,16]

Reads ``--experts`` randomly chosen expert-sized extents (``slot_bytes`` of the converted
checkpoint's layout, 17.3 MB for ``moe-1.3g``) with O_DIRECT into an aligned buffer, each read
split into P equal parts issued at once from a thread pool, for every P of ``--parts``; the P are
interleaved within each round so that the disk's drift over the run hits them alike. Reports GB/s
and milliseconds per expert per P and round: what a demand miss of the expert cache costs, and
whether queue depth buys bandwidth on this disk (on this VM it does not: 0.73-0.85 GB/s for 1 to
16 parts in one run, session 4).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ALIGN = 4096


def read_split(fd: int, buf: mmap.mmap, offset: int, nbytes: int, parts: int, pool: ThreadPoolExecutor) -> int:
    """Read ``nbytes`` at ``offset`` into ``buf`` as ``parts`` aligned reads in flight at once."""
    step = -(-nbytes // parts)
    step = -(-step // ALIGN) * ALIGN

    def one(i: int) -> int:
        start = i * step
        if start >= nbytes:
            return 0
        return os.preadv(fd, [memoryview(buf)[start:start + min(step, nbytes - start)]], offset + start)

    return sum(pool.map(one, range(parts)))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("bench_out/moe-1.3g-experts"))
    ap.add_argument("--experts", type=int, default=12, help="expert reads per (P, round)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--parts", default="1,2,4,8,16")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from flashtier.checkpoint.folder import Checkpoint
    from flashtier.checkpoint.expert_layout import expert_layout

    layout = expert_layout(Checkpoint(args.model))
    extents = [xs[0] for xs in layout.experts.values()]  # first extent of each expert: where its read starts
    nbytes = -(-max(sum(x.length for x in xs) for xs in layout.experts.values()) // ALIGN) * ALIGN  # one slot
    parts_list = [int(p) for p in args.parts.split(",")]
    rng = random.Random(args.seed)
    buf = mmap.mmap(-1, nbytes)
    rows: dict[int, list[float]] = {p: [] for p in parts_list}
    with ThreadPoolExecutor(max(parts_list)) as pool:
        for rnd in range(args.rounds):
            for parts in parts_list:
                chosen = rng.sample(extents, min(args.experts, len(extents)))
                fds = {}
                start = time.perf_counter()
                for ext in chosen:
                    path = str(ext.path)
                    fd = fds.get(path) or fds.setdefault(path, os.open(path, os.O_RDONLY | os.O_DIRECT))
                    size = os.fstat(fd).st_size
                    off = ext.offset // ALIGN * ALIGN
                    read_split(fd, buf, off, min(nbytes, size - off) // ALIGN * ALIGN, parts, pool)
                dt = time.perf_counter() - start
                for fd in fds.values():
                    os.close(fd)
                gbps = len(chosen) * nbytes / dt / 1e9
                rows[parts].append(gbps)
                print(json.dumps({"round": rnd, "parts": parts, "gb_per_s": round(gbps, 3),
                                  "ms_per_expert": round(dt / len(chosen) * 1e3, 2)}), flush=True)
    summary = {p: {"median_gb_per_s": round(statistics.median(v), 3),
                   "median_ms_per_expert": round(nbytes / statistics.median(v) / 1e6, 2)} for p, v in rows.items()}
    print(json.dumps({"expert_bytes": nbytes, "summary": summary}), flush=True)


if __name__ == "__main__":
    main()
