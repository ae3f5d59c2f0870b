"""``flashtier plan``: where weights and KV would live under the given budgets, and how fast.

Works on a model folder or on a ``config.json`` alone (e.g. a real 8B model's config, to plan for
hardware this machine does not have). Bandwidths come from ``flashtier bench-io``'s cache when
present (disk, and host matrix-vector bandwidth), else documented defaults; flags override them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flashtier.apps.common import resolve_model_dir
from flashtier.errors import CheckpointError, InputError

DEFAULT_CACHE = Path.home() / ".cache" / "flashtier" / "bench_io.json"
PROBE_CACHE = Path.home() / ".cache" / "flashtier" / "retrieval_probe.json"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="show the placement plan and predicted speed", description=__doc__)
    p.add_argument("model", nargs="?", default=None, help="model folder, or a config.json file")
    p.add_argument("--dram-budget", default=None, metavar="BYTES", help="host memory, e.g. 1G (default: unlimited)")
    p.add_argument("--device-budget", default=None, metavar="BYTES", help="device memory, e.g. 24G (default: no device)")
    p.add_argument("--context", type=int, default=4096, help="context tokens the KV cache must hold")
    p.add_argument("--attention", choices=["full", "retrieval"], default="full")
    p.add_argument("--kv-sequences", type=int, default=1, metavar="N",
                   help="sequences decoded together, each with --context tokens of KV (generate's --kv-sequences, "
                        "serve's --max-batch): the KV of all of them is planned (full attention)")
    p.add_argument("--weight-bytes", type=int, default=None, help="bytes per weight when planning from a config alone (default 2)")
    p.add_argument("--disk-gbps", type=float, default=None, help="override the disk bandwidth (GB/s)")
    p.add_argument("--host-gbps", type=float, default=None, help="override host memory bandwidth for compute (GB/s)")
    p.add_argument("--link-gbps", type=float, default=None, help="host->device bandwidth (GB/s, default 25)")
    p.add_argument("--device-gbps", type=float, default=None, help="device memory bandwidth (GB/s, default 1000)")
    p.add_argument("--bench-cache", default=str(DEFAULT_CACHE), help="bench-io result to read bandwidths from")
    p.add_argument("--kv-quant-bits", type=int, choices=[2, 4, 8], default=None,
                   help="with --attention retrieval: the offloaded KV is KIVI-quantised (group 32, 64-token blocks)")
    p.add_argument("--compressed", choices=["auto", "off"], default="auto",
                   help="plan reads from the compressed copy when the model has one (`flashtier compress`; default auto)")
    p.add_argument("--retrieval-probe", choices=["auto", "off"], default="auto",
                   help="with --attention retrieval: predict the attention step from a probe of this machine's own "
                        "retrieval step (seconds to a minute, once per head shape; cached in --probe-cache) (default auto); "
                        "off: the byte model at host memory bandwidth")
    p.add_argument("--probe-cache", default=str(PROBE_CACHE), help="where the retrieval probe is cached")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def load_bandwidths(args: argparse.Namespace):
    from flashtier.runtime.planner import Bandwidths
    from flashtier.storage_backends.bench_io import load_cached

    bw = Bandwidths()
    cached = load_cached(args.bench_cache)
    fields = {}
    if cached is not None:
        fields["disk"] = cached.disk_read_gb_per_s * 1e9
        fields["source"] = f"bench-io cache {args.bench_cache}"
    for flag, key in (("disk_gbps", "disk"), ("host_gbps", "host_memory"), ("link_gbps", "host_to_device"), ("device_gbps", "device_memory")):
        value = getattr(args, flag)
        if value is not None:
            fields[key] = value * 1e9
            fields["source"] = "flags" if "source" not in fields else fields["source"] + " + flags"
    from dataclasses import replace

    return replace(bw, **fields)


def run(args: argparse.Namespace) -> int:
    from flashtier.checkpoint.folder import Checkpoint
    from flashtier.checkpoint.config import ModelConfig
    from flashtier.runtime.units import parse_bytes
    from flashtier.runtime.planner import PlanRequest, make_plan, sizes_from_config

    from flashtier.checkpoint.gguf_checkpoint import find_gguf

    if args.context <= 0:
        raise InputError(f"--context must be a positive number of tokens, got {args.context}")
    if args.kv_sequences < 1:
        raise InputError(f"--kv-sequences must be >= 1, got {args.kv_sequences}")
    if args.attention == "retrieval" and args.retrieval_probe != "off" and Path(args.probe_cache).is_dir():
        raise InputError(f"--probe-cache {args.probe_cache} is a directory; give the path of a file "
                         f"(e.g. {Path(args.probe_cache) / 'retrieval_probe.json'})")
    target = resolve_model_dir(args.model)
    gguf = find_gguf(target) if target.exists() else None
    ck = None  # the checkpoint, when there is one (not for a bare config.json)
    if gguf is not None:
        from flashtier.checkpoint.folder import open_checkpoint

        ck = open_checkpoint(gguf)
        cfg, sizes, source = ck.config, {n: t.nbytes for n, t in ck.tensors.items()}, "GGUF checkpoint (quantized bytes)"
    elif target.is_file():
        try:
            raw = json.loads(target.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{target}: not readable JSON ({e})") from e
        cfg = ModelConfig.from_hf(raw, source=str(target))
        sizes = sizes_from_config(cfg, args.weight_bytes or 2)
        source = "config only"
    fraction = 1.0
    if gguf is None and not target.is_file():
        from flashtier.storage_backends.compressed_layout import load_index

        ck = Checkpoint(target)
        cfg, sizes, source = ck.config, {n: t.nbytes for n, t in ck.tensors.items()}, "checkpoint"
        index = load_index(target) if args.compressed != "off" else None
        if index is not None:
            fraction = index.stored_fraction()
            source += f", compressed copy ({fraction:.2f}x the bytes at rest)"
    kv_fraction = 1.0
    if args.kv_quant_bits is not None:
        import torch

        from flashtier.runtime.kv.codec import kv_codec
        from flashtier.runtime.kv.layout import KVBlockLayout

        layout = KVBlockLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 64, torch.bfloat16)
        kv_fraction = kv_codec(layout, args.kv_quant_bits, 32).record_bytes / layout.block_bytes
    # MoE under a budget runs with per-layer expert caches (runtime/weights/experts.py): plan the
    # same reservation the engine makes, so plan and generate agree on the minimum budget
    experts = cfg.is_moe and args.dram_budget is not None
    # a request never holds more than the model's positions (generate caps its KV the same way)
    context = min(args.context, cfg.max_position_embeddings)
    req = PlanRequest(device_budget=parse_bytes(args.device_budget) or 0, dram_budget=parse_bytes(args.dram_budget),
                      context=context * args.kv_sequences,
                      attention=args.attention, storage_fraction=fraction,
                      kv_host_fraction=kv_fraction, expert_cache=experts,
                      expert_cache_min_bytes=_expert_min(ck, cfg, sizes)
                      if experts else 0,
                      retrieval_step_s=_retrieval_step(cfg, args, context, sizes) if args.attention == "retrieval" else None)
    plan = make_plan(cfg, sizes, req, load_bandwidths(args))
    if context < args.context:
        plan.notes.append(f"context {args.context} capped at the model's {cfg.max_position_embeddings} positions")
    if args.kv_sequences > 1:
        plan.notes.append(f"KV planned for {args.kv_sequences} sequences of {context} tokens"
                          + ("; the retrieval step is per sequence, and each gets 1/N of --kv-dram-budget"
                             if args.attention == "retrieval" else ""))
    if args.json:
        print(json.dumps({"model": str(target), "source": source, "context": context,
                          "attention": args.attention, **plan.as_json()}))
        return 0
    gib = 1 << 30
    print(f"model        {target} ({cfg.architecture}, {sum(sizes.values()) / gib:.2f} GiB of weights, {source})")
    print(f"fits         {'yes' if plan.fits else 'NO'}")
    for tier in ("device", "host", "storage"):
        print(f"{tier:<12} weights resident {plan.resident_bytes[tier] / gib:8.3f} GiB   KV {plan.kv_bytes[tier] / gib:8.3f} GiB")
    per = plan.bytes_per_token
    print(f"per token    storage {per['storage'] / 2**20:.1f} MiB, host->device {per['host_to_device'] / 2**20:.1f} MiB, "
          f"host reads {(per['host'] + per['kv_host_read']) / 2**20:.1f} MiB, device reads {(per['device'] + per['kv_device_read']) / 2**20:.1f} MiB")
    print(f"predicted    {plan.predicted_decode_tok_s:.2f} tokens/s ({plan.predicted_decode_s * 1000:.1f} ms/token), bound by {plan.bound_by}")
    b = plan.bandwidths
    print(f"assumed      disk {b.disk / 1e9:.2f} GB/s, host {b.host_memory / 1e9:.1f} GB/s, link {b.host_to_device / 1e9:.0f} GB/s, "
          f"device {b.device_memory / 1e9:.0f} GB/s ({b.source})")
    for note in plan.notes:
        print(f"note         {note}")
    return 0


def _retrieval_step(cfg: object, args: argparse.Namespace, context: int, sizes: dict[str, int]) -> float | None:
    """Seconds of a decode step's retrieval attention at ``--context`` on this machine (the default
    preset), from the cached probe (run now when missing; between layers it streams what one of
    this model's layers reads, ``sizes`` by tensor name); None with ``--retrieval-probe off``."""
    if args.retrieval_probe == "off":
        return None
    import sys

    from flashtier.runtime.kv.retrieval_config import RetrievalCacheConfig
    from flashtier.runtime.kv.retrieval_cost import HeadShape, cached_probe, is_cached, model_flush_bytes

    config = RetrievalCacheConfig(kv_quant_bits=args.kv_quant_bits,
                                  kv_quant_group=32 if args.kv_quant_bits is not None else None)
    shape = HeadShape(cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim)
    cache = Path(args.probe_cache)
    flush = model_flush_bytes(cfg, sizes)
    if not is_cached(config, shape, cfg.num_layers, cache, flush):
        print(f"probing this machine's retrieval step for {shape.num_kv_heads} kv heads x {shape.head_dim} "
              f"(seconds to a minute, once; cached in {cache})", file=sys.stderr, flush=True)
    cost = cached_probe(config, shape, cfg.num_layers, cache, flush)
    return cost.step_seconds(config.retrieval, shape, context, cfg.num_layers)


def _expert_min(checkpoint: object, cfg: object, sizes: dict[str, int]) -> int:
    """The expert-cache reservation ``generate`` makes (from the checkpoint's layout), or the
    planner's upper estimate when only a config is given."""
    if checkpoint is not None:
        from flashtier.runtime.weights.experts import min_cache_bytes

        return min_cache_bytes(checkpoint)
    from flashtier.runtime.planner import expert_cache_min_bytes

    return expert_cache_min_bytes(cfg, sizes)
