"""One native call per half layer against the separate calls, in one process, alternating.

``python -m flashtier.benchmarks.bench_native_steps --scenario dense-fit --rounds 4``: opens the
scenario's GGUF (made by :mod:`bench_gguf`: llama.cpp's Q4_K_M of random weights) in memory and,
in each round, decodes the same greedy tokens with the fused steps (``attn_step``, ``ffn_step``,
``experts_step``) and with them switched off (the separate native calls they replace), in
alternating order. Reports decode tokens/s of each and checks that both produce the same tokens
(the steps are bit-identical, so any difference is a bug). Results go to
``benchmarks/results/native_steps_<scenario>.*``.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from flashtier.benchmarks.bench_gguf import ensure_files
from flashtier.benchmarks.common import REPO, machine, publish


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", default="dense-fit", choices=["dense-fit", "moe"])
    ap.add_argument("--type", default="q4_k_m")
    ap.add_argument("--activations", default="f32")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dram-budget", default=None, help="run paged under this budget (default: in memory)")
    ap.add_argument("--work", default=str(REPO / "bench_out"))
    a = ap.parse_args()

    from flashtier.runtime import decode_ops
    from flashtier.runtime.engine import open_model
    from flashtier.runtime.generate import GenerationStats

    work = Path(a.work)
    work.mkdir(exist_ok=True)
    _, gguf = ensure_files(work, a.scenario, a.type)
    options = {"dram_budget": a.dram_budget} if a.dram_budget else {}
    model = open_model(gguf, activations=a.activations, threads=a.threads, max_context=256, **options)
    native = decode_ops.native_steps
    prompt = list(range(300, 316))
    speeds: dict[str, list[float]] = {"fused": [], "separate": []}
    tokens: dict[str, list[int]] = {}
    try:
        model.generate(prompt, max_new_tokens=4, ignore_eos=True)  # warm up
        for r in range(a.rounds):
            for mode in ("fused", "separate") if r % 2 == 0 else ("separate", "fused"):
                decode_ops.native_steps = native if mode == "fused" else (lambda: False)
                stats = GenerationStats()
                out = model.generate(prompt, max_new_tokens=a.tokens, ignore_eos=True, stats=stats)
                speeds[mode].append(round(stats.decode_tok_s, 2))
                if tokens.setdefault(mode, out.tokens) != out.tokens:
                    raise SystemExit(f"{mode}: greedy tokens changed between rounds")
    finally:
        decode_ops.native_steps = native
        model.close()
    same = tokens["fused"] == tokens["separate"]
    ratios = [f / s for f, s in zip(speeds["fused"], speeds["separate"])]
    res = {"machine": machine(), "scenario": a.scenario, "type": a.type, "gguf": str(gguf),
           "activations": a.activations, "dram_budget": a.dram_budget, "threads": a.threads, "tokens": a.tokens,
           "fused_tok_s": speeds["fused"], "separate_tok_s": speeds["separate"], "ratios": ratios,
           "same_tokens": same}
    table = "\n".join([
        f"Machine: {res['machine']}; {a.scenario} as {a.type.upper()} ({gguf.name}), "
        f"{'budget ' + a.dram_budget if a.dram_budget else 'in memory'}, activations {a.activations}, "
        f"{a.threads} threads, {a.tokens} tokens after a 16-token prompt, rounds alternating in order.",
        "",
        "| round | fused steps tok/s | separate calls tok/s | fused / separate |",
        "| --- | --- | --- | --- |",
        *[f"| {i + 1} | {f:.2f} | {s:.2f} | {f / s:.2f}x |"
          for i, (f, s) in enumerate(zip(speeds["fused"], speeds["separate"]))],
        "",
        f"Median ratio {statistics.median(ratios):.2f}x; the same tokens on both paths: {same}."])
    suffix = f"_{a.activations}" if a.activations != "f32" else ""
    suffix += "_budget" if a.dram_budget else ""
    publish(f"native_steps_{a.scenario.replace('-', '_')}{suffix}", res, table)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
