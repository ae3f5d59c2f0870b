"""Decode speed and tokens of this tree against another checkout of flashtier, interleaved.

    git worktree add /tmp/old COMMIT && cp _native*.so /tmp/old/   # same native build
    python -m flashtier.benchmarks.bench_ab --old-tree /tmp/old --rounds 2

Each round runs every configuration in a fresh process of the old tree, then of this one (same
files, same threads), and reports decode tokens/s and a hash of the generated tokens: a refactor
must leave the tokens identical and the speed within the machine's noise.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [
    ("dense-fit Q4_K_M exact", "bench_out/gguf-dense-fit-q4_k_m.gguf", {}),
    ("dense-fit Q4_K_M q8", "bench_out/gguf-dense-fit-q4_k_m.gguf", {"activations": "q8"}),
    ("moe Q4_K_M 420M", "bench_out/gguf-moe-q4_k_m.gguf", {"dram_budget": "420M"}),
    ("dense-big Q4_K_M 650M", "bench_out/gguf-dense-big-q4_k_m.gguf", {"dram_budget": "650M", "max_context": 64}),
    ("tiny-moe 16M", "models/tiny-moe", {"dram_budget": "16M"}),
    # session 9 (one store): expert arenas that evict, KV blocks spilled from their arena
    ("moe-big Q4_K_M 650M", "bench_out/gguf-moe-big-q4_k_m.gguf", {"dram_budget": "650M", "max_context": 64}),
    ("tiny-moe-16k retrieval, 3K prompt, KV spills", "models/tiny-moe-16k",
     {"dram_budget": "64M", "attention": "retrieval", "kv_dram_budget": "12M", "max_context": 4096, "_prompt": 3000}),
]
CHILD = r"""
import hashlib, json, sys
from flashtier.runtime import open_model
path, kw, tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
prompt = [1 + i % 200 for i in range(kw.pop("_prompt", 16))]
with open_model(path, threads=2, **kw) as llm:
    llm.generate(prompt[:16], max_new_tokens=2, ignore_eos=True)
    r = llm.generate(prompt, max_new_tokens=tokens, ignore_eos=True)
print(json.dumps({"tok_s": r.stats["decode_tok_s"], "tokens": hashlib.sha1(str(r.tokens).encode()).hexdigest()[:10]}))
"""


def run(tree_parent: Path | None, path: Path, kw: dict, tokens: int) -> dict:
    env = {"PYTHONPATH": str(tree_parent)} if tree_parent else {}
    import os

    p = subprocess.run([sys.executable, "-c", CHILD, str(path), json.dumps(kw), str(tokens)], capture_output=True,
                       text=True, env={**os.environ, **env}, cwd="/")
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old-tree", required=True, help="another flashtier checkout (its root folder)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--only", default=None, help="run the configurations whose name contains this text")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as parent:
        (Path(parent) / "flashtier").symlink_to(Path(args.old_tree).resolve())
        rows = []
        for name, rel, kw in CONFIGS:
            if args.only and args.only not in name:
                continue
            path = ROOT / rel
            if not path.exists():
                print(f"skip {name}: {path} missing (bench_gguf makes it)", file=sys.stderr)
                continue
            old, new = [], []
            for _ in range(args.rounds):
                old.append(run(Path(parent), path, kw, args.tokens))
                new.append(run(None, path, kw, args.tokens))
            same = {r.get("tokens") for r in old + new}
            rows.append((name, old, new, len(same) == 1 and None not in same))
    print("| run | before (tok/s) | after (tok/s) | tokens identical |")
    print("| --- | --- | --- | --- |")
    for name, old, new, same in rows:
        fmt = lambda rs: ", ".join(f"{r['tok_s']:.1f}" if "tok_s" in r else r.get("error", "?") for r in rs)  # noqa: E731
        print(f"| {name} | {fmt(old)} | {fmt(new)} | {'yes' if same else 'NO'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
