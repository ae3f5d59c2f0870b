"""Retrieval attention per layer at real scale: Llama-3.1-8B's KV shapes at 128K, on this CPU.

    python -m flashtier.benchmarks.bench_retrieval_layer [--context 131072 --layers 4 --steps 32]

A full 8B KV at 128K is 16 GiB (32 layers x 8 kv heads x 128, bf16), so the step is measured per
layer and multiplied: ``--layers`` layers (default 4, ~1 GB of KV and index each) of the runtime's
own retrieval cache (:class:`~flashtier.runtime.kv.retrieval.RetrievalKVCache`: device ring, host
pool, one cluster index per kv head) are filled with synthetic keys of the model's head shape (a
common offset plus noise, as trained models' keys have; the search's work past ~23K positions is
capped by ``scan_max_keys`` and does not depend on the keys' values), and each timed step attends
every layer in turn with fresh queries, as a forward pass does (torch at one thread and the native
kernels at ``--threads``, as ``generate``'s decode steps run), so each layer's index comes from
DRAM and not from the CPU caches. Reported: the median per layer of the cache's decode attention
(search, gather of the retrieved rows, exact attention + merge), its parts, and the bytes the step
reads (:func:`~flashtier.runtime.kv.retrieval_cost.step_bytes`) against this machine's streaming
rate measured in the same run (a bf16 matvec over matrices larger than the caches).

Target (retrieval issue): <= 2 ms per layer (<= 64 ms per token for 32 layers).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from flashtier.benchmarks.bench_matvec import gb_per_s
from flashtier.benchmarks.common import finish, machine
from flashtier.runtime.kernels import Linear
from flashtier.runtime.kv.retrieval_config import RetrievalCacheConfig, retrieval_config
from flashtier.runtime.kv.retrieval_cost import HeadShape, step_bytes, synthetic_cache

LLAMA_8B = HeadShape(num_kv_heads=8, queries_per_kv=4, head_dim=128)


def stream_gb_per_s(seconds: float = 1.0) -> float:
    """Weight bytes a bf16 matvec streams per second here now (16 matrices of 23 MB, past the caches)."""
    ws = [torch.randn(5632, 2048).to(torch.bfloat16) for _ in range(16)]
    return gb_per_s(Linear(fast=True), ws, torch.randn(1, 2048).to(torch.bfloat16), seconds)


@torch.inference_mode()
def time_steps(cache: Any, shape: HeadShape, context: int, layers: int, steps: int, warmup: int,
               gen: torch.Generator, offset: torch.Tensor) -> dict[str, Any]:
    h, d, g = shape.num_kv_heads, shape.head_dim, shape.queries_per_kv
    per_layer: list[float] = []
    parts = {"search_s": [], "gather_s": [], "attend_s": []}
    for i in range(warmup + steps):
        args = [(torch.randn(h * g, 1, d, generator=gen).to(torch.bfloat16),  # q [H_q, 1, D]
                 (offset + torch.randn(h, 1, d, generator=gen)).to(torch.bfloat16),  # k [H, 1, D]
                 torch.randn(h, 1, d, generator=gen).to(torch.bfloat16)) for _ in range(layers)]  # v
        c = cache.counters
        before = (c.search_s, c.gather_s, c.attend_s)
        t0 = time.perf_counter()
        for layer, (q, k, v) in enumerate(args):
            cache.attend(layer, q, k, v, context + i)
        elapsed = time.perf_counter() - t0
        if i >= warmup:
            per_layer.append(elapsed / layers)
            for key, b in zip(parts, before):
                parts[key].append((getattr(c, key) - b) / layers)
    return {"layer_ms": 1e3 * statistics.median(per_layer),
            "layer_ms_quartiles": [round(1e3 * q, 3) for q in statistics.quantiles(per_layer, n=4)],
            **{k.replace("_s", "_ms"): round(1e3 * statistics.median(v), 3) for k, v in parts.items()}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=131072)
    p.add_argument("--layers", type=int, default=4, help="layers built (each ~1 GB at 128K); the step cycles through them")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1, help="timed rounds, each after its own streaming-rate probe")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--huge-pages", choices=("on", "off"), default="on",
                   help="the host KV pool and the index tables on transparent huge pages (the runtime's default: on)")
    p.add_argument("--queries-per-kv", type=int, default=4,
                   help="query heads per kv head (4: Llama-3.1-8B's GQA; 1: multi-head attention as in kv-long "
                        "and Llama-2, where each search has one query row)")
    p.add_argument("--options", default=None,
                   help="JSON dict of retrieval options (EngineConfig.extra keys, as `generate`'s; e.g. "
                        "'{\"index_options\": {...}}' replaces the preset's index options); default: the defaults")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    options = json.loads(a.options) if a.options else {}
    config = RetrievalCacheConfig()
    if options:
        config = dataclasses.replace(config, retrieval=retrieval_config(options))
    config = config.with_huge_pages(a.huge_pages == "on")
    shape = dataclasses.replace(LLAMA_8B, queries_per_kv=a.queries_per_kv)
    gen = torch.Generator().manual_seed(a.seed)
    offset = torch.randn(shape.num_kv_heads, 1, shape.head_dim, generator=gen) * 2
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    cache = synthetic_cache(config, shape, a.context, a.rounds * (a.steps + a.warmup), gen, torch.bfloat16,
                            a.layers, offset, threads=threads)
    build_s = time.perf_counter() - t0
    bytes_per_layer = step_bytes(config.retrieval, shape, a.context)
    rounds = []
    try:
        for r in range(a.rounds):
            gbs = stream_gb_per_s()
            torch.set_num_threads(1)  # as generate's decode steps: torch at one thread, the native kernels at `threads`
            try:
                row = time_steps(cache, shape, a.context + r * (a.steps + a.warmup), a.layers, a.steps, a.warmup,
                                 gen, offset)
            finally:
                torch.set_num_threads(threads)
            row["stream_gb_per_s"] = round(gbs, 2)
            row["bytes_limit_ms"] = round(bytes_per_layer / (gbs * 1e9) * 1e3, 3)
            row["layer_ms"] = round(row["layer_ms"], 3)
            row["per_token_32_layers_ms"] = round(32 * row["layer_ms"], 1)
            rounds.append(row)
            print(row, flush=True)
        stats = cache.stats()
    finally:
        cache.close()
    result = {"shape": f"Llama-3.1-8B KV (8 kv heads x 128, {a.queries_per_kv} query heads each, bf16)", "context": a.context,
              "layers": a.layers, "threads": threads, "machine": machine(), "huge_pages": a.huge_pages,
              "build_s": round(build_s, 1), "step_bytes_per_layer": bytes_per_layer,
              "keys_scanned_fraction": stats.get("attention_keys_scanned_fraction"),
              "target_layer_ms": 2.0, "rounds": rounds, "options": options,
              "layer_ms": [r["layer_ms"] for r in rounds]}
    return finish(result, a.json, summary_skips=())


if __name__ == "__main__":
    raise SystemExit(main())
