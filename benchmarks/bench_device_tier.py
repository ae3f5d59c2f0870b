"""The device tier on a GPU: do copies from pinned host memory overlap with compute?

    python -m flashtier.benchmarks.bench_device_tier [--pages 16] [--page-mib 64] [--batch 256]

A stack of ``--pages`` fp16 weight pages of ``--page-mib`` MiB each (a layer's worth each) lives in
the host tier (pinned); the device tier holds 3 of them. One "pass" multiplies an activation
``[batch, K]`` through every page in order, the way a forward pass streams layers: page i+1 (and
i+2) are prefetched while page i is used. Measured, each the median of ``--repeat`` passes:

* ``copy_only``: the same pages acquired with no compute (how fast the store moves host -> device),
* ``compute_only``: the matmuls on pages already on the GPU (all pages resident, no store),
* ``streamed``: through the store with compute (prefetch + use, as the runtime drives it),
* ``torch_copy``: a plain ``tensor.to('cuda', non_blocking=True)`` of each pinned page (the link's
  speed without flashtier).

``overlap`` = (copy_only + compute_only - streamed) / min(copy_only, compute_only): 1 when the
shorter of the two hides entirely behind the longer, 0 when they run one after the other. With
``--device cpu`` it runs the CPU stand-in (the same store logic; no real overlap to measure).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from flashtier.storage_backends import MemoryBackend
from flashtier.tiers import PageDesc, PageSource, StoreConfig, TieredStore


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", type=int, default=16)
    ap.add_argument("--page-mib", type=int, default=64)
    ap.add_argument("--batch", type=int, default=256, help="activation rows (compute per page grows with it)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    page = args.page_mib << 20
    k = 4096
    n = page // (2 * k)  # fp16 [n, k] per page
    rng = np.random.default_rng(0)
    data = (rng.standard_normal(args.pages * page // 2, dtype=np.float32) * 0.02).astype(np.float16).tobytes()
    x = torch.randn(args.batch, k, dtype=torch.float16, device=args.device)
    with MemoryBackend(alignment=4096, chunk_size=8 << 20) as backend:
        backend.add_file("w", data)
        config = StoreConfig(host_budget=args.pages * page, device_budget=3 * page, device=args.device)
        with TieredStore(config, backend) as store:
            store.register_many(PageDesc(i, PageSource("w", i * page, page), torch.float16, (n, k))
                                for i in range(args.pages))

            def one_pass(compute: bool) -> float:
                _sync(args.device)
                start = time.perf_counter()
                for i in range(args.pages):
                    for j in (i + 1, i + 2):
                        if j < args.pages:
                            store.prefetch(j)
                    with store.use(i) as w:
                        if compute:
                            y = x @ w.T  # [batch, n]
                            del y
                        elif args.device == "cuda":
                            torch.cuda.current_stream().synchronize()  # the copy is done when use() returns work
                _sync(args.device)
                return time.perf_counter() - start

            one_pass(False)  # storage -> host once (the host tier then holds every page)
            one_pass(True)
            copy_only = statistics.median(one_pass(False) for _ in range(args.repeat))
            streamed = statistics.median(one_pass(True) for _ in range(args.repeat))
            stats = store.stats()

    host = torch.from_numpy(np.frombuffer(bytearray(data), dtype=np.float16).reshape(args.pages, n, k))
    if args.device == "cuda":
        host = host.pin_memory()
    resident = host.to(args.device)

    def compute_pass() -> float:
        _sync(args.device)
        start = time.perf_counter()
        for i in range(args.pages):
            y = x @ resident[i].T
            del y
        _sync(args.device)
        return time.perf_counter() - start

    def torch_copy_pass() -> float:
        _sync(args.device)
        start = time.perf_counter()
        for i in range(args.pages):
            resident[i].copy_(host[i], non_blocking=True)
        _sync(args.device)
        return time.perf_counter() - start

    compute_pass()
    compute_only = statistics.median(compute_pass() for _ in range(args.repeat))
    torch_copy = statistics.median(torch_copy_pass() for _ in range(args.repeat))
    total = args.pages * page
    overlap = (copy_only + compute_only - streamed) / min(copy_only, compute_only)
    print(json.dumps({
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu (stand-in)",
        "pages": args.pages, "page_bytes": page, "batch": args.batch,
        "copy_only_s": round(copy_only, 4), "copy_only_gb_per_s": round(total / copy_only / 1e9, 2),
        "torch_copy_gb_per_s": round(total / torch_copy / 1e9, 2),
        "compute_only_s": round(compute_only, 4), "streamed_s": round(streamed, 4),
        "streamed_vs_max": round(streamed / max(copy_only, compute_only), 3),
        "overlap": round(overlap, 3),
        "device_tier_used_bytes": stats.tiers["device"].used_bytes,
        "late_acquires": stats.late,
    }), flush=True)


if __name__ == "__main__":
    main()
