"""Single-row products straight from GGUF blocks (the decode step on a quantized model): quantized
weight bytes streamed per second.

Runs ``flashtier._native.q_matvec`` (runtime/quant_kernels.py) for each ggml type next to the bf16
kernel (``bf16_matvec``, runtime/kernels.py), on 1 and 2 threads, on dense-1.7g-like shapes. Each
case cycles through enough distinct matrices to exceed the CPU caches (so it measures memory
streaming plus dequantization, not cache hits); median and best of ``--repeat`` rounds of
``--seconds`` (on a shared machine the best round is the one least disturbed by other processes).
GB/s counts the bytes of the weight as stored (e.g. 144 B per 256 weights for Q4_K), so types
compare by how close they get to the memory bandwidth, and Gw/s (weights per second) compares
their arithmetic. The quantized types also run with the fp32-FMA kernels (``fma`` columns:
``activations="f32-fma"``; the default exact columns use split activations where the CPU has
AVX-512 VNNI) and with int8 activations (``q8`` columns: ``activations="q8"``, the opt-in
approximation with x quantized per 32 values and integer dot products; F32 / F16 / BF16 have
neither). Results JSON and table: ``benchmarks/results/quant_matvec.{json,md}`` (keys end in
`` fma`` / `` q8``).

    python -m flashtier.benchmarks.bench_quant_matvec [--types Q4_K,Q6_K] [--shapes 5632x2048] [--activations f32,f32-fma,q8]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
from flashtier.benchmarks.common import machine, publish
from flashtier.checkpoint.ggml_types import GGMLType, type_info
from flashtier.runtime.quant_kernels import ACT_CODES

SHAPES = "2048x2048,5632x2048,2048x5632,32000x2048"
TYPES = "BF16,F16,F32,Q8_0,Q6_K,Q5_K,Q4_K,Q4_0"
SUFFIX = {"f32": "", "f32-fma": " fma", "q8": " q8"}
"""Result key / column suffix of each --activations value (quant_kernels.ACTIVATIONS)."""
CACHE_DEFEAT_BYTES = 96 << 20
"""Distinct matrices per case: at least this many bytes in all (the L3 here is 32 MiB)."""


def random_weight(t: GGMLType, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Valid ``[rows, row_bytes]`` bytes of type ``t`` (random quants, finite f16 scales)."""
    info = type_info(t)
    if not info.quantized:
        w = rng.standard_normal((rows, cols), dtype=np.float32) * 0.02
        if t == GGMLType.F32:
            return w.view(np.uint8)
        if t == GGMLType.F16:
            return w.astype(np.float16).view(np.uint8)
        return (w.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    n = rows * cols // info.block_size
    b = rng.integers(0, 256, (n, info.type_size), dtype=np.uint8)
    scale = rng.uniform(1e-4, 1e-2, (n, 2)).astype(np.float16).view(np.uint8)  # [n, 4]: d (and dmin)
    if t == GGMLType.Q6_K:
        b[:, 208:210] = scale[:, :2]
    elif t in (GGMLType.Q4_K, GGMLType.Q5_K):
        b[:, 0:4] = scale
    else:
        b[:, 0:2] = scale[:, :2]
    return b.reshape(rows, -1)


def wait_idle(max_seconds: float, threshold: float = 0.9, window: float = 0.5) -> float:
    """Wait (up to ``max_seconds``) until the CPUs are at least ``threshold`` idle over ``window``
    seconds (Linux ``/proc/stat``), so that a round is not shared with other processes; returns
    the last idle fraction seen (1.0 when not measurable)."""
    def ticks() -> list[int]:
        with open("/proc/stat") as f:
            return [int(v) for v in f.readline().split()[1:8]]

    end, frac = time.perf_counter() + max_seconds, 1.0
    while max_seconds > 0:
        try:
            a = ticks()
            time.sleep(window)
            d = [q - p for p, q in zip(a, ticks())]
        except OSError:
            return 1.0
        frac = (d[3] + d[4]) / max(1, sum(d))
        if frac >= threshold or time.perf_counter() >= end:
            break
    return frac


def gb_per_s(fn: Callable[[np.ndarray], None], ws: list[np.ndarray], seconds: float) -> float:
    for w in ws[:2]:
        fn(w)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        for w in ws:
            fn(w)
            n += 1
    return n * ws[0].nbytes / (time.perf_counter() - t0) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default=TYPES, help="comma-separated ggml type names (BF16 = the bf16_matvec kernel)")
    ap.add_argument("--shapes", default=SHAPES, help="comma-separated ROWSxCOLS")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--activations", default="f32,f32-fma,q8",
                    help="comma-separated: f32 (exact products, the default kernels: split activations on AVX-512 "
                         "VNNI), f32-fma (exact, the fp32-FMA kernels), q8 (int8 activations); the last two for "
                         "quantized types only")
    ap.add_argument("--isa", type=int, default=None, choices=(4, 3, 0),
                    help="force the GGUF kernels' level (q_set_isa: 4 AVX-512, 3 AVX2, 0 baseline) to measure what "
                         "other CPUs run; results go to quant_matvec_isaN.{json,md}")
    ap.add_argument("--seconds", type=float, default=0.5)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                    help="before each round wait up to S seconds for idle CPUs (shared machines)")
    ap.add_argument("--prefetch", choices=("l2", "nta"), default=None,
                    help="how the kernels prefetch weights (default: the CPU vendor's choice, see _native.q_prefetch)")
    a = ap.parse_args()
    from flashtier import _native  # the benchmark measures the C kernels; fails loudly without them

    if a.isa is not None and _native.q_set_isa(a.isa) != a.isa:
        ap.error(f"--isa {a.isa}: this CPU supports kernel levels up to {_native.q_isa()}")
    if a.prefetch:
        _native.q_prefetch(a.prefetch)

    rng = np.random.default_rng(0)
    types = [GGMLType[n.strip()] for n in a.types.split(",")]
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    threads_list = [int(t) for t in a.threads.split(",")]
    acts = [v.strip() for v in a.activations.split(",")]
    if not acts or any(v not in SUFFIX for v in acts):
        ap.error(f"--activations takes f32, f32-fma and/or q8, not {a.activations!r}")
    columns = [(th, act) for act in acts for th in threads_list]  # table columns: f32 ones first
    res: dict = {"machine": machine(), "isa_level": _native.q_isa(), "q8_vnni": _native.q_vnni(),
                 "prefetch": _native.q_prefetch(),
                 "seconds": a.seconds, "repeat": a.repeat,
                 "gb_per_s": {}, "gb_per_s_best": {}, "gweights_per_s": {}}
    print(f"Machine: {res['machine']}; kernel level {res['isa_level']} (4 = AVX-512); int8 activations: "
          f"{'AVX-512 VNNI' if res['q8_vnni'] else 'AVX2 / baseline'}", flush=True)
    for rows, cols in shapes:
        x = rng.standard_normal(cols, dtype=np.float32)
        out = np.empty(rows, np.float32)
        for t in types:
            info = type_info(t)
            nbytes = rows * info.row_bytes(cols)
            ws = [random_weight(t, rows, cols, rng) for _ in range(max(1, -(-CACHE_DEFEAT_BYTES // nbytes)))]
            for threads, act in columns:
                if act != "f32" and not info.quantized:
                    continue
                if t == GGMLType.BF16:
                    def fn(w: np.ndarray) -> None:
                        _native.bf16_matvec(w, x, out, rows, cols, threads)
                else:
                    def fn(w: np.ndarray) -> None:
                        _native.q_matvec(int(t), w, x, out, rows, cols, threads, ACT_CODES[act])
                runs = []
                for _ in range(a.repeat):
                    wait_idle(a.wait_idle)
                    runs.append(gb_per_s(fn, ws, a.seconds))
                gbs = statistics.median(runs)
                key = f"{t.name} {rows}x{cols} t{threads}" + SUFFIX[act]
                res["gb_per_s"][key] = round(gbs, 1)
                res["gb_per_s_best"][key] = round(max(runs), 1)
                res["gweights_per_s"][key] = round(gbs * 1e9 / (nbytes / (rows * cols)) / 1e9, 1)
                print(f"  {key}: {gbs:.1f} GB/s (best {max(runs):.1f})", flush=True)
            del ws
    lines = [f"Machine: {res['machine']}; GGUF kernel level {res['isa_level']} (4 AVX-512, 3 AVX2, 0 baseline)"
             f"{' forced with --isa' if a.isa is not None else ''}; one fp32 activation row; GB/s of weight bytes as stored, median / "
             f"best of {a.repeat} rounds (Gweights/s of the median in brackets); BF16 = bf16_matvec, the others "
             "q_matvec; the default exact kernels (split activations for Q4_0 / Q4_K / Q5_K / Q6_K on AVX-512 "
             "VNNI and AVX2); fma = the fp32-FMA kernels (activations=\"f32-fma\"); q8 = int8 activations "
             "(activations=\"q8\", an approximation).", "",
             "| type | B/weight | shape | "
             + " | ".join(f"{t} thread{'s' if t > 1 else ''}{SUFFIX[act]}" for t, act in columns)
             + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in columns) + " |"]
    for t in types:
        info = type_info(t)
        for rows, cols in shapes:
            cells = []
            for threads, act in columns:
                key = f"{t.name} {rows}x{cols} t{threads}" + SUFFIX[act]
                if key not in res["gb_per_s"]:
                    cells.append("-")
                    continue
                cells.append(f"{res['gb_per_s'][key]} / {res['gb_per_s_best'][key]} ({res['gweights_per_s'][key]})")
            lines.append(f"| {t.name} | {info.type_size / info.block_size:.4g} | {rows}x{cols} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    publish("quant_matvec" if a.isa is None else f"quant_matvec_isa{a.isa}", res, table)


if __name__ == "__main__":
    main()
