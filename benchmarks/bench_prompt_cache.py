"""Time to first token of a long prompt with the prompt cache on storage, in a second process.

    python -m flashtier.benchmarks.bench_prompt_cache [--tokens 16000] [--rounds 2]

A ``--tokens``-token prompt (the README's own text, tokenized, repeated) on tiny-moe-16k, full
attention. Each round, three fresh processes: no prompt cache (a full prefill), a cold cache (full
prefill, blocks written), and a warm cache (a new process loads the blocks and prefills the rest).
Time to first token is the wall time from the call to the first token, the cache load included.
The three must agree exactly: same greedy tokens, and the same K/V at every prompt position (a
hash of all layers' cache), so the logits are the prefill's own. Writes
``benchmarks/results/prompt_cache.md``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from flashtier.benchmarks.common import REPO

CHILD = r"""
import hashlib, json, sys, time, torch
from flashtier.runtime import open_model
ids = json.load(open(sys.argv[1])); folder = sys.argv[2] or None
with open_model(sys.argv[3], prompt_cache=folder) as llm:
    t0 = time.perf_counter()
    it = llm.stream(ids, max_new_tokens=16, ignore_eos=True)
    first = next(it); ttft = time.perf_counter() - t0
    tokens = [first.token_id] + [e.token_id for e in it if e.token_id is not None]
    kv = hashlib.sha1()
    for layer in range(llm.cache.num_layers):
        k, v = llm.cache.read(layer, len(ids))
        kv.update(k.contiguous().view(torch.uint8).numpy().tobytes()); kv.update(v.contiguous().view(torch.uint8).numpy().tobytes())
    s = llm.prompt_cache.report() if llm.prompt_cache else {}
print(json.dumps({"ttft_s": ttft, "tokens": tokens, "kv": kv.hexdigest()[:12], **s}))
"""


def child(ids_file: Path, folder: str, model: Path) -> dict:
    p = subprocess.run([sys.executable, "-c", CHILD, str(ids_file), folder, str(model)], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(p.stderr)
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "models" / "tiny-moe-16k"))
    ap.add_argument("--tokens", type=int, default=16000)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    from flashtier.runtime.tokenizer import Tokenizer

    text = (REPO / "README.md").read_text()
    ids = Tokenizer(Path(args.model)).encode(text)
    ids = (ids * (args.tokens // len(ids) + 1))[: args.tokens]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ids_file = Path(tmp) / "ids.json"
        ids_file.write_text(json.dumps(ids))
        for _ in range(args.rounds):
            folder = Path(tmp) / "cache"
            shutil.rmtree(folder, ignore_errors=True)
            plain = child(ids_file, "", Path(args.model))
            cold = child(ids_file, str(folder), Path(args.model))
            warm = child(ids_file, str(folder), Path(args.model))
            same = plain["tokens"] == cold["tokens"] == warm["tokens"] and plain["kv"] == cold["kv"] == warm["kv"]
            rows.append((plain, cold, warm, same))
    lines = [f"tiny-moe-16k, {args.tokens}-token prompt, full attention, 2 cores; time to first token (s)", "",
             "| round | no cache | cold cache (writes) | warm cache, new process | speed-up | blocks loaded | load s | tokens and K/V identical |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for i, (plain, cold, warm, same) in enumerate(rows, 1):
        lines.append(f"| {i} | {plain['ttft_s']:.2f} | {cold['ttft_s']:.2f} | {warm['ttft_s']:.3f} | "
                     f"{plain['ttft_s'] / warm['ttft_s']:.1f}x | {warm['prompt_cache_blocks_loaded']} | "
                     f"{warm['prompt_cache_load_s']:.3f} | {'yes' if same else 'NO'} |")
    out = "\n".join(lines) + "\n"
    (REPO / "benchmarks" / "results").mkdir(exist_ok=True)
    (REPO / "benchmarks" / "results" / "prompt_cache.md").write_text(out)
    print(out)
    return 0 if all(r[3] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
