"""MoE experts around a GPU: the runtime's per-miss choice against its two fixed strategies.

    python -m flashtier.benchmarks.bench_device_moe [--device cuda] [--device-budget 400M] [--tokens 32]

One run on moe-1.3g (8 experts of 5632 per layer, top-2, bf16; ``make-model --preset moe-1.3g``)
with ``--device-budget B`` (attention, routers and KV on the GPU; every expert held in host
memory, as many per layer as the rest of B leaves cached on the GPU), three ways:

* ``--expert-placement auto``: each miss copied to the GPU or computed on the CPU, whichever the
  measured link and CPU speeds say is faster for the pass's rows (``prefetch/placement.py``);
* ``gpu``: every miss copied ("copy every miss");
* ``cpu``: no expert on the GPU, every expert computed on the CPU ("all experts on the CPU").

Reported: decode tokens/s of each, where the experts ran (``expert_placement``), and
``ratio_to_best_fixed`` = auto / max(gpu, cpu) (the GPU issue's target: >= 2 with experts 3x
the device budget). With ``--device cpu`` it runs on the CPU stand-in (a smoke run). Prints one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from flashtier.benchmarks.common import ensure_model
from flashtier.runtime.units import parse_bytes

PROMPT = [1 + i % 200 for i in range(16)]


def run(model: Path, device: str, tokens: int, **options: object) -> dict:
    from flashtier.runtime import open_model

    with open_model(model, device=device, **options) as llm:
        llm.generate(PROMPT, max_new_tokens=2, ignore_eos=True)
        r = llm.generate(PROMPT, max_new_tokens=tokens, ignore_eos=True)
        stats = llm.weights.stats()
        return {"decode_tok_s": r.stats["decode_tok_s"], "tokens": r.tokens[-4:],
                "expert_placement": stats.get("expert_placement"),
                "device_slots_per_layer": stats.get("expert_cache", {}).get("device_slots_per_layer")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--preset", default="moe-1.3g")
    ap.add_argument("--work", default="bench_out")
    ap.add_argument("--device-budget", default="400M")
    ap.add_argument("--tokens", type=int, default=32)
    a = ap.parse_args(argv)
    work = Path(a.work)
    work.mkdir(exist_ok=True)
    model = ensure_model(work / a.preset, a.preset)
    budget = parse_bytes(a.device_budget)
    expert_bytes = sum(f.stat().st_size for f in model.glob("*.safetensors"))  # upper bound: the whole file
    res: dict = {"device": a.device, "model": str(model), "device_budget": budget, "model_bytes": expert_bytes}
    if a.device == "cuda":
        res["gpu"] = torch.cuda.get_device_name()
    for placement in ("auto", "gpu", "cpu"):
        try:
            res[placement] = run(model, a.device, a.tokens, device_budget=budget, expert_placement=placement)
        except Exception as e:  # report and go on: the other strategies still measure
            res[placement] = {"error": f"{type(e).__name__}: {e}"[:300]}
    speeds = {p: res[p].get("decode_tok_s") for p in ("auto", "gpu", "cpu")}
    fixed = [v for p, v in speeds.items() if p != "auto" and v]
    if speeds["auto"] and fixed:
        res["ratio_to_best_fixed"] = round(speeds["auto"] / max(fixed), 3)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
