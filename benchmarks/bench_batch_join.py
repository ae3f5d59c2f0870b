"""A request joining a running one under a memory cap: the cost of each step while its prompt is
prefilled chunk by chunk beside the running sequence's decode (continuous batching).

    python -m flashtier.benchmarks.bench_batch_join [--rounds 2] [--prompt-tokens 1024] [--chunk 128]

dense-1.7g bf16 (``bench_out/gguf-dense-fit``, made by ``make-model --preset dense-1.7g``) under a
1 GiB ``memcap.sh`` with ``--dram-budget 700M``: a 16-token request decodes, then a long prompt
joins with ``admit_many(interleave=True)``; reports the seconds per step until the joiner's first
token (each step: one prefill chunk of the joiner and one token of the running request) and
whether both got their tokens alone. Writes ``benchmarks/results/batch_join.md``.
"""

from __future__ import annotations

import argparse
import json

from flashtier.benchmarks.common import PY, REPO, ensure_model, run_json

CHILD = r"""
import json, sys, time
from flashtier.runtime import open_model
from flashtier.runtime.engine import BatchSession
from flashtier.runtime.sampling import SamplingConfig
path, budget, plen, chunk = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
greedy = SamplingConfig(temperature=0.0)
short, long = list(range(1, 17)), [(7 * j) % 1000 + 1 for j in range(plen)]
with open_model(path, dram_budget=budget, max_context=plen + 80, kv_sequences=2, threads=2, prefill_chunk=chunk) as llm:
    with BatchSession(llm, 2) as s:
        (a, ev), = s.admit_many([(short, 40, greedy, (), True)])
        got = {id(a): [e.token_id for e in ev if e.token_id is not None]}
        for _ in range(2):
            for seq, evs in s.step():
                got[id(seq)] += [e.token_id for e in evs if e.token_id is not None]
        (b, _), = s.admit_many([(long, 8, greedy, (), True)], interleave=True)
        got[id(b)] = []
        t0, steps = time.perf_counter(), 0
        while b in s.prefilling:
            for seq, evs in s.step():
                got[id(seq)] += [e.token_id for e in evs if e.token_id is not None]
            steps += 1
        dt = time.perf_counter() - t0
        while not (a.finished and b.finished):
            for seq, evs in s.step():
                got[id(seq)] += [e.token_id for e in evs if e.token_id is not None]
    alone = [llm.generate(p, max_new_tokens=n, ignore_eos=True).tokens for p, n in ((short, 40), (long, 8))]
    print(json.dumps({"join_steps": steps, "s_per_step": round(dt / steps, 3),
                      "same_as_alone": [got[id(a)], got[id(b)]] == alone}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=128, help="prefill chunk (default 128)")
    args = ap.parse_args()
    path = ensure_model(REPO / "bench_out" / "gguf-dense-fit", "dense-1.7g")
    rows = []
    for _ in range(args.rounds):
        r = run_json([PY, "-c", CHILD, str(path), "700M", str(args.prompt_tokens), str(args.chunk)], cap="1G",
                     timeout=3600)
        if "s_per_step" not in r:
            raise SystemExit(f"run failed: {r}")
        rows.append(r)
    lines = [f"dense-1.7g bf16 under a 1 GiB cap, --dram-budget 700M, 2 threads: a {args.prompt_tokens}-token prompt "
             f"joins a decoding request in chunks of {args.chunk}", "",
             "| round | steps until its first token | s per step | both = alone | peak MiB |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {i} | {r['join_steps']} | {r['s_per_step']:.3f} | {'yes' if r['same_as_alone'] else 'NO'} | "
              f"{r.get('peak_cgroup_mib')} |" for i, r in enumerate(rows, 1)]
    text = "\n".join(lines) + "\n"
    (REPO / "benchmarks" / "results").mkdir(exist_ok=True)
    (REPO / "benchmarks" / "results" / "batch_join.md").write_text(text)
    print(text)
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
