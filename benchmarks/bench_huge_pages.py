"""Transparent huge pages on and off, end to end: decode tokens/s of ``flashtier generate`` with
``--huge-pages on`` and ``off`` in alternating pairs (which one goes first alternates too), since
this shared machine's speed drifts more between minutes than the effect measured.

    python -m flashtier.benchmarks.bench_huge_pages [--model bench_out/dense-1.7g --pairs 6 --tokens 48]

Default model: ``make-model --preset dense-1.7g`` (bf16, 1.7 GB, all in memory, the one-row bf16
kernel streaming every weight per token). Extra ``generate`` options go after ``--``, e.g.
``-- --dram-budget 650M``. Reported: each pair's tokens/s, the median of each side and the median
of the per-pair ratios. The kernel alone: ``bench_matvec`` (its "huge pages" row).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from flashtier.benchmarks.common import PY, REPO, ensure_model, finish, machine, run_json


def generate_cmd(model: Path, tokens: int, threads: int, huge: str, extra: list[str]) -> list[str]:
    return [PY, "-m", "flashtier", "generate", str(model), "--prompt-ids", ",".join(str(i) for i in range(300, 308)),
            "--max-new-tokens", str(tokens), "--greedy", "--ignore-eos", "--json", "--threads", str(threads),
            "--huge-pages", huge, *extra]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="model folder or GGUF file (default: dense-1.7g, made if missing)")
    p.add_argument("--pairs", type=int, default=6)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cap", default=None, help="memory cap for every run (memcap.sh)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("extra", nargs="*", help="more generate options (after --)")
    a = p.parse_args(argv)
    model = a.model or ensure_model(REPO / "bench_out" / "dense-1.7g", "dense-1.7g")
    pairs: list[dict[str, Any]] = []
    for i in range(a.pairs):
        row: dict[str, Any] = {}
        for huge in (("on", "off") if i % 2 == 0 else ("off", "on")):
            r = run_json(generate_cmd(model, a.tokens, a.threads, huge, a.extra), cap=a.cap)
            if "error" in r:
                print(f"generate --huge-pages {huge} failed: {r['error']}")
                return 1
            row[huge] = float(r["stats"]["decode_tok_s"])
            if r.get("peak_cgroup_mib") is not None:
                row[f"{huge}_peak_mib"] = r["peak_cgroup_mib"]
        row["ratio"] = round(row["on"] / row["off"], 3)
        pairs.append(row)
        print(row, flush=True)
    result = {"machine": machine(), "model": str(model), "tokens": a.tokens, "threads": a.threads, "cap": a.cap,
              "extra": a.extra, "pairs": pairs,
              "on_tok_s_median": round(statistics.median(r["on"] for r in pairs), 2),
              "off_tok_s_median": round(statistics.median(r["off"] for r in pairs), 2),
              "ratio_median": round(statistics.median(r["ratio"] for r in pairs), 3),
              "pairs_on_faster": sum(r["on"] > r["off"] for r in pairs)}
    return finish(result, a.json, summary_skips=("pairs",))


if __name__ == "__main__":
    raise SystemExit(main())
