"""How exact the default decode product is: the split-activation kernels (activations="f32" on
AVX-512 VNNI) and the fp32-FMA kernels (activations="f32-fma") against the fp64 product of the
dequantized weights, next to the int8 approximation (activations="q8").

Per ggml type and activation kind, the error of each output relative to ``sum_k |W[r, k] x[k]|``
(the scale of fp32 summation error), median and max over the rows. Activation kinds: Gaussian;
Gaussian with 1% of the channels 50x larger (outlier channels, as in trained LLMs); a wide dynamic
range (each value scaled by 10^U(-2, 2)).

    python -m flashtier.benchmarks.bench_split_error [--rows 512] [--cols 2048,5632]

Results: ``benchmarks/results/split_error.{json,md}``.
"""

from __future__ import annotations

import argparse

import gguf
import numpy as np
import torch

from flashtier.benchmarks.bench_quant_matvec import random_weight
from flashtier.benchmarks.common import machine, publish
from flashtier.checkpoint.ggml_types import GGMLType
from flashtier.runtime import quant_kernels as qk

TYPES = (GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K, GGMLType.Q4_0)
ACTS = ("f32", "f32-fma", "q8")


def activations(kind: str, cols: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal(cols)
    if kind == "outliers":
        x = x * np.where(rng.random(cols) < 0.01, 50.0, 1.0)
    elif kind == "wide":
        x = x * 10.0 ** rng.uniform(-2, 2, cols)
    return x.astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--cols", default="2048,5632")
    ap.add_argument("--samples", type=int, default=4, help="activation vectors per (type, kind, cols)")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    try:
        from flashtier._native import q_vnni
        split = bool(q_vnni())
    except ImportError:  # no C extension: the numpy fallback computes every product
        split = False
    res: dict = {"machine": machine(), "split_kernels": split, "errors": {}}
    for t in TYPES:
        for cols in (int(c) for c in a.cols.split(",")):
            w = random_weight(t, a.rows, cols, rng)
            wd = gguf.quants.dequantize(w.reshape(-1), gguf.GGMLQuantizationType(int(t))).reshape(a.rows, cols)
            wd = wd.astype(np.float64)
            for kind in ("gaussian", "outliers", "wide"):
                errs: dict[str, list[np.ndarray]] = {act: [] for act in ACTS}
                for _ in range(a.samples):
                    x = activations(kind, cols, rng)
                    exact = wd @ x.astype(np.float64)
                    scale = np.abs(wd) @ np.abs(x.astype(np.float64))
                    for act in ACTS:
                        y = qk.qmatvec(t, torch.from_numpy(w), torch.from_numpy(x), 2, activations=act).numpy()
                        errs[act].append(np.abs(y.astype(np.float64) - exact) / scale)
                for act in ACTS:
                    e = np.concatenate(errs[act])
                    res["errors"][f"{t.name} {cols} {kind} {act}"] = {"median": float(np.median(e)),
                                                                       "max": float(e.max())}
    lines = [f"Machine: {res['machine']}; split-activation kernels: {'yes (AVX-512 VNNI)' if res['split_kernels'] else 'no (f32 = f32-fma)'}; "
             f"{a.rows} rows, {a.samples} activation vectors per cell; error of each output / sum_k |W[r,k] x[k]| "
             "against the fp64 product of the dequantized weights, median / max.", "",
             "| type | cols | activations | f32 (default) | f32-fma | q8 (approximation) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for t in TYPES:
        for cols in (int(c) for c in a.cols.split(",")):
            for kind in ("gaussian", "outliers", "wide"):
                cells = [res["errors"][f"{t.name} {cols} {kind} {act}"] for act in ACTS]
                lines.append(f"| {t.name} | {cols} | {kind} | " + " | ".join(
                    f"{c['median']:.1e} / {c['max']:.1e}" for c in cells) + " |")
    table = "\n".join(lines)
    publish("split_error", res, table)


if __name__ == "__main__":
    main()
