"""Long-context decode speed: retrieval attention vs full attention as the context grows.

    python -m flashtier.benchmarks.bench_long_context --json bench_out/long_context_speed.json

Model: the random-weight ``kv-long`` preset (8 layers, 8 kv heads of 128 dims: 32 KiB of bf16 KV
per token, 4 GiB at 128K), written to ``--model`` if the folder is missing.

How the long KV is built (a real prefill of 128K tokens would take hours on this CPU): a
*projection-only prefill*. For a random token sequence, every layer's keys and values are that
layer's K/V projections of the (RMS-normed) token embeddings, RoPE-rotated at their positions;
the attention and FFN of earlier layers are skipped. For layer 0 this is exactly what a real
prefill computes; deeper layers see the embedding instead of the residual stream. The KV goes
through each cache's normal write path (``cache.write``), so the retrieval cache demotes blocks to
the host tier and builds its indexes exactly as after a real prefill. Decode steps then run the
real model forward (all layers, real queries) for ``--steps`` tokens; the median step time is
reported.

Per context length: step time with full attention (the block KV cache, exact) and with retrieval
attention; for retrieval also the device / host / storage KV bytes, keys scanned and index build
time. The target: retrieval step time at 128K at most 2x the retrieval step time at 4K.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from flashtier.runtime.engine import open_model
from flashtier.runtime.kv_cache import BlockKVCache
from flashtier.runtime.kv_layout import KVBlockLayout
from flashtier.runtime.kv_retrieval import RetrievalKVCache
from flashtier.runtime.kv_retrieval_config import RetrievalCacheConfig
from flashtier.runtime.model import Transformer, apply_rope, rms_norm

FILL_CHUNK = 8192


def ensure_model(path: Path) -> Path:
    """Write the ``kv-long`` random checkpoint to ``path`` unless it is there."""
    if not (path / "config.json").is_file():
        from flashtier.runtime.make_model import PRESETS, MakeModelSpec, hf_config, make_model

        make_model(path, MakeModelSpec(hf_config(PRESETS["kv-long"])))
    return path


class ProjectionPrefill:
    """K/V of a random token sequence by projection only (see the module docstring)."""

    def __init__(self, model: Transformer, seed: int = 0) -> None:
        self.model = model
        c, w = model.config, model.weights
        vocab = torch.arange(c.vocab_size)
        emb = w.embed(vocab)  # [V, H]
        self.tables = []  # per layer (k [V, Hkv*D], v [V, Hkv*D])
        with torch.inference_mode():
            for names in model.names:
                x = rms_norm(emb, w.get(names.input_norm), c.rms_norm_eps)
                self.tables.append((torch.nn.functional.linear(x, w.get(names.k)),
                                    torch.nn.functional.linear(x, w.get(names.v))))
        self.generator = torch.Generator().manual_seed(seed)

    def fill(self, cache: Any, length: int) -> None:
        """Write ``length`` positions of K/V into every layer of ``cache`` (``cache.write``)."""
        c, m = self.model.config, self.model
        tokens = torch.randint(0, c.vocab_size, (length,), generator=self.generator)
        with torch.inference_mode():
            for start in range(0, length, FILL_CHUNK):
                tok = tokens[start : start + FILL_CHUNK]
                pos = torch.arange(start, start + tok.shape[0])
                freqs = pos[:, None].float() * m.inv_freq[None, :]
                emb = torch.cat((freqs, freqs), dim=-1)
                cos, sin = emb.cos().to(m.dtype), emb.sin().to(m.dtype)
                for layer, (tk, tv) in enumerate(self.tables):
                    k = tk[tok].view(-1, c.num_kv_heads, c.head_dim).transpose(0, 1)  # [Hkv, T, D]
                    v = tv[tok].view(-1, c.num_kv_heads, c.head_dim).transpose(0, 1)
                    cache.write(layer, apply_rope(k, cos, sin), v, start)


def time_decode(model: Transformer, cache: Any, start: int, steps: int, seed: int) -> list[float]:
    """Wall seconds of ``steps`` one-token forward passes after ``start`` cached positions."""
    g = torch.Generator().manual_seed(seed)
    times = []
    with torch.inference_mode():
        for i in range(steps):
            tok = torch.randint(0, model.config.vocab_size, (1,), generator=g)
            t0 = time.perf_counter()
            model.forward(tok, cache, start + i)
            times.append(time.perf_counter() - t0)
    return times


def run_context(model: Transformer, fill: ProjectionPrefill, length: int, args: argparse.Namespace,
                config: RetrievalCacheConfig, full: bool) -> dict[str, Any]:
    c = model.config
    row: dict[str, Any] = {"context": length}
    if full:
        cache = BlockKVCache(c.num_layers, c.num_kv_heads, c.head_dim, model.dtype)
        cache.reserve(length + args.steps + 1)
        fill.fill(cache, length)
        times = time_decode(model, cache, length, args.steps, args.seed)
        row["full_step_ms"] = round(1e3 * statistics.median(times[args.warmup:]), 2)
        row["full_step_ms_min"] = round(1e3 * min(times[args.warmup:]), 2)
        row["full_kv_bytes"] = cache.nbytes()
        del cache
        gc.collect()
    layout = KVBlockLayout(c.num_layers, c.num_kv_heads, c.head_dim, config.block_size, model.dtype)
    cache = RetrievalKVCache(layout, config)
    cache.reserve(length + args.steps + 1)
    t0 = time.perf_counter()
    fill.fill(cache, length)
    row["fill_s"] = round(time.perf_counter() - t0, 2)
    tiers_before = cache.kv_bytes_per_tier()
    times = time_decode(model, cache, length, args.steps, args.seed)
    stats = cache.stats()
    row.update({
        "retrieval_step_ms": round(1e3 * statistics.median(times[args.warmup:]), 2),
        "retrieval_step_ms_p25": round(1e3 * statistics.quantiles(times[args.warmup:], n=4)[0], 2),
        "retrieval_step_ms_min": round(1e3 * min(times[args.warmup:]), 2),
        "attention_ms_per_step": stats["attention_decode_ms_per_step"],
        "search_ms_per_step": stats["attention_search_ms_per_step"],
        "gather_ms_per_step": stats["attention_gather_ms_per_step"],
        "attend_ms_per_step": stats["attention_attend_ms_per_step"],
        "keys_scanned_fraction": stats["attention_keys_scanned_fraction"],
        "keys_retrieved_per_search": stats["attention_keys_retrieved_per_search"],
        "index_build_s": stats["index_build_s"],
        "kv_bytes_per_tier": cache.kv_bytes_per_tier(),
        "kv_bytes_per_tier_before_decode": tiers_before,
        "kv_index_bytes": stats["kv_index_bytes"],
    })
    cache.close()
    del cache
    gc.collect()
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("bench_out/kv-long"), help="kv-long checkpoint (written if missing)")
    p.add_argument("--contexts", default="4096,16384,32768,65536,131072")
    p.add_argument("--full-at", default="4096,131072", help="contexts where full attention is measured too")
    p.add_argument("--steps", type=int, default=40, help="decode steps timed per context")
    p.add_argument("--warmup", type=int, default=4, help="first steps left out of the statistics")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--compute-dtype", default=None, help="float32 / bfloat16 (default: the checkpoint's, bf16)")
    p.add_argument("--options", default=None,
                   help="JSON dict of retrieval options (EngineConfig.extra keys, e.g. "
                        '\'{"window": 256, "top_k_keys": 100, "scan_budget": 0.02, "estimate_rest": false}\'); '
                        "default: the cache's defaults")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    extra: dict[str, Any] = json.loads(args.options) if args.options else {}
    options = {"compute_dtype": args.compute_dtype} if args.compute_dtype else {}
    llm = open_model(ensure_model(args.model), **options)
    config = RetrievalCacheConfig.from_engine(llm.engine_config.kv_block_size, llm.engine_config.prefill_chunk, extra)
    fill = ProjectionPrefill(llm.transformer, args.seed)
    full_at = {int(x) for x in args.full_at.split(",") if x}
    rows = []
    for length in (int(x) for x in args.contexts.split(",")):
        row = run_context(llm.transformer, fill, length, args, config, length in full_at)
        print(json.dumps(row), flush=True)
        rows.append(row)
    base, base_min = rows[0]["retrieval_step_ms"], rows[0]["retrieval_step_ms_min"]
    result = {
        "model": str(args.model), "threads": torch.get_num_threads(), "dtype": str(llm.transformer.dtype),
        "retrieval": {"sink_tokens": config.retrieval.sink_tokens, "window": config.retrieval.window,
                      "top_k": config.retrieval.top_k, "index": config.retrieval.index,
                      "scan_budget": config.retrieval.scan_budget_fraction,
                      "group_search": config.retrieval.group_search.value,
                      "estimate_rest": config.retrieval.estimate_rest,
                      "index_options": dict(config.retrieval.index_options)},
        "options": extra,
        "rows": rows,
        "retrieval_step_ratio_vs_first": {r["context"]: round(r["retrieval_step_ms"] / base, 3) for r in rows},
        "retrieval_step_ratio_vs_first_min": {r["context"]: round(r["retrieval_step_ms_min"] / base_min, 3) for r in rows},
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
