"""Decode at a long context through ``Model.generate`` (what a user runs), full vs retrieval attention.

    python -m flashtier.benchmarks.bench_generate_context [--context 16000] [--tokens 64] [--rounds 2]
        [--compute-dtype float32]

The shipped ``models/tiny-moe-16k``, a ``--context``-token prompt, ``--tokens`` greedy new tokens,
2 threads, in one process per round: decode ms per token with full attention and with retrieval
attention, the retrieval search / gather ms per step, and whether both gave the same first tokens
as in the other rounds. Unlike ``bench_long_context`` (which drives the caches itself at torch's
thread count), this goes through ``generate``'s decode loop, where torch runs one thread around the
one-row kernels. Writes ``benchmarks/results/generate_context.md``.
"""

from __future__ import annotations

import argparse
import json

from flashtier.benchmarks.common import PY, REPO, run_json

CHILD = r"""
import json, sys
from flashtier.runtime.engine import EngineConfig, Model
model, context, tokens, dtype = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
ids = [(7 * j) % 1000 + 1 for j in range(context)]
out = {}
for attention in ("full", "retrieval"):
    with Model(model, EngineConfig.from_options(compute_dtype=dtype, threads=2, attention=attention)) as llm:
        r = llm.generate(ids, max_new_tokens=tokens, ignore_eos=True)
        out[attention] = {"ms_per_token": round(1e3 / r.stats["decode_tok_s"], 3), "tokens": r.tokens[:8],
                          "search_ms": r.stats.get("attention_search_ms_per_step"),
                          "gather_ms": r.stats.get("attention_gather_ms_per_step")}
print(json.dumps(out))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "models" / "tiny-moe-16k"))
    ap.add_argument("--context", type=int, default=16000)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--compute-dtype", default="float32")
    args = ap.parse_args()
    rows = []
    for _ in range(args.rounds):
        r = run_json([PY, "-c", CHILD, args.model, str(args.context), str(args.tokens), args.compute_dtype],
                     timeout=3600)
        if "full" not in r:
            raise SystemExit(f"run failed: {r}")
        rows.append(r)
    lines = [f"{args.model}, {args.context}-token prompt, {args.tokens} new tokens, {args.compute_dtype}, 2 threads, "
             "Model.generate", "",
             "| round | full attention ms/token | retrieval ms/token | retrieval search ms/step | gather ms/step |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {i} | {r['full']['ms_per_token']:.2f} | {r['retrieval']['ms_per_token']:.2f} | "
              f"{r['retrieval']['search_ms']} | {r['retrieval']['gather_ms']} |" for i, r in enumerate(rows, 1)]
    text = "\n".join(lines) + "\n"
    (REPO / "benchmarks" / "results").mkdir(exist_ok=True)
    (REPO / "benchmarks" / "results" / "generate_context.md").write_text(text)
    print(text)
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
