"""Eviction policies for per-layer expert caches, replayed on real routing (trace-driven).

    python -m flashtier.benchmarks.expert_policy_sim [MODEL_DIR] [--tokens 200] [--slots 2,3,4]

Records the experts every MoE layer of MODEL_DIR (default: the shipped tiny-moe) routes to
while it greedily continues three 1200-character windows of held-out source (json/decoder.py of
the standard library), then replays that trace against a cache of ``slots`` experts per layer for
every registered policy (the experts a step uses are pinned while it runs; ``tick`` after each
step). No prediction: this isolates the policy. Prints one JSON object: hit rate per (slots,
policy). The default policy of the expert cache was chosen from this table.
"""

from __future__ import annotations

import argparse
import json
import sysconfig
from pathlib import Path

import torch
from flashtier.runtime.engine import Model
from flashtier.tiers.policies import make_policy

VARIANTS = {
    "lru": {}, "lfu": {}, "mru": {}, "cost": {}, "lrfu": {"half_life": 8.0},
    "least-stale(2)": {"half_life": 2.0}, "least-stale(8)": {"half_life": 8.0}, "least-stale(64)": {"half_life": 64.0},
}


def record(model_dir: str, tokens: int) -> list[dict[int, list[int]]]:
    llm = Model(model_dir)
    t = llm.transformer
    trace: list[dict[int, list[int]]] = []
    forward = t.forward

    def traced(ids, cache, start, all_logits=False):
        out = forward(ids, cache, start, all_logits)
        if ids.shape[0] == 1:
            trace.append({i: v[-1].tolist() for i, v in t.trace.chosen.items()})
        return out

    t.forward = traced
    text = (Path(sysconfig.get_paths()["stdlib"]) / "json" / "decoder.py").read_text()
    for offset in (0, 3000, 6000):
        llm.cache, llm._cached_ids = llm._new_cache(), []
        llm.generate(text[offset: offset + 1200], max_new_tokens=tokens, ignore_eos=True)
    return trace


def replay(trace: list[dict[int, list[int]]], policy: str, slots: int, options: dict[str, float]) -> float:
    hits = uses = 0
    for layer in trace[0]:
        p = make_policy(policy, **options)
        resident: set[int] = set()
        for step in trace:
            used = step[layer]
            for e in used:
                uses += 1
                if e in resident:
                    hits += 1
                    p.touch(e)
                    continue
                if len(resident) >= slots:
                    victim = next(v for v in p.victims() if v not in used)
                    p.evict(victim)
                    resident.discard(victim)
                p.insert(e, 1, 0.0)
                resident.add(e)
            p.tick()
    return hits / uses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", nargs="?", default=str(Path(__file__).resolve().parent.parent / "models" / "tiny-moe"))
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--slots", default="2,3,4")
    a = ap.parse_args()
    torch.set_num_threads(1)
    trace = record(a.model_dir, a.tokens)
    out = {"model": a.model_dir, "decode_steps": len(trace), "hit_rate": {}}
    for slots in (int(s) for s in a.slots.split(",")):
        out["hit_rate"][slots] = {name: round(replay(trace, name.split("(")[0], slots, opts), 4)
                                  for name, opts in VARIANTS.items()}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
