"""Offline batched decode under a memory cap: one weight stream per step for B sequences.

    python -m flashtier.benchmarks.bench_batch [--scenario dense-big] [--batches 1,2,4,8] [--rounds 1]

The scenario's Q4_K_M GGUF (made by ``bench_gguf``: llama.cpp's quantizer) runs under
``memcap.sh`` with flashtier's ``--dram-budget``; in one process per round, B = 1 is
``Model.generate`` and B > 1 ``Model.generate_batch`` over B different 16-token prompts (greedy,
16 new tokens). Reports aggregate decode tokens/s (all sequences' tokens / decode wall time) and
checks that every sequence's tokens equal its tokens alone (batch invariance). Writes
``benchmarks/results/batch_<scenario>.md``.

``--scenario tiny-dense-sparse``: the sparse FFN from flash in a batch (the shipped tiny-dense,
row-column bundles and rank-128 predictors made as ``bench_sparse_ffn.py`` makes them, in
``--work``), a budget keeping 30% of the FFN layers resident with the KV of every sequence
planned, 1 thread as ``bench_sparse_ffn.py``; also reports the decode bytes read from storage
per token per row (the rows' union of neurons is read once per step).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flashtier.benchmarks.common import PY, REPO, run_json
from flashtier.runtime.quant_kernels import ACTIVATIONS

SCENARIOS = {"dense-big": ("bench_out/gguf-dense-big-q4_k_m.gguf", "1G", "650M"),
             "dense-fit": ("bench_out/gguf-dense-fit-q4_k_m.gguf", "1G", None),
             # the batching issue's scenarios: bf16 safetensors folders (make-model presets, made by bench_gguf)
             "dense-1.7g": ("bench_out/gguf-dense-fit", "1G", "700M"),
             "dense-1.7g-mem": ("bench_out/gguf-dense-fit", None, None),
             "moe-1.3g": ("bench_out/gguf-moe", "700M", "420M"),
             # long-context batching: the shipped model (use --attention retrieval --prompt-tokens 4096)
             "tiny-moe-16k": ("models/tiny-moe-16k", None, None),
             # the sparse FFN in a batch: tiny-dense bundled and calibrated in --work (budget computed)
             "tiny-dense-sparse": ("models/tiny-dense", None, None),
             # MoE batching with trained routing: the shipped model's experts through a cache of ~1/4 of them
             "tiny-moe-16k-experts": ("models/tiny-moe-16k", None, "10M")}

CHILD = r"""
import json, sys
from flashtier.runtime import open_model
path, budget, batches = sys.argv[1], sys.argv[2] or None, [int(b) for b in sys.argv[3].split(",")]
tokens, check, act, attention, plen = int(sys.argv[4]), sys.argv[5] == "1", sys.argv[6], sys.argv[7], int(sys.argv[8])
sparse = sys.argv[9] == "1"
prompts = [[(7 * i + j) % 1000 + 1 for j in range(plen)] for i in range(max(batches))]
out = {}
extra = dict(sparse_ffn=True, threads=1) if sparse else dict(threads=2, activations=act)
with open_model(path, dram_budget=budget, max_context=plen + tokens, kv_sequences=max(batches), attention=attention,
                **extra) as llm:
    def decode_bytes():  # (bytes read from storage, decode tokens counted by the accessor or None) so far
        s = llm.weights.stats() if hasattr(llm.weights, "stats") else {}
        if "decode_tokens_counted" in s:  # the sparse FFN counts decode passes apart
            n = s["decode_tokens_counted"]
            return s.get("bytes_per_token_storage", 0) * n, n
        return s.get("bytes_read_storage", 0), None

    # warm-up on a prompt no other one starts with: Model.generate reuses the KV of a shared prefix,
    # computed in other chunks than a fresh prefill, which can round differently (see the notes)
    llm.generate([3] * 8, max_new_tokens=2, ignore_eos=True)
    alone = {}
    for b in batches:
        before = decode_bytes()
        if b == 1:
            r = llm.generate(prompts[0], max_new_tokens=tokens, ignore_eos=True)
            alone[0] = r.tokens
            out[b] = {"tok_s": r.stats["decode_tok_s"], "invariant": True}
        else:
            rs = llm.generate_batch(prompts[:b], max_new_tokens=tokens, ignore_eos=True)
            out[b] = {"tok_s": rs[0].stats["batch_decode_tok_s"], "tokens": [r.tokens for r in rs]}
        after = decode_bytes()
        rows = (after[1] - before[1]) if after[1] is not None else b * tokens  # else: prefill reads included
        if rows and after[0] > before[0]:
            out[b]["bytes_per_token_row"] = round((after[0] - before[0]) / rows)
    for b, o in out.items():
        if b > 1:  # the first sequence against its run alone (B=1); --check: every sequence
            seqs = o.pop("tokens")
            solo = [alone.get(0) or llm.generate(prompts[0], max_new_tokens=tokens, ignore_eos=True).tokens]
            if check:
                solo += [llm.generate(p, max_new_tokens=tokens, ignore_eos=True).tokens for p in prompts[1:b]]
            o["invariant"] = seqs[:len(solo)] == solo
print(json.dumps({"batches": out}))
"""


def sparse_model(model: Path, work: Path, kv_positions: int) -> tuple[Path, str]:
    """tiny-dense with row-column bundles and rank-128 predictors in ``work`` (made once, as
    ``bench_sparse_ffn.py`` makes them), and the smallest budget keeping 30% of its FFN layers
    resident with ``kv_positions`` positions of KV planned."""
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_sparse_ffn import ffn_budget, prepare

    from flashtier.checkpoint.folder import Checkpoint

    prepare(model, work, 32768, 128, 0.99, False)
    return work / "bundled", str(ffn_budget(Checkpoint(work / "bundled"), kv_positions, 0.3)[0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", default="dense-big", choices=sorted(SCENARIOS))
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=16, help="new tokens per request (default 16)")
    ap.add_argument("--check", action="store_true", help="compare every sequence with its run alone (slow)")
    ap.add_argument("--attention", default="full", choices=("full", "retrieval"))
    ap.add_argument("--prompt-tokens", type=int, default=16, help="tokens per prompt (default 16)")
    ap.add_argument("--work", default="/tmp/flashtier_sparse/r128",
                    help="tiny-dense-sparse: where the bundled, calibrated copy is made (kept across runs)")
    ap.add_argument("--activations", default="f32", choices=ACTIVATIONS,
                    help="quantized weights: exact fp32 activations (default; split activations on AVX-512 VNNI), "
                         "exact with the fp32-FMA kernels, or int8 (llama.cpp's approximation)")
    args = ap.parse_args()
    rel, cap, budget = SCENARIOS[args.scenario]
    path = REPO / rel
    sparse = args.scenario == "tiny-dense-sparse"
    if sparse:
        path, budget = sparse_model(path, Path(args.work), (args.prompt_tokens + args.tokens) * max(
            int(b) for b in args.batches.split(",")))
    if not path.exists():
        raise SystemExit(f"{path} is missing: run `python -m flashtier.benchmarks.bench_gguf --scenario {args.scenario}` first")
    rows = []
    for _ in range(args.rounds):
        r = run_json([PY, "-c", CHILD, str(path), budget or "", args.batches, str(args.tokens), "1" if args.check else "0",
                      args.activations, args.attention, str(args.prompt_tokens), "1" if sparse else "0"],
                     cap=cap, timeout=5400)
        if "batches" not in r:
            raise SystemExit(f"run failed: {r}")
        rows.append((r["batches"], r.get("peak_cgroup_mib")))
    batches = args.batches.split(",")
    lines = [f"{args.scenario} ({rel}) under {'a ' + cap + ' cap' if cap else 'no cap'}, --dram-budget {budget or 'none'}, "
             f"{'1 thread, sparse FFN' if sparse else '2 threads'}, {args.tokens} new tokens after {args.prompt_tokens}-token prompts, activations "
             f"{args.activations}, {args.attention} attention; aggregate decode tokens/s", "",
             "| round | " + " | ".join(f"B={b}" for b in batches) + " | B=max / B=1 | "
             + ("every sequence = alone" if args.check else "first sequence = alone") + " | peak MiB |",
             "| --- | " + " | ".join("---" for _ in batches) + " | --- | --- | --- |"]
    for i, (out, peak) in enumerate(rows, 1):
        speeds = [out[b]["tok_s"] for b in batches]
        inv = all(out[b]["invariant"] for b in batches)
        lines.append(f"| {i} | " + " | ".join(f"{v:.2f}" for v in speeds) + f" | {speeds[-1] / speeds[0]:.2f}x | "
                     f"{'yes' if inv else 'NO'} | {peak} |")
    if any("bytes_per_token_row" in out[b] for out, _ in rows for b in batches):
        what = ("decode bytes read from storage per token per row (sparse FFN bundles + streamed weights)" if sparse
                else "bytes read from storage per generated token per row (prefill included)")
        lines += ["", what + ":", "",
                  "| round | " + " | ".join(f"B={b}" for b in batches) + " |",
                  "| --- | " + " | ".join("---" for _ in batches) + " |"]
        for i, (out, _) in enumerate(rows, 1):
            lines.append(f"| {i} | " + " | ".join(f"{out[b].get('bytes_per_token_row', 0):,}" for b in batches) + " |")
    text = "\n".join(lines) + "\n"
    (REPO / "benchmarks" / "results").mkdir(exist_ok=True)
    suffix = ("" if args.activations == "f32" else f"_{args.activations}") + \
        ("" if args.attention == "full" else f"_{args.attention}_{args.prompt_tokens}")
    (REPO / "benchmarks" / "results" / f"batch_{args.scenario.replace('-', '_')}{suffix}.md").write_text(text)
    print(text)
    print(json.dumps([r[0] for r in rows]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
