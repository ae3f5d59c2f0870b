"""Does ``plan`` predict the retrieval step that runs? Probe-based prediction vs measured steps.

    python -m flashtier.benchmarks.bench_retrieval_plan --json bench_out/retrieval_plan.json

For each model (the random-weight ``kv-long``: 8 layers x 8 kv heads of 128; the shipped
``tiny-moe-16k``: 6 layers x 2 kv heads of 32, 4 query heads each) and context: the prediction
``plan --attention retrieval`` makes (:mod:`flashtier.runtime.kv.retrieval_cost`: a probe of one
step (up to 8 layers) at 4K and 12K on synthetic keys, scaled by the bytes the index reads at the context),
then the measured attention time of real decode steps (the model's forward over a retrieval cache
filled by the projection-only prefill of ``bench_long_context``; median over ``--steps`` steps of
the cache's own ``decode_attention_s``). The target: within 30%.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
from pathlib import Path
from typing import Any

import torch

from flashtier.benchmarks.common import finish
from flashtier.benchmarks.bench_long_context import ProjectionPrefill, ensure_model, retrieval_cache
from flashtier.runtime.engine import open_model
from flashtier.runtime.kv.retrieval_config import RetrievalCacheConfig
from flashtier.runtime.kv.retrieval_cost import HeadShape, model_flush_bytes, probe


def measured_attention_s(model: Any, cache: Any, start: int, steps: int, warmup: int, seed: int) -> list[float]:
    """Per decode step, the seconds the cache spent in attention (all layers)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # as generate's decode steps (the cache's native calls use the kernel threads)
    try:
        with torch.inference_mode():
            for i in range(warmup + steps):
                before = cache.counters.decode_attention_s
                tok = torch.randint(0, model.config.vocab_size, (1,), generator=gen)
                model.forward(tok, cache, start + i)
                if i >= warmup:
                    out.append(cache.counters.decode_attention_s - before)
    finally:
        torch.set_num_threads(saved)
    return out


def run_model(path: Path, contexts: list[int], steps: int, warmup: int) -> list[dict[str, Any]]:
    llm = open_model(path)
    model = llm.transformer
    c = model.config
    config = RetrievalCacheConfig.from_engine(llm.engine_config.kv_block_size, llm.engine_config.prefill_chunk, {})
    shape = HeadShape(c.num_kv_heads, c.num_heads // c.num_kv_heads, c.head_dim, model.dtype.itemsize)
    flush = model_flush_bytes(c, {n: t.nbytes for n, t in llm.checkpoint.tensors.items()})
    cost = probe(config, shape, c.num_layers, dtype=model.dtype, flush=flush)
    fill = ProjectionPrefill(model, 0)
    rows = []
    for length in contexts:
        cache, _ = retrieval_cache(model, fill, length, length + steps + warmup + 1, config)
        times = measured_attention_s(model, cache, length, steps, warmup, seed=length)
        cache.close()
        del cache
        gc.collect()
        predicted = cost.step_seconds(config.retrieval, shape, length, c.num_layers)
        measured = statistics.median(times)
        row = {"model": path.name, "context": length, "predicted_ms": round(1e3 * predicted, 2),
               "measured_ms": round(1e3 * measured, 2), "measured_p25_ms": round(1e3 * statistics.quantiles(times, n=4)[0], 2),
               "ratio": round(predicted / measured, 3), "within_30pct": abs(predicted / measured - 1) <= 0.30,
               "probe": {"fixed_ms": round(1e3 * cost.fixed_s, 3), "gb_per_s": round(cost.bytes_per_s / 1e9, 3),
                         "flush_bytes": flush}}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kv-long", type=Path, default=Path("bench_out/kv-long"), help="kv-long checkpoint (written if missing)")
    p.add_argument("--kv-long-contexts", default="4096,16384,65536,131072")
    p.add_argument("--tiny", type=Path, default=Path("models/tiny-moe-16k"))
    p.add_argument("--tiny-contexts", default="4096,16000")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    rows = []
    if args.tiny_contexts:
        rows += run_model(args.tiny, [int(x) for x in args.tiny_contexts.split(",")], args.steps, args.warmup)
    if args.kv_long_contexts:
        rows += run_model(ensure_model(args.kv_long), [int(x) for x in args.kv_long_contexts.split(",")], args.steps,
                          args.warmup)
    result = {"threads": torch.get_num_threads(), "rows": rows, "all_within_30pct": all(r["within_30pct"] for r in rows)}
    return finish(result, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
