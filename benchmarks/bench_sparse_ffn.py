"""Sparse FFN from flash on tiny-dense: bytes per token, speed and agreement against dense.

    python benchmarks/bench_sparse_ffn.py [--model models/tiny-dense] [--work /tmp/flashtier_sparse]
        [--windows 8] [--seq 256] [--out bench_out/sparse_ffn]

One run does everything, in this order, and writes ``OUT/results.json`` + ``OUT/results.md``:

1. Layouts: ``flashtier convert --bundle`` of the model into WORK/bundled (and the ``split``
   layout, three reads per neuron, into WORK/split for the ablation).
2. Predictors: ``calibrate`` on text of the *training* split of the stdlib corpus (never the
   held-out modules), unless WORK/bundled already has them (``--recalibrate`` forces it).
3. Budget: the smallest ``--dram-budget`` with which the planner keeps round(0.3 * layers) of
   the FFN layers resident (the rest, ~70% of the FFN bytes, streams).
4. Disk: O_DIRECT read bandwidth of a scratch file on the same disk (large reads: the limit)
   and of bundle-sized random reads at several queue depths (what the default is chosen from).
5. Held-out text: ``--windows`` windows of ``--seq`` tokens spread over the held-out modules;
   the dense in-memory model gives the reference next-token argmax and loss; every other row
   runs each window token by token (teacher forcing, fresh KV cache per window) through the
   engine's accessor, and reports storage bytes per decoded token (``bytes_read_storage`` of the
   accessor: O_DIRECT reads, alignment included), decode tokens/s, top-1 agreement with the
   dense model, held-out loss, and (audit) the predictor's recall.

Rows: dense streaming (PagedWeights) / + predictor (no window) / + windowing (split layout) /
+ bundling (the full system), then sweeps of the window length k and the predictor threshold.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_tiny import corpus_files, encode_files, read_text  # noqa: E402

from flashtier.prefetch.sparsity import PREDICTOR_FILE, PredictorTraining  # noqa: E402
from flashtier.runtime.calibrate import CalibrationText, calibrate  # noqa: E402
from flashtier.checkpoint.folder import Checkpoint, layer_names  # noqa: E402
from flashtier.runtime.model import Transformer  # noqa: E402
from flashtier.runtime.weights.paged import PagedWeights  # noqa: E402
from flashtier.runtime.planner import PlanRequest, make_plan  # noqa: E402
from flashtier.runtime.options import SparseFFNConfig  # noqa: E402
from flashtier.runtime.weights.sparse_ffn import SparseFFNWeights  # noqa: E402
from flashtier.runtime.tokenizer import Tokenizer  # noqa: E402
from flashtier.runtime.weights.base import InMemoryWeights  # noqa: E402
from flashtier.storage_backends.aligned import allocate_aligned  # noqa: E402
from flashtier.storage_backends.bench_io import measure_read, write_scratch_file  # noqa: E402
from flashtier.storage_backends.batched_reads import BatchedReadConfig, BatchedReader  # noqa: E402
from flashtier.checkpoint.bundles import BUNDLE_DIR, convert_bundled  # noqa: E402

MiB = 1 << 20


# ------------------------------------------------------------------------------------------ setup
def prepare(model: Path, work: Path, calib_tokens: int, rank: int, recall: float, recalibrate: bool) -> dict:
    """WORK/bundled and WORK/split for ``model`` with rank-``rank`` predictors (kept across runs)."""
    bundled, split = work / "bundled", work / "split"
    info: dict = {}
    t0 = time.perf_counter()
    if not (bundled / BUNDLE_DIR / "manifest.json").is_file():
        convert_bundled(model, bundled)
    if not (split / BUNDLE_DIR / "manifest.json").is_file():
        convert_bundled(model, split, layout="split")
    info["convert_s"] = round(time.perf_counter() - t0, 2)
    if recalibrate or not (bundled / PREDICTOR_FILE).is_file() or _calibrated_rank(bundled) != rank:
        files = corpus_files("train")
        random.Random(0).shuffle(files)
        text, n = [], 0
        for f in files:
            text.append("<|endoftext|>" + read_text(f))
            n += len(text[-1])
            if n > calib_tokens * 5:
                break
        ids = Tokenizer(bundled).encode("".join(text))
        t0 = time.perf_counter()
        calibrate(bundled, ids, PredictorTraining(rank=rank, target_recall=recall),
                  CalibrationText(max_tokens=calib_tokens), log=lambda s: print("  calibrate:", s, file=sys.stderr))
        info["calibrate_s"] = round(time.perf_counter() - t0, 1)
    (split / PREDICTOR_FILE).write_bytes((bundled / PREDICTOR_FILE).read_bytes())
    return info


def _calibrated_rank(model_dir: Path) -> int | None:
    from flashtier.prefetch.sparsity import PredictorSet
    from flashtier.checkpoint.bundles import model_fingerprint

    try:
        return PredictorSet.load(model_dir, model_fingerprint(Checkpoint(model_dir))).training.rank
    except Exception:
        return None


def ffn_budget(ckpt: Checkpoint, max_context: int, fraction: float) -> tuple[int, list[int]]:
    """Smallest budget whose plan keeps round(fraction * layers) FFN layers resident."""
    cfg = ckpt.config
    sizes = {n: t.nbytes for n, t in ckpt.tensors.items()}
    want = round(fraction * cfg.num_layers)

    def resident_layers(budget: int) -> list[int]:
        plan = make_plan(cfg, sizes, PlanRequest(dram_budget=budget, context=max_context,
                                                 kv_dtype_bytes=2, weight_dtype_bytes=2,
                                                 streamed_unit="layer"))  # as the sparse FFN plans
        return [i for i in range(cfg.num_layers) if plan.placement[layer_names(cfg, i).gate] != "storage"]

    lo, hi = 1 << 20, sum(sizes.values()) * 2
    while hi - lo > 4096:
        mid = (lo + hi) // 2
        try:
            ok = len(resident_layers(mid)) >= want
        except Exception:
            ok = False
        lo, hi = (lo, mid) if ok else (mid, hi)
    return hi, resident_layers(hi)


def eval_tokens(model_dir: Path, windows: int, seq: int) -> list[list[int]]:
    """``windows`` windows of ``seq + 1`` tokens evenly spread over the held-out modules."""
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids = encode_files(tok, corpus_files("eval")).astype(np.int64)
    step = (ids.size - seq - 1) // windows
    return [ids[k * step : k * step + seq + 1].tolist() for k in range(windows)]


# ------------------------------------------------------------------------------------------ disk
def disk_limits(directory: Path, queue_depths: list[int], row_bytes: int, run_neurons: int = 1,
                batch: int = 50) -> dict:
    """Large O_DIRECT reads (the disk limit) and batches of bundle-sized random reads through the
    sparse FFN's reader at several queue depths (what the default queue depth is chosen from)."""
    path = write_scratch_file(str(directory), 256 * MiB)
    try:
        big = max(measure_read(path, 256 * MiB, 8 * MiB, qd) for qd in (2, 4))
        small = {}
        length = row_bytes * run_neurons
        rng = np.random.default_rng(0)
        dest = allocate_aligned(batch * length)
        views = [dest[k * length : (k + 1) * length] for k in range(batch)]
        for qd in queue_depths:
            rounds = 60
            with_reader = BatchedReader(BatchedReadConfig(queue_depth=qd))
            try:
                t0 = time.perf_counter()
                for _ in range(rounds):
                    offsets = (rng.integers(0, (256 * MiB - length) // row_bytes, batch) * row_bytes).tolist()
                    with_reader.submit(path, offsets, views).wait()
                dt = time.perf_counter() - t0
                assert with_reader.direct_files
            finally:
                with_reader.close()
            n = rounds * batch
            small[qd] = {"gb_per_s": round(n * length / dt / 1e9, 4), "reads_per_s": round(n / dt),
                         "ms_per_batch": round(dt / rounds * 1e3, 3)}
    finally:
        os.unlink(path)
    return {"large_read_gb_per_s": round(big, 3), "bundle_reads": small, "bundle_read_bytes": length,
            "reads_per_batch": batch}


# ------------------------------------------------------------------------------------------ runs
@dataclass
class RowResult:
    name: str
    stats: dict
    agreement: float
    loss: float
    decode_tok_s: float
    bytes_per_token: float


def dense_reference(model_dir: Path, windows: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per window: (argmax [seq], per-position loss [seq]) of the in-memory dense model, decoded
    token by token like every other row (so exact offloading agrees 100%)."""
    ckpt = Checkpoint(model_dir)
    tf = Transformer(ckpt.config, InMemoryWeights(ckpt), set(ckpt.tensors))
    out = []
    with torch.no_grad():
        for w in windows:
            cache = tf.new_cache()
            logits = torch.cat([tf.forward(torch.tensor([w[p]]), cache, p) for p in range(len(w) - 1)])  # [seq, V]
            out.append((logits.argmax(-1), F.cross_entropy(logits, torch.tensor(w[1:]), reduction="none")))
    return out


def run_row(name: str, accessor, ckpt: Checkpoint, windows: list[list[int]], ref) -> RowResult:
    """Teacher-forced token-by-token decode of every window through ``accessor``."""
    tf = Transformer(ckpt.config, accessor, set(ckpt.tensors))
    agree, total, loss = 0, 0, 0.0
    decode_s = 0.0
    window_tok_s = []
    report = getattr(accessor, "stats", lambda: {"bytes_read_storage": 0})
    start_bytes = report()["bytes_read_storage"]
    with torch.no_grad():
        for w, (ref_top, _) in zip(windows, ref):
            cache = tf.new_cache()
            window_s = 0.0
            for pos in range(len(w) - 1):
                t0 = time.perf_counter()
                logits = tf.forward(torch.tensor([w[pos]]), cache, pos)  # [1, V]
                window_s += time.perf_counter() - t0
                agree += int(logits[0].argmax().item() == ref_top[pos].item())
                loss += F.cross_entropy(logits, torch.tensor([w[pos + 1]])).item()
                total += 1
            decode_s += window_s
            window_tok_s.append((len(w) - 1) / window_s)
    stats = report()
    stats["decode_tok_s_mean"] = round(total / decode_s, 2)
    nbytes = stats["bytes_read_storage"] - start_bytes
    # the median window: robust to other jobs' bursts on a shared machine (the mean is in stats)
    return RowResult(name, stats, agree / total, loss / total, float(np.median(window_tok_s)), nbytes / total)


def paired_speed(accessors: dict, ckpt: Checkpoint, windows: list[list[int]], rounds: int) -> dict:
    """Decode tokens/s of several accessors measured alternately, one window each in turn (the
    order rotating every round), so that load from other jobs hits them alike; medians."""
    models = {name: Transformer(ckpt.config, acc, set(ckpt.tensors)) for name, acc in accessors.items()}
    names = list(models)
    speeds: dict[str, list[float]] = {n: [] for n in names}
    with torch.no_grad():
        for r in range(rounds):
            w = windows[r % len(windows)]
            for name in names[r % len(names):] + names[: r % len(names)]:
                tf = models[name]
                cache = tf.new_cache()
                t0 = time.perf_counter()
                for pos in range(len(w) - 1):
                    tf.forward(torch.tensor([w[pos]]), cache, pos)
                speeds[name].append((len(w) - 1) / (time.perf_counter() - t0))
    return {n: {"median_tok_s": round(float(np.median(v)), 2), "min": round(min(v), 2), "max": round(max(v), 2),
                "rounds": len(v)} for n, v in speeds.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/tiny-dense")
    ap.add_argument("--work", default="/tmp/flashtier_sparse")
    ap.add_argument("--out", default="bench_out/sparse_ffn")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--fraction", type=float, default=0.3, help="share of FFN layers resident")
    ap.add_argument("--rank", type=int, default=128, help="predictor rank of the main rows")
    ap.add_argument("--compare-ranks", default="64", help="other ranks, full system only")
    ap.add_argument("--target-recall", type=float, default=0.99)
    ap.add_argument("--calib-tokens", type=int, default=32768)
    ap.add_argument("--recalibrate", action="store_true")
    ap.add_argument("--k", type=int, default=4, help="window length of the main rows")
    ap.add_argument("--sweep-k", default="1,2,4,8")
    ap.add_argument("--sweep-threshold", default="-1,-0.5,0.5,1", help="offsets added to calibrated thresholds")
    ap.add_argument("--queue-depths", default="1,2,4,8,16,32")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for this tiny model)")
    ap.add_argument("--paired-rounds", type=int, default=12, help="windows per accessor in the paired speed test")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, work, out = Path(args.model), Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    info = prepare(model, work / f"r{args.rank}", args.calib_tokens, args.rank, args.target_recall, args.recalibrate)
    other_ranks = [int(r) for r in args.compare_ranks.split(",") if r]
    for r in other_ranks:
        info[f"r{r}"] = prepare(model, work / f"r{r}", args.calib_tokens, r, args.target_recall, args.recalibrate)
    bundled = work / f"r{args.rank}" / "bundled"
    ckpt = Checkpoint(bundled)
    cfg = ckpt.config
    max_context = args.seq + 8
    budget, resident = ffn_budget(ckpt, max_context, args.fraction)
    ffn_bytes = sum(ckpt.tensors[x].nbytes for i in range(cfg.num_layers)
                    for x in (layer_names(cfg, i).gate, layer_names(cfg, i).up, layer_names(cfg, i).down))
    streamed_ffn = [i for i in range(cfg.num_layers) if i not in resident]
    print(f"budget {budget} bytes: FFN layers resident {resident}, streamed {streamed_ffn}", file=sys.stderr)

    row_bytes = 3 * cfg.hidden_size * 2
    disk = disk_limits(work, [int(q) for q in args.queue_depths.split(",")], row_bytes)
    print(f"disk: {disk}", file=sys.stderr)

    windows = eval_tokens(bundled, args.windows, args.seq)
    ref = dense_reference(bundled, windows)
    dense_loss = float(torch.cat([r[1] for r in ref]).mean())

    def sparse(name: str, directory: Path, **kw) -> RowResult:
        c = Checkpoint(directory)
        acc = SparseFFNWeights(c, budget, kv_tokens=max_context, config=SparseFFNConfig(audit=True, **kw))
        try:
            r = run_row(name, acc, c, windows, ref)
        finally:
            acc.close()
        print(f"  {name}: {r.bytes_per_token:.0f} B/token, {r.decode_tok_s:.1f} tok/s, agreement {r.agreement:.4f}, "
              f"loss {r.loss:.4f}, recall {r.stats.get('predictor_recall')}", file=sys.stderr)
        return r

    rows: list[RowResult] = []
    memory_row = run_row("in memory (no budget, reference)", InMemoryWeights(ckpt), ckpt, windows, ref)
    acc = PagedWeights(ckpt, budget, kv_tokens=max_context)
    try:
        rows.append(run_row("dense streaming", acc, ckpt, windows, ref))
    finally:
        acc.close()
    print(f"  dense streaming: {rows[0].bytes_per_token:.0f} B/token, {rows[0].decode_tok_s:.1f} tok/s", file=sys.stderr)
    rows.append(sparse("+ predictor (no window)", bundled, window_k=0))
    rows.append(sparse(f"+ windowing k={args.k} (split layout)", work / f"r{args.rank}" / "split", window_k=args.k))
    rows.append(sparse(f"+ bundling (full system, k={args.k}, rank {args.rank})", bundled, window_k=args.k))
    rows += [sparse(f"full system, rank {r}", work / f"r{r}" / "bundled", window_k=args.k) for r in other_ranks]
    rows.append(sparse("full system + layer-ahead speculative reads", bundled, window_k=args.k, speculate=True))
    rows.insert(0, memory_row)
    sweep_k = [sparse(f"k={k}", bundled, window_k=k) for k in (int(x) for x in args.sweep_k.split(",")) if k != args.k]
    sweep_t = [sparse(f"threshold {off:+g}", bundled, window_k=args.k, threshold_offset=off)
               for off in (float(x) for x in args.sweep_threshold.split(",") if x)]

    sp = SparseFFNWeights(ckpt, budget, kv_tokens=max_context, config=SparseFFNConfig(window_k=args.k))
    dn = PagedWeights(ckpt, budget, kv_tokens=max_context)
    try:
        paired = paired_speed({"in memory": InMemoryWeights(ckpt), "dense streaming": dn,
                               f"sparse FFN (k={args.k}, rank {args.rank})": sp}, ckpt, windows, args.paired_rounds)
    finally:
        sp.close()
        dn.close()
    print(f"paired speed: {paired}", file=sys.stderr)

    dense_bpt = rows[1].bytes_per_token  # dense streaming: every byte it streams is FFN here

    def as_json(r: RowResult) -> dict:
        s = r.stats
        return {"name": r.name, "bytes_per_token_storage": round(r.bytes_per_token),
                "bytes_vs_dense_streaming": round(r.bytes_per_token / dense_bpt, 4),
                "decode_tok_s": round(r.decode_tok_s, 2), "decode_tok_s_mean": s.get("decode_tok_s_mean"),
                "agreement_top1": round(r.agreement, 4),
                "heldout_loss": round(r.loss, 4), "loss_vs_dense": round(r.loss / dense_loss - 1, 4),
                "ffn_neurons_loaded_fraction": s.get("ffn_neurons_loaded_fraction"),
                "ffn_neurons_predicted_fraction": s.get("ffn_neurons_predicted_fraction"),
                "ffn_neurons_computed_fraction": s.get("ffn_neurons_computed_fraction"),
                "predictor_recall": s.get("predictor_recall"),
                "ffn_bundle_read_gb_per_s": s.get("ffn_bundle_read_gb_per_s"),
                "ffn_bundle_reads_per_token": round(s.get("ffn_bundle_reads", 0) / max(1, s.get("decode_tokens_counted", 1)), 1)
                if "ffn_bundle_reads" in s else None,
                "window_capacity_rows": s.get("window_capacity_rows"), "ffn_neurons_overflow": s.get("ffn_neurons_overflow"),
                "direct_io": s.get("direct_io"), "bundle_reads_direct_io": s.get("bundle_reads_direct_io")}

    result = {
        "model": str(model), "host": platform.node(), "threads": args.threads, "load_avg": os.getloadavg(),
        "rank": args.rank, "window_k": args.k, "target_recall": args.target_recall,
        "budget_bytes": budget, "max_context": max_context, "ffn_bytes": ffn_bytes,
        "ffn_layers_resident": resident, "ffn_layers_streamed": streamed_ffn,
        "heldout_tokens": args.windows * args.seq, "dense_loss": round(dense_loss, 4), "disk": disk, "setup": info,
        "rows": [as_json(r) for r in rows], "sweep_k": [as_json(r) for r in sweep_k],
        "sweep_threshold": [as_json(r) for r in sweep_t], "paired_speed": paired,
        "elapsed_s": round(time.perf_counter() - t_start, 1),
    }
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "results.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(res: dict) -> str:
    head = ("| configuration | bytes/token (storage) | vs dense streaming | decode tok/s (median window) | top-1 agreement | "
            "held-out loss (vs dense) | neurons loaded / predicted / computed | predictor recall | "
            "reads/token | bundle read GB/s |\n|---|---|---|---|---|---|---|---|---|---|\n")

    def line(r: dict) -> str:
        frac = "-" if r["ffn_neurons_loaded_fraction"] is None else (
            f"{r['ffn_neurons_loaded_fraction']:.3f} / {r['ffn_neurons_predicted_fraction']:.3f} / "
            f"{r['ffn_neurons_computed_fraction']:.3f}")
        rec = "-" if r["predictor_recall"] is None else f"{r['predictor_recall']:.4f}"
        bw = "-" if r["ffn_bundle_read_gb_per_s"] is None else f"{r['ffn_bundle_read_gb_per_s']:.3f}"
        reads = "-" if r["ffn_bundle_reads_per_token"] is None else f"{r['ffn_bundle_reads_per_token']:.0f}"
        return (f"| {r['name']} | {r['bytes_per_token_storage']:,} | {r['bytes_vs_dense_streaming']:.1%} | "
                f"{r['decode_tok_s']:.1f} | {r['agreement_top1']:.2%} | {r['heldout_loss']:.4f} ({r['loss_vs_dense']:+.2%}) | "
                f"{frac} | {rec} | {reads} | {bw} |\n")

    disk = res["disk"]
    s = [f"# Sparse FFN from flash: {res['model']}\n\n",
         f"Budget {res['budget_bytes']:,} bytes (FFN layers resident {res['ffn_layers_resident']}, streamed "
         f"{res['ffn_layers_streamed']}); {res['heldout_tokens']} held-out tokens, teacher-forced one token per pass; "
         f"dense loss {res['dense_loss']}; {res['threads']} threads; load average {res['load_avg']}.\n\n",
         f"Disk (same run): large O_DIRECT reads {disk['large_read_gb_per_s']} GB/s; "
         f"{disk['bundle_read_bytes']}-byte random reads by queue depth: "
         + ", ".join(f"qd {q}: {v['gb_per_s']} GB/s ({v['reads_per_s']} reads/s, {v['ms_per_batch']} ms per "
                    f"{disk['reads_per_batch']} reads)" for q, v in disk["bundle_reads"].items())
         + "\n\n## Decode speed, measured alternately (one window each in turn, median over windows)\n\n"
         "| accessor | median tok/s | min | max | windows |\n|---|---|---|---|---|\n"
         + "".join(f"| {n} | {v['median_tok_s']} | {v['min']} | {v['max']} | {v['rounds']} |\n"
                   for n, v in res["paired_speed"].items())
         + "\n## Ablation\n\n", head, *(line(r) for r in res["rows"]),
         "\n## Window length k (bundled, predictor)\n\n", head, *(line(r) for r in res["sweep_k"]),
         "\n## Predictor threshold (offset on the calibrated logit thresholds, k as above)\n\n", head,
         *(line(r) for r in res["sweep_threshold"])]
    return "".join(s)


if __name__ == "__main__":
    sys.exit(main())
