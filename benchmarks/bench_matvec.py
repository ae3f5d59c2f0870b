"""Single-row matrix products (the decode step's kernel): weight bytes streamed per second.

Compares torch's ``F.linear`` with bf16, fp16 and fp32 weights against flashtier's bf16 kernels
(the C extension's and numba's) (``runtime/kernels.py``), on 1 and 2 threads, over a set of matrices larger than the
CPU caches (so it measures memory streaming, not cache hits). Median of ``--repeat`` rounds, the
cases taking turns within each round (this machine's speed drifts). The C kernel runs twice: on
weights in 4 KiB pages (torch's allocator) and on weights in transparent huge pages, as the
runtime keeps them (``tiers/hugepages.py``; ``--huge-pages off`` turns that off).

    python -m flashtier.benchmarks.bench_matvec [--rows 5632 --cols 2048 --matrices 16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from flashtier.benchmarks.common import machine, report_by_threads, thread_label
from flashtier.runtime.kernels import Linear
from flashtier.tiers import hugepages


def gb_per_s(fn, ws: list[torch.Tensor], x: torch.Tensor, seconds: float) -> float:
    for w in ws[:2]:
        fn(x, w)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        for w in ws:
            fn(x, w)
            n += 1
    return n * ws[0].nbytes / (time.perf_counter() - t0) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=5632)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--matrices", type=int, default=16, help="distinct weights cycled through (defeats caches)")
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    base = [torch.randn(a.rows, a.cols) * 0.02 for _ in range(a.matrices)]
    x32 = torch.randn(1, a.cols)
    res: dict = {"machine": machine(), "shape": [a.rows, a.cols], "matrices": a.matrices, "gb_per_s": {}}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        cases = {
            "torch fp32": (F.linear, torch.float32, False),
            "torch fp16": (F.linear, torch.float16, False),
            "torch bf16": (F.linear, torch.bfloat16, False),
        }
        for kernel in ("native", "numba"):
            fast = Linear(fast=True, threads=threads, kernel=kernel)
            if fast.kernel == kernel:
                label = "C extension" if kernel == "native" else "numba"
                cases[f"flashtier bf16 ({label})"] = (fast, torch.bfloat16, False)
                if kernel == "native":
                    cases["flashtier bf16 (C extension), huge pages"] = (fast, torch.bfloat16, True)
        weights = {name: [hugepages.empty(tuple(w.shape), dt, huge=huge).copy_(w) for w in base]
                   for name, (_, dt, huge) in cases.items()}
        runs: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(a.repeat):
            for name, (fn, dt, _) in cases.items():
                runs[name].append(gb_per_s(fn, weights[name], x32.to(dt), a.seconds))
        for name in cases:
            res["gb_per_s"][thread_label(name, threads)] = round(statistics.median(runs[name]), 1)
        del weights
    report_by_threads("matvec", res, f"Machine: {res['machine']}; weight [{a.rows}, {a.cols}] x {a.matrices} "
                      "matrices, one activation row.", "kernel", "weights streamed GB/s")


if __name__ == "__main__":
    main()
