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
real model forward (all layers, real queries) for ``--steps`` tokens.

Paired timing (the machine is shared, and its load swings by 2x within a minute): a retrieval
cache at the reference context (4K) stays alive, and every measured decode step is followed by one
step of the reference. ``retrieval_vs_4k`` is the median of the step-by-step ratios, so load swings
hit both sides alike; medians, first quartiles and minima are reported too.

Per context length: step time with full attention (the block KV cache, exact) and with retrieval
attention; for retrieval also the device / host / storage KV bytes, keys scanned and index build
time. The target: retrieval step time at 128K at most 2x the step time at 4K.
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

from flashtier.benchmarks.common import finish
from flashtier.runtime.engine import open_model
from flashtier.runtime.kv.cache import BlockKVCache
from flashtier.runtime.kv.layout import KVBlockLayout
from flashtier.runtime.kv.retrieval import RetrievalKVCache
from flashtier.runtime.kv.retrieval_config import RetrievalCacheConfig
from flashtier.runtime.model import Transformer, apply_rope, rms_norm

FILL_CHUNK = 8192


def ensure_model(path: Path) -> Path:
    """Write the ``kv-long`` random checkpoint to ``path`` unless it is there."""
    if not (path / "config.json").is_file():
        from flashtier.checkpoint.make_model import PRESETS, MakeModelSpec, hf_config, write_model

        write_model(path, MakeModelSpec(hf_config(PRESETS["kv-long"])))
    return path


class ProjectionPrefill:
    """K/V of a random token sequence by projection only (see the module docstring)."""

    def __init__(self, model: Transformer, seed: int = 0) -> None:
        self.model = model
        c, w = model.config, model.weights
        vocab = torch.arange(c.vocab_size, device=model.device)
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
                tok = tokens[start : start + FILL_CHUNK].to(m.device)
                pos = torch.arange(start, start + tok.shape[0], device=m.inv_freq.device)
                freqs = pos[:, None].float() * m.inv_freq[None, :]
                emb = torch.cat((freqs, freqs), dim=-1)
                cos, sin = emb.cos().to(m.dtype), emb.sin().to(m.dtype)
                for layer, (tk, tv) in enumerate(self.tables):
                    k = tk[tok].view(-1, c.num_kv_heads, c.head_dim).transpose(0, 1)  # [Hkv, T, D]
                    v = tv[tok].view(-1, c.num_kv_heads, c.head_dim).transpose(0, 1)
                    cache.write(layer, apply_rope(k, cos, sin), v, start)


class Decoder:
    """One cache being decoded one random token at a time (its own position and token stream)."""

    def __init__(self, model: Transformer, cache: Any, start: int, seed: int) -> None:
        self.model, self.cache, self.start, self.pos = model, cache, start, start
        self.generator = torch.Generator().manual_seed(seed)

    def step(self) -> float:
        """Wall seconds of one one-token forward pass, run as ``generate``'s decode steps run it:
        torch at one thread around the one-row kernels (which, and the cache's native search and
        attention, use the model's kernel threads)."""
        tok = torch.randint(0, self.model.config.vocab_size, (1,), generator=self.generator)
        saved = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.inference_mode():
                t0 = time.perf_counter()
                self.model.forward(tok, self.cache, self.pos)
                elapsed = time.perf_counter() - t0
        finally:
            torch.set_num_threads(saved)
        self.pos += 1
        return elapsed


def paired(measured: Decoder, reference: Decoder, steps: int, warmup: int) -> tuple[list[float], list[float]]:
    """Alternate steps of ``measured`` and ``reference`` so both see the same machine load; the
    step times after ``warmup`` steps of each."""
    a, b = [], []
    for i in range(warmup + steps):
        ta = measured.step()
        tb = reference.step() if reference is not measured else ta
        if i >= warmup:
            a.append(ta)
            b.append(tb)
    return a, b


def summary(times: list[float], prefix: str) -> dict[str, float]:
    ms = [1e3 * t for t in times]
    return {f"{prefix}_ms": round(statistics.median(ms), 2), f"{prefix}_ms_p25": round(statistics.quantiles(ms, n=4)[0], 2),
            f"{prefix}_ms_min": round(min(ms), 2)}


def ratio(a: list[float], b: list[float]) -> float:
    """Median of the step-by-step ratios ``a[i] / b[i]`` (paired, so load swings cancel)."""
    return round(statistics.median(x / y for x, y in zip(a, b)), 3)


def retrieval_cache(model: Transformer, fill: ProjectionPrefill, length: int, reserve: int,
                    config: RetrievalCacheConfig) -> tuple[RetrievalKVCache, float]:
    c = model.config
    cache = RetrievalKVCache(KVBlockLayout(c.num_layers, c.num_kv_heads, c.head_dim, config.block_size, model.dtype), config,
                             device=model.device, threads=model.linear.kernel_threads)
    cache.reserve(reserve)
    t0 = time.perf_counter()
    fill.fill(cache, length)
    return cache, time.perf_counter() - t0


def run_context(model: Transformer, fill: ProjectionPrefill, length: int, args: argparse.Namespace,
                config: RetrievalCacheConfig, full: bool, reference: Decoder) -> dict[str, Any]:
    """One row: the retrieval cache at ``length`` (and full attention if asked), each decoded in
    alternation with the 4K retrieval ``reference``."""
    c = model.config
    row: dict[str, Any] = {"context": length}
    if full:
        cache = BlockKVCache(c.num_layers, c.num_kv_heads, c.head_dim, model.dtype, device=model.device,
                             threads=model.linear.kernel_threads)  # as the model's own cache
        cache.reserve(length + args.full_steps + args.warmup + 1)
        fill.fill(cache, length)
        t_full, t_ref = paired(Decoder(model, cache, length, args.seed), reference, args.full_steps, args.warmup)
        row.update(summary(t_full, "full_step"))
        row["full_vs_reference"] = ratio(t_full, t_ref)
        row["full_kv_bytes"] = cache.nbytes()
        del cache
        gc.collect()
    if length == reference.start:
        cache, decoder = reference.cache, reference
    else:
        cache, fill_s = retrieval_cache(model, fill, length, length + args.steps + args.warmup + 1, config)
        row["fill_s"] = round(fill_s, 2)
        decoder = Decoder(model, cache, length, args.seed)
    tiers_before = cache.kv_bytes_per_tier()
    stats_before = cache.stats()
    t_ret, t_ref = paired(decoder, reference, args.steps, args.warmup)
    stats = cache.stats()
    row.update(summary(t_ret, "retrieval_step"))
    row.update(summary(t_ref, "reference_4k_step"))
    row["retrieval_vs_4k"] = ratio(t_ret, t_ref)
    row.update({
        "attention_ms_per_step": stats["attention_decode_ms_per_step"],
        "search_ms_per_step": stats["attention_search_ms_per_step"],
        "gather_ms_per_step": stats["attention_gather_ms_per_step"],
        "attend_ms_per_step": stats["attention_attend_ms_per_step"],
        "keys_scanned_fraction": stats["attention_keys_scanned_fraction"],
        "keys_retrieved_per_search": stats["attention_keys_retrieved_per_search"],
        "index_build_s": stats_before["index_build_s"],
        "kv_bytes_per_tier": cache.kv_bytes_per_tier(),
        "kv_bytes_per_tier_before_decode": tiers_before,
        "kv_index_bytes": stats["kv_index_bytes"],
    })
    if cache is not reference.cache:
        cache.close()
        del cache, decoder
        gc.collect()
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("bench_out/kv-long"), help="kv-long checkpoint (written if missing)")
    p.add_argument("--contexts", default="4096,16384,32768,65536,131072")
    p.add_argument("--full-at", default="4096,131072", help="contexts where full attention is measured too")
    p.add_argument("--steps", type=int, default=40, help="retrieval decode steps timed per context")
    p.add_argument("--full-steps", type=int, default=10, help="full-attention decode steps timed (2 s each at 128K)")
    p.add_argument("--warmup", type=int, default=4, help="first steps left out of the statistics")
    p.add_argument("--reference", type=int, default=4096,
                   help="context of the reference retrieval cache whose steps alternate with every measurement")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--compute-dtype", default=None, help="float32 / bfloat16 (default: the checkpoint's, bf16)")
    p.add_argument("--options", default=None,
                   help="JSON dict of retrieval options (EngineConfig.extra keys, e.g. "
                        '\'{"window": 256, "top_k_keys": 100, "scan_budget": 0.02, "estimate_rest": false}\'); '
                        "default: the cache's defaults")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu",
                   help="where the model computes: cpu, or cuda (retrieval: sinks + window on the GPU, the search "
                        "and the far keys on the host; full attention: the whole KV on the GPU)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    extra: dict[str, Any] = json.loads(args.options) if args.options else {}
    options = {"compute_dtype": args.compute_dtype} if args.compute_dtype else {}
    if args.device != "cpu":
        options["device"] = args.device
    llm = open_model(ensure_model(args.model), **options)
    config = RetrievalCacheConfig.from_engine(llm.engine_config.kv_block_size, llm.engine_config.prefill_chunk, extra)
    fill = ProjectionPrefill(llm.transformer, args.seed)
    full_at = {int(x) for x in args.full_at.split(",") if x}
    contexts = [int(x) for x in args.contexts.split(",")]
    ref_cache, _ = retrieval_cache(llm.transformer, fill, args.reference, args.reference + 8192, config)
    reference = Decoder(llm.transformer, ref_cache, args.reference, args.seed + 1)
    rows = []
    for length in contexts:
        row = run_context(llm.transformer, fill, length, args, config, length in full_at, reference)
        print(json.dumps(row), flush=True)
        rows.append(row)
    result = {
        "model": str(args.model), "threads": torch.get_num_threads(), "dtype": str(llm.transformer.dtype),
        "device": str(llm.transformer.device),
        "reference_context": args.reference, "steps": args.steps, "full_steps": args.full_steps,
        "retrieval": {"sink_tokens": config.retrieval.sink_tokens, "window": config.retrieval.window,
                      "top_k": config.retrieval.top_k, "index": config.retrieval.index,
                      "scan_budget": config.retrieval.scan_budget_fraction,
                      "group_search": config.retrieval.group_search.value,
                      "estimate_rest": config.retrieval.estimate_rest,
                      "index_options": dict(config.retrieval.index_options)},
        "options": extra,
        "rows": rows,
        "retrieval_vs_4k": {r["context"]: r["retrieval_vs_4k"] for r in rows},
    }
    return finish(result, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
