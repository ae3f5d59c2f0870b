"""Dense weights paged onto a GPU: flashtier ``--device-budget`` against the link-bound limit and
against transformers + accelerate with the same GPU memory.

    python -m flashtier.benchmarks.bench_device_dense [--device cuda] [--device-budget 800M] [--tokens 32]

One run, on a bf16 Llama-shaped checkpoint made here (``--preset``, default dense-1.7g: 1.7 GB,
so an 800M device budget holds less than half of it):

* ``link_gb_s``: a plain pinned host -> device copy of 256 MiB (median of 5), the link's speed;
* flashtier with ``--device DEVICE --device-budget B`` (host memory unlimited: what does not fit on
  the GPU is held in pinned host memory and copied into the device window at each use): decode
  tokens/s and the bytes it copies host -> device per token (``bytes_host_to_device``);
* ``link_bound_tok_s`` = link speed / those bytes: what a decoder bound by the link could do;
  the issue's target is flashtier >= 85% of it;
* transformers + accelerate with ``max_memory={0: B, "cpu": ...}`` (its hooks copy offloaded
  layers to the GPU as they run): target flashtier >= 3x;
* flashtier with every weight on the GPU (no budget), for scale.

With ``--device cpu`` the device tier is the CPU stand-in (the same schedule; "link" = a host
memcpy), accelerate is skipped: a smoke run of the script on machines without a GPU. Prints one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from flashtier.benchmarks.common import ensure_model
from flashtier.runtime.units import parse_bytes

PROMPT = [1 + i % 200 for i in range(16)]


def link_gb_s(device: str, nbytes: int = 256 << 20, repeat: int = 5) -> float:
    """GB/s of a plain pinned host -> ``device`` copy of ``nbytes``."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device == "cuda")
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    times = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / 1e9


def flashtier_run(model: Path, device: str, tokens: int, **options: object) -> dict:
    from flashtier.runtime import open_model

    with open_model(model, device=device, **options) as llm:
        llm.generate(PROMPT, max_new_tokens=2, ignore_eos=True)  # warm: pages held, kernels loaded
        before = llm.weights.stats() if hasattr(llm.weights, "stats") else {}
        r = llm.generate(PROMPT, max_new_tokens=tokens, ignore_eos=True)
        after = llm.weights.stats() if hasattr(llm.weights, "stats") else {}
        out = {"decode_tok_s": r.stats["decode_tok_s"], "tokens": r.tokens[-4:]}
        if "bytes_host_to_device" in after:
            # every pass (the prompt's and each decode step) copies the same pages once
            out["bytes_host_to_device_per_token"] = (after["bytes_host_to_device"] - before["bytes_host_to_device"]) / tokens
            out["resident_bytes"] = after["resident_bytes"]
        return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--preset", default="dense-1.7g")
    ap.add_argument("--work", default="bench_out")
    ap.add_argument("--device-budget", default="800M")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--skip", default="", help="comma-separated: accelerate, resident")
    a = ap.parse_args(argv)
    skip = set(filter(None, a.skip.split(",")))
    work = Path(a.work)
    work.mkdir(exist_ok=True)
    model = ensure_model(work / a.preset, a.preset)
    budget = parse_bytes(a.device_budget)
    res: dict = {"device": a.device, "model": str(model), "device_budget": budget,
                 "model_bytes": sum(f.stat().st_size for f in model.glob("*.safetensors"))}
    if a.device == "cuda":
        res["gpu"] = torch.cuda.get_device_name()
    res["link_gb_s"] = round(link_gb_s(a.device), 2)
    paged = flashtier_run(model, a.device, a.tokens, device_budget=budget)
    res["flashtier"] = paged
    per_token = paged.get("bytes_host_to_device_per_token", 0)
    if per_token:
        res["link_bound_tok_s"] = round(res["link_gb_s"] * 1e9 / per_token, 2)
        res["ratio_to_link_bound"] = round(paged["decode_tok_s"] / res["link_bound_tok_s"], 3)
    if "resident" not in skip:
        res["flashtier_resident"] = flashtier_run(model, a.device, a.tokens)
    if a.device == "cuda" and "accelerate" not in skip:
        p = subprocess.run([sys.executable, "-m", "flashtier.benchmarks.peers.hf_accelerate", str(model),
                            "--gpu-memory", f"{budget // (1 << 20)}MiB", "--tokens", str(a.tokens)],
                           capture_output=True, text=True, timeout=600)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        res["accelerate"] = json.loads(lines[-1]) if p.returncode == 0 and lines else {"error": p.stderr[-400:]}
        acc = res["accelerate"].get("decode_tok_s")
        if acc:
            res["ratio_to_accelerate"] = round(paged["decode_tok_s"] / acc, 2)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
