"""Key indexes for retrieval attention: recall and attention mass against keys scanned, build time.

Compares ``flat`` (exact), ``ivf`` (faiss, plain ANN) and ``cluster`` (attention-aware) on keys and
queries from different distributions: synthetic by default (see ``flashtier.retrieval.synthetic``),
or real vectors from ``.npy`` files:

    python -m flashtier.benchmarks.bench_retrieval_index                       # synthetic, 16K keys
    python -m flashtier.benchmarks.bench_retrieval_index --keys k.npy --queries q.npy --json out.json

``--keys``: ``[T, D]`` or ``[H, T, D]`` (H kv heads, each indexed separately); ``--queries``:
``[Q, D]``, ``[Q, G, D]`` or ``[H, Q, G, D]`` (G query heads sharing each kv head). Keys are indexed
as they would leave the resident window: all but the last ``--decode-tokens`` in one add (end of
prefill), then blocks of ``--block``. Build time is the time spent in those adds.

Per index, budget and group mode (``union``: one search with the group's G queries, attend the
union of their top-k; ``mean``: one search with the mean query, attend its top-k; ``rows``, the
runtime's default: one search with the group's G queries, each query head attends its own top-k) it reports
recall@k (exact top-k found, per query head), attention-mass recall (mass on attended keys / mass
on as many best keys), mass covered (share of all exact mass), attended keys, scanned fraction,
search time per group and build time per head. ``--policies`` adds a comparison of selection
policies (streaming, h2o, retrieval) at an equal token budget.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass

import faiss
import numpy as np
import torch

from flashtier.retrieval import (
    ShiftedKQConfig,
    exact_attention_probs,
    make_index,
    make_policy,
    make_shifted_kq,
)


@dataclass
class Row:
    """One measured configuration, averaged over heads and query groups."""

    index: str
    options: str
    group: str
    recall_at_k: float
    mass_recall: float
    mass_covered: float
    attended: float
    scanned_fraction: float
    search_ms: float
    build_s_per_head: float
    build_s_per_16k: float


def load_heads(args: argparse.Namespace) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys [T, D], queries [Q, G, D]) per kv head."""
    if args.keys is None:
        cfg = ShiftedKQConfig(n_keys=args.n_keys, dim=args.dim, group=args.group, n_queries=args.n_queries)
        heads = []
        for h in range(args.heads):
            keys, queries = make_shifted_kq(ShiftedKQConfig(**{**asdict(cfg), "seed": args.seed + h}))
            heads.append((keys, queries))
        return heads
    keys = torch.from_numpy(np.load(args.keys)).float()
    queries = torch.from_numpy(np.load(args.queries)).float()
    if keys.dim() == 2:
        keys = keys.unsqueeze(0)
    if queries.dim() == 2:
        queries = queries.unsqueeze(1)  # [Q, 1, D]
    if queries.dim() == 3:
        queries = queries.unsqueeze(0).expand(keys.shape[0], -1, -1, -1)
    if keys.dim() != 3 or queries.dim() != 4 or queries.shape[0] != keys.shape[0] or queries.shape[-1] != keys.shape[-1]:
        raise SystemExit(f"keys {tuple(keys.shape)} and queries {tuple(queries.shape)} do not match the documented shapes")
    return [(keys[h].contiguous(), queries[h, : args.n_queries].contiguous()) for h in range(keys.shape[0])]


def index_settings(n_keys: int, budgets: list[float],
                   cluster_variants: list[dict] | None = None) -> list[tuple[str, dict[str, float | int]]]:
    """(index name, options) to measure: flat once, ivf and cluster at each budget (plus each of
    ``cluster_variants``, extra cluster options, at each budget)."""
    settings: list[tuple[str, dict[str, float | int]]] = [("flat", {})]
    fine_nlist = max(16, n_keys // 16)
    for b in budgets:
        for nlist in (128, fine_nlist):
            settings.append(("ivf", {"nlist": nlist, "nprobe": max(1, math.ceil(b * nlist))}))
        settings.append(("cluster", {"scan_budget_fraction": b}))
        for extra in cluster_variants or []:
            settings.append(("cluster", {"scan_budget_fraction": b, **extra}))
    return settings


def measure(name: str, options: dict[str, float | int], heads: list[tuple[torch.Tensor, torch.Tensor]],
            k: int, block: int, decode_tokens: int, scale: float) -> list[Row]:
    per_group: dict[str, list[list[float]]] = {"union": [], "mean": [], "rows": []}
    builds = []
    for keys, queries in heads:
        n, _ = keys.shape
        index = make_index(name, keys.shape[1], **options)
        prefill = max(0, n - decode_tokens)
        index.add(keys[:prefill], torch.arange(prefill))  # offloaded at the end of prefill
        for start in range(prefill, n, block):  # then block by block as decode pushes them out
            index.add(keys[start : start + block], torch.arange(start, min(n, start + block)))
        builds.append(index.build_time_s)
        for q in queries:  # [G, D]
            probs = exact_attention_probs(q, keys, scale)  # [G, T]
            exact_top = torch.topk(probs, k, dim=1).indices  # [G, k]
            sorted_probs = torch.sort(probs, dim=1, descending=True).values
            for mode, rows in (("union", q), ("mean", q.mean(dim=0, keepdim=True))):
                t0 = time.perf_counter()
                found = index.search(rows, k)
                search_ms = (time.perf_counter() - t0) * 1e3
                attended = torch.unique(found.positions)  # [m]
                per_row = found.positions.expand(q.shape[0], -1)
                recall = np.mean([np.isin(e.numpy(), f.numpy()).mean() for f, e in zip(per_row, exact_top)])
                covered = probs[:, attended].sum(dim=1)  # [G]
                best = sorted_probs[:, : attended.numel()].sum(dim=1)
                per_group[mode].append([recall, float((covered / best).mean()), float(covered.mean()),
                                        attended.numel(), found.keys_scanned / n, search_ms])
            # rows (the runtime's default): one search of the group, each query head its own top-k
            t0 = time.perf_counter()
            found = index.search(q, k)
            search_ms = (time.perf_counter() - t0) * 1e3
            rows_found = found.positions if found.positions.shape[0] == q.shape[0] else found.positions.expand(q.shape[0], -1)
            recall = np.mean([np.isin(e.numpy(), f.numpy()).mean() for f, e in zip(rows_found, exact_top)])
            covered = torch.stack([probs[r, f].sum() for r, f in enumerate(rows_found)])  # [G]
            best = sorted_probs[:, : rows_found.shape[1]].sum(dim=1)
            per_group["rows"].append([recall, float((covered / best).mean()), float(covered.mean()),
                                      rows_found.shape[1], found.keys_scanned / n, search_ms])
    n_keys = heads[0][0].shape[0]
    build = float(np.mean(builds))
    opts = ",".join(f"{a}={b}" for a, b in options.items())
    return [Row(name, opts, mode, *np.mean(vals, axis=0).tolist(), build, build * 16384 / n_keys)
            for mode, vals in per_group.items()]


def compare_policies(keys: torch.Tensor, queries: torch.Tensor, budget: int, scale: float, block: int) -> list[dict[str, float | str]]:
    """Stream the keys in blocks (one query attends after each block, so H2O accumulates), then
    measure the mass each policy's selection covers for every query, at ``budget`` tokens."""
    half = budget // 2
    policies = {
        "streaming": make_policy("streaming", keys.shape[1], sink_tokens=4, window=budget - 4),
        "h2o": make_policy("h2o", keys.shape[1], heavy=half, recent=budget - half),
        "retrieval": make_policy("retrieval", keys.shape[1], sink_tokens=4, window=half - 4,
                                 top_k=budget - half, group_search="mean"),  # exactly `budget` attended
    }
    out = []
    for name, policy in policies.items():
        for i, start in enumerate(range(0, keys.shape[0], block)):
            policy.append(keys[start : start + block])
            q = queries[i % queries.shape[0]]
            sel = policy.select(q)
            policy.observe(sel, torch.softmax(q @ keys[sel].T * scale, dim=-1))
        covered, sizes = [], []
        for q in queries:
            sel = policy.select(q)
            covered.append(float(exact_attention_probs(q, keys[: policy.length], scale)[:, sel].sum(dim=1).mean()))
            sizes.append(sel.numel())
        out.append({"policy": name, "mass_covered": float(np.mean(covered)), "attended": float(np.mean(sizes))})
    return out


def measure_build(n_keys: int, dim: int, n_heads: int, budget: float) -> list[dict[str, float | str]]:
    """Seconds to index ``n_keys`` keys (one add, as after prefill) for ``n_heads`` (layer, kv head)
    pairs, per index kind."""
    keys = [make_shifted_kq(ShiftedKQConfig(n_keys=n_keys, dim=dim, n_queries=1, seed=100 + h))[0] for h in range(n_heads)]
    out = []
    for name, options in (("flat", {}), ("ivf", {"nlist": 128}), ("ivf", {"nlist": max(16, n_keys // 16)}),
                          ("cluster", {"scan_budget_fraction": budget})):
        start = time.perf_counter()
        for k in keys:
            make_index(name, dim, **options).add(k, torch.arange(n_keys))
        total = time.perf_counter() - start
        out.append({"index": name, "options": str(options), "heads": n_heads, "total_s": total, "per_head_s": total / n_heads})
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--keys", help=".npy keys [T, D] or [H, T, D]")
    p.add_argument("--queries", help=".npy queries [Q, D], [Q, G, D] or [H, Q, G, D]")
    p.add_argument("--n-keys", type=int, default=16384, help="synthetic keys per head")
    p.add_argument("--dim", type=int, default=64, help="synthetic head dimension")
    p.add_argument("--group", type=int, default=4, help="synthetic query heads per kv head")
    p.add_argument("--heads", type=int, default=2, help="synthetic kv heads (different seeds)")
    p.add_argument("--n-queries", type=int, default=32, help="query groups per head")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", type=int, default=100, help="top-k per query")
    p.add_argument("--budgets", default="0.01,0.02,0.05", help="scan budget fractions")
    p.add_argument("--block", type=int, default=64, help="keys per add during decode (KV block size)")
    p.add_argument("--decode-tokens", type=int, default=1024,
                   help="last keys added block by block; the others in one add, as after prefill")
    p.add_argument("--scale", type=float, default=None, help="softmax scale (default 1/sqrt(D))")
    p.add_argument("--threads", type=int, default=1, help="torch and faiss threads")
    p.add_argument("--policies", type=int, default=0, help="also compare selection policies at this token budget")
    p.add_argument("--cluster-variants", default=None,
                   help='JSON list of extra cluster options to measure too, e.g. \'[{"cluster_size": 4, "bound_weight": 0.3}]\'')
    p.add_argument("--only-variants", action="store_true",
                   help="measure only flat, --cluster-variants and --ivf-variants (not the budget grid)")
    p.add_argument("--ivf-variants", default=None,
                   help='JSON list of ivf options to measure too, e.g. \'[{"nlist": 1024, "nprobe": 16}]\'')
    p.add_argument("--build-heads", type=int, default=0,
                   help="also time indexing --n-keys keys for this many (layer, kv head) pairs")
    p.add_argument("--build-only", action="store_true", help="only the --build-heads timing")
    p.add_argument("--json", help="write the rows as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)

    builds = []
    if args.build_heads:
        builds = measure_build(args.n_keys, args.dim, args.build_heads, float(args.budgets.split(",")[0]))
        for b in builds:
            print(f"build {b['index']:8} {b['options']:28} {b['heads']} x {args.n_keys} keys, D={args.dim}: "
                  f"{b['total_s']:.2f} s total, {b['per_head_s'] * 1e3:.1f} ms per head")
    if args.build_only:
        return
    heads = load_heads(args)
    n_keys, dim = heads[0][0].shape
    scale = args.scale if args.scale is not None else 1 / math.sqrt(dim)
    budgets = [float(b) for b in args.budgets.split(",")]
    print(f"{len(heads)} head(s), {n_keys} keys, D={dim}, G={heads[0][1].shape[1]}, "
          f"{heads[0][1].shape[0]} query groups per head, k={args.k}, threads={args.threads}")
    rows: list[Row] = []
    variants = json.loads(args.cluster_variants) if args.cluster_variants else None
    settings = index_settings(n_keys, budgets, variants)
    if args.only_variants:
        settings = [("flat", {})] + [("cluster", {"scan_budget_fraction": b, **v}) for b in budgets for v in variants or []]
    settings += [("ivf", dict(v)) for v in (json.loads(args.ivf_variants) if args.ivf_variants else [])]
    for name, options in settings:
        rows.extend(measure(name, options, heads, args.k, args.block, args.decode_tokens, scale))
    header = f"{'index':8} {'options':38} {'group':5} {'rec@k':>6} {'massrec':>7} {'covered':>7} {'attend':>6} {'scanned':>7} {'ms':>6} {'build/16K':>9}"
    print(header)
    for r in rows:
        print(f"{r.index:8} {r.options:38} {r.group:5} {r.recall_at_k:6.3f} {r.mass_recall:7.3f} {r.mass_covered:7.3f} "
              f"{r.attended:6.0f} {r.scanned_fraction:7.4f} {r.search_ms:6.2f} {r.build_s_per_16k:9.3f}")
    policies = []
    if args.policies:
        keys, queries = heads[0]
        policies = compare_policies(keys, queries, args.policies, scale, args.block)
        for row in policies:
            print(f"policy {row['policy']:10} budget {args.policies}: mass covered {row['mass_covered']:.3f}, "
                  f"attended {row['attended']:.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": [asdict(r) for r in rows], "policies": policies, "builds": builds},
                      f, indent=1)


if __name__ == "__main__":
    main()
