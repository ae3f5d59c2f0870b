"""Long-context quality: retrieval attention against full attention at 16K context.

    python -m flashtier.benchmarks.bench_long_context_quality --json bench_out/long_context_quality.json \
        --dump-kq bench_out/tinymoe16k_kq

The model defaults to ``models/tiny-moe-16k`` (tiny-moe fine-tuned on 16K-token windows;
``models/README.md``): tiny-moe itself was trained on 256-token windows and its attention at 16K is
spread over thousands of keys, so agreement with *its* full attention says little.

Text: the held-out stdlib modules (``HELDOUT`` in ``benchmarks/train_tiny.py``), each prefixed with
``<|endoftext|>`` as in training, concatenated and tokenized; the first ``--context`` tokens are
the prompt, the next ``--steps`` tokens drive the decode steps.

Method (one run):

1. Full attention: exact prefill of the prompt into the block KV cache, then ``--steps`` decode
   steps *teacher-forced* with the true next tokens of the text (so every step sees the same
   context in both runs and one disagreement does not derail the rest). Its argmax at each step
   is the reference. Queries of every decode step and the final keys are recorded for the index
   comparison (``--dump-kq``).
2. Retrieval attention, default config: the same prompt through the retrieval cache's own exact
   chunked prefill (timed, next to the time spent building the indexes), then the same decode
   steps with ``check_attention`` every step: attention-mass recall / covered against exact
   attention, keys scanned, and top-1 agreement with the reference.
3. Variants (index kind, scan budget): the KV of the prompt is copied from the full cache into a
   fresh retrieval cache (``cache.write``: demotion and indexing as after a prefill; the KV equals
   the exact prefill's up to rounding), then the same decode steps.

Targets: attention-mass recall >= 0.90 while scanning <= 5% of the keys, top-1 agreement >= 95%.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flashtier.runtime.engine import EngineConfig, Model
from flashtier.runtime.kv.cache import BlockKVCache
from flashtier.runtime.kv.layout import KVBlockLayout
from flashtier.runtime.kv.retrieval import RetrievalKVCache
from flashtier.runtime.kv.retrieval_config import RetrievalCacheConfig
from flashtier.runtime.model import Transformer


def heldout_tokens(model: Model, n: int) -> list[int]:
    """The first ``n`` tokens of the concatenated held-out modules."""
    from flashtier.benchmarks.train_tiny import corpus_files

    tokenizer = model._need_tokenizer()
    ids: list[int] = []
    for path in corpus_files("eval"):
        ids += tokenizer.encode("<|endoftext|>" + Path(path).read_text(encoding="utf-8"))
        if len(ids) >= n:
            return ids[:n]
    raise SystemExit(f"the held-out text has only {len(ids)} tokens, {n} asked")


class RecordingCache:
    """A full-attention cache that records the queries of one-token passes, per layer."""

    def __init__(self, inner: BlockKVCache) -> None:
        self.inner = inner
        self.queries: dict[int, list[torch.Tensor]] = {}

    @property
    def length(self) -> int:
        return self.inner.length

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        if q.shape[1] == 1:
            self.queries.setdefault(layer, []).append(q[:, 0].float().clone())  # [H_q, D]
        return self.inner.attend(layer, q, k, v, start)

    def reserve(self, n: int) -> None:
        self.inner.reserve(n)

    def truncate(self, n: int) -> None:
        self.inner.truncate(n)

    def nbytes(self) -> int:
        return self.inner.nbytes()


def prefill(model: Transformer, cache: Any, prompt: torch.Tensor, chunk: int) -> tuple[torch.Tensor, float]:
    """Exact chunked prefill; returns the last logits ``[V]`` and the seconds it took."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, prompt.shape[0], chunk):
            logits = model.forward(prompt[s : s + chunk], cache, s)
    return logits[-1], time.perf_counter() - t0


def decode(model: Transformer, cache: Any, feed: torch.Tensor, start: int) -> tuple[torch.Tensor, list[float]]:
    """Teacher-forced one-token passes of ``feed [S]`` from ``start``: argmax per step ``[S]``, step seconds."""
    tops, times = [], []
    with torch.inference_mode():
        for i, tok in enumerate(feed.tolist()):
            t0 = time.perf_counter()
            logits = model.forward(torch.tensor([tok]), cache, start + i)
            times.append(time.perf_counter() - t0)
            tops.append(int(logits[-1].argmax()))
    return torch.tensor(tops), times


def cache_config(args: argparse.Namespace, **extra: Any) -> RetrievalCacheConfig:
    options = {"sink_tokens": args.sink_tokens, "window": args.window, "top_k_keys": args.top_k_keys,
               "check_attention": 1, **extra}
    return RetrievalCacheConfig.from_engine(args.block_size, args.prefill_chunk, options)


def measure(model: Transformer, cache: RetrievalKVCache, feed: torch.Tensor, start: int,
            reference: torch.Tensor, name: str, extra: dict[str, Any]) -> dict[str, Any]:
    tops, times = decode(model, cache, feed, start)
    s = cache.stats()
    agree = (tops == reference).double()
    row = {
        "config": name, **extra,
        "top1_agreement": round(float(agree.mean()), 4),
        "attention_mass_recall": s["attention_mass_recall"],
        "attention_mass_recall_min": s["attention_mass_recall_min"],
        "attention_mass_recall_offloaded": s["attention_mass_recall_offloaded"],
        "attention_mass_covered": s["attention_mass_covered"],
        "keys_scanned_fraction": s["attention_keys_scanned_fraction"],
        "keys_retrieved_per_search": s["attention_keys_retrieved_per_search"],
        "index_build_s": s["index_build_s"],
        "decode_step_ms_median": round(1e3 * float(np.median(times)), 2),
        "attention_ms_per_step": s["attention_decode_ms_per_step"],
        "kv_bytes_per_tier": s["kv_bytes_per_tier"],
    }
    print(json.dumps(row), flush=True)
    return row


def run_default(args: argparse.Namespace, model: Transformer, layout: KVBlockLayout, prompt: torch.Tensor,
                feed: torch.Tensor, reference: torch.Tensor, last_full: torch.Tensor, result: dict[str, Any]) -> None:
    """The default config through its own exact chunked prefill (timed), then the decode steps."""
    main_extra = {"kv_index": args.default_index} if args.default_index else {}
    cfg = cache_config(args, **main_extra)
    cache = RetrievalKVCache(layout, cfg)
    cache.reserve(args.context + args.steps)
    last_ret, ret_prefill_s = prefill(model, cache, prompt, args.prefill_chunk)
    build_s = cache.index_build_s()
    row = measure(model, cache, feed, args.context, reference, "default",
                  {**describe(cfg), "prefill_s": round(ret_prefill_s, 2), "index_build_during_prefill_s": round(build_s, 2),
                   "prefill_first_token_agrees": bool(last_ret.argmax() == last_full.argmax()),
                   "prefill_logits_max_abs_diff": round(float((last_ret - last_full).abs().max()), 5)})
    result["default"] = row
    cache.close()



def parse_variants(text: str) -> list[tuple[str, dict[str, Any]]]:
    """``index:scan_budget[:top_k[:est]],...`` or a JSON list of extra-option dicts."""
    if text.strip().startswith("["):
        return [(json.dumps(o, sort_keys=True), o) for o in json.loads(text)]
    out = []
    for spec in (v for v in text.split(",") if v):
        index, budget, *rest = spec.split(":")
        options: dict[str, Any] = {"kv_index": index, "scan_budget": float(budget)}
        if rest:
            options["top_k_keys"] = int(rest[0])
        if len(rest) > 1:
            options["estimate_rest"] = rest[1] == "est"
        out.append((spec, options))
    return out


def describe(cfg: RetrievalCacheConfig) -> dict[str, Any]:
    r = cfg.retrieval
    return {"index": r.index, "scan_budget": r.scan_budget_fraction, "top_k": r.top_k, "window": r.window,
            "group_search": r.group_search.value, "estimate_rest": r.estimate_rest, "index_options": dict(r.index_options)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("models/tiny-moe-16k"))
    p.add_argument("--context", type=int, default=16128, help="prompt tokens (16128 + 256 steps = the model's 16384)")
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--prefill-chunk", type=int, default=512)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--sink-tokens", type=int, default=4)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--top-k-keys", type=int, default=100)
    p.add_argument("--variants", default="cluster:0.01,cluster:0.02,cluster:0.04,ivf:0.02,ivf:0.04",
                   help="index:scan_budget[:top_k[:est]] measured on copied KV (est: estimate_rest on)")
    p.add_argument("--default-index", default=None, help="index of the main run (default: the cache's default)")
    p.add_argument("--skip-default", action="store_true", help="only the variants (no retrieval prefill run)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--compute-dtype", default="float32",
                   help="dtype of both runs (float32: the bf16 weights upcast, so agreement measures the retrieval "
                        "approximation, not bf16 rounding differences between the two attention kernels; bfloat16: as stored)")
    p.add_argument("--dump-kq", type=Path, default=None, help="write keys.npy [L*H, T, D] / queries.npy [L*H, Q, G, D] here")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    llm = Model(args.model, EngineConfig(compute_dtype=args.compute_dtype))
    model, c = llm.transformer, llm.config
    tokens = torch.tensor(heldout_tokens(llm, args.context + args.steps))
    prompt, feed = tokens[: args.context], tokens[args.context :]
    result: dict[str, Any] = {"model": str(args.model), "context": args.context, "steps": args.steps,
                              "threads": args.threads, "teacher_forced": True, "compute_dtype": args.compute_dtype}

    # 1. full attention reference
    full = RecordingCache(model.new_cache(args.block_size))
    full.reserve(args.context + args.steps)
    last_full, full_prefill_s = prefill(model, full, prompt, args.prefill_chunk)
    reference, full_times = decode(model, full, feed, args.context)
    result["full"] = {"prefill_s": round(full_prefill_s, 2), "decode_step_ms_median": round(1e3 * float(np.median(full_times)), 2),
                      "kv_bytes": full.nbytes()}
    print(json.dumps(result["full"]), flush=True)
    if args.dump_kq:
        args.dump_kq.mkdir(parents=True, exist_ok=True)
        end = args.context + args.steps
        keys = torch.cat([full.inner.read(i, end)[0].float() for i in range(c.num_layers)])  # [L*H, T, D]
        g = c.num_heads // c.num_kv_heads
        queries = torch.cat([torch.stack(full.queries[i]).view(-1, c.num_kv_heads, g, c.head_dim).transpose(0, 1)
                             for i in range(c.num_layers)])  # [L*H, Q, G, D]
        values = torch.cat([full.inner.read(i, end)[1].float() for i in range(c.num_layers)])  # [L*H, T, D]
        np.save(args.dump_kq / "keys.npy", keys.numpy())
        np.save(args.dump_kq / "values.npy", values.numpy())
        np.save(args.dump_kq / "queries.npy", queries.numpy())

    # 2. retrieval, default config, its own exact prefill
    layout = KVBlockLayout(c.num_layers, c.num_kv_heads, c.head_dim, args.block_size, model.dtype)
    if not args.skip_default:
        run_default(args, model, layout, prompt, feed, reference, last_full, result)

    # 3. variants on copied KV
    end = args.context
    kv = [full.inner.read(i, end) for i in range(c.num_layers)]
    result["variants"] = []
    for name, options in parse_variants(args.variants):
        cfg = cache_config(args, **options)
        cache = RetrievalKVCache(layout, cfg)
        cache.reserve(args.context + args.steps)
        for i, (k, v) in enumerate(kv):
            cache.write(i, k, v, 0)
        result["variants"].append(measure(model, cache, feed, args.context, reference, name, describe(cfg)))
        cache.close()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
