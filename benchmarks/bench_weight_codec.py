"""The compressed-weight codec (``storage_backends/weight_codec.py``): bytes at rest and decode speed.

    python -m flashtier.benchmarks.bench_weight_codec [--model bench_out/dense-1.7g] [--segments 24]

Takes the first ``--segments`` 4 MiB pieces of the model's FFN tensors (bf16), encodes them with
``split16`` and decodes them back (checked bit-identical) on 1 and 2 threads, with the C
extension's interleave and with the torch fallback; reports the stored fraction and GB/s of
weights restored (median of ``--repeat``). Writes benchmarks/results/weight_codec.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from flashtier.benchmarks.common import (
    REPO,
    ensure_model,
    machine,
    report_by_threads,
    thread_label,
)
from flashtier.checkpoint.folder import Checkpoint, read_tensor
from flashtier.storage_backends import weight_codec
from flashtier.storage_backends.compressed_layout import SEGMENT_BYTES
from flashtier.storage_backends.weight_codec import SPLIT16, decode_into, encode


def pieces(model: Path, count: int) -> list[bytes]:
    ck = Checkpoint(model)
    out: list[bytes] = []
    for name, info in sorted(ck.tensors.items()):
        if ".mlp." not in name:
            continue
        raw = read_tensor(info).contiguous().view(torch.uint8).numpy().tobytes()
        out += [raw[i: i + SEGMENT_BYTES] for i in range(0, len(raw), SEGMENT_BYTES)]
        if len(out) >= count:
            break
    return out[:count]


def decode_gb_per_s(records: list[bytearray], sizes: list[int], threads: int) -> float:
    outs = [bytearray(n) for n in sizes]

    def work(i: int) -> None:
        decode_into(memoryview(records[i]), SPLIT16, memoryview(outs[i]), "bench")

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, range(len(records))))  # warm: per-thread buffers
        t0 = time.perf_counter()
        list(pool.map(work, range(len(records))))
        return sum(sizes) / (time.perf_counter() - t0) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "bench_out" / "dense-1.7g"))
    ap.add_argument("--segments", type=int, default=24)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(1)
    model = ensure_model(Path(a.model), "dense-1.7g")
    raw = pieces(model, a.segments)
    records = [bytearray(encode(p, SPLIT16)) for p in raw]
    sizes = [len(p) for p in raw]
    for rec, p in zip(records, raw):  # exactness first
        out = bytearray(len(p))
        decode_into(memoryview(rec), SPLIT16, memoryview(out), "bench")
        assert bytes(out) == p, "split16 did not restore the bytes"
    res: dict = {"machine": machine(), "model": str(model), "segments": len(raw),
                 "stored_fraction": round(sum(map(len, records)) / sum(sizes), 4), "gb_per_s": {}}
    native = weight_codec._interleave16
    for label, interleave in (("C extension interleave", native), ("torch.stack interleave (fallback)", None)):
        if label.startswith("C") and native is None:
            continue
        weight_codec._interleave16 = interleave
        for threads in (1, 2):
            runs = [decode_gb_per_s(records, sizes, threads) for _ in range(a.repeat)]
            res["gb_per_s"][thread_label(label, threads)] = round(statistics.median(runs), 2)
    weight_codec._interleave16 = native
    report_by_threads("weight_codec", res, f"Machine: {res['machine']}; {len(raw)} x 4 MiB bf16 FFN segments of "
                      f"{model.name}; stored fraction {res['stored_fraction']} (split16).", "decode",
                      "GB/s of weights restored")


if __name__ == "__main__":
    main()
