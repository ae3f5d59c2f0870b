"""Serving throughput with continuous batching, under a memory cap.

    python -m flashtier.benchmarks.bench_serve_batch [--scenario dense-big] [--clients 8] [--batches 1,8]

For each ``--max-batch`` value, ``flashtier serve`` runs the scenario's Q4_K_M GGUF (made by
``bench_gguf``) under ``memcap.sh`` with flashtier's budget; ``--clients`` clients each send one
text completion at the same time (different 16-token-ish prompts, greedy, ``--tokens`` new tokens,
``ignore_eos``; prompts as token ids, since the random-weight files have no tokenizer). Reports the
wall time until every answer is complete and the aggregate generated tokens/s (that batching
leaves each request's tokens unchanged is checked by ``bench_batch`` and the server tests). Writes
``benchmarks/results/serve_batch_<scenario>.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import time

import httpx

from flashtier.benchmarks.common import MEMCAP, PY, REPO

SCENARIOS = {"dense-big": ("bench_out/gguf-dense-big-q4_k_m.gguf", "1G", "650M"),
             "dense-fit": ("bench_out/gguf-dense-fit-q4_k_m.gguf", "1G", None)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def clients(base: str, n: int, tokens: int) -> tuple[float, list[int]]:
    async with httpx.AsyncClient(base_url=base, timeout=3600) as http:
        async def one(i: int) -> int:
            r = await http.post("/v1/completions", json={
                "model": "m", "prompt": list(range(1 + 7 * i, 17 + 7 * i)), "max_tokens": tokens,
                "temperature": 0, "ignore_eos": True})
            r.raise_for_status()
            return int(r.json()["usage"]["completion_tokens"])

        t0 = time.perf_counter()
        texts = await asyncio.gather(*(one(i) for i in range(n)))
        return time.perf_counter() - t0, list(texts)


def serve(path: str, cap: str, budget: str | None, batch: int, port: int) -> subprocess.Popen:
    cmd = ["bash", str(MEMCAP), cap, "--", PY, "-m", "flashtier", "serve", path, "--port", str(port),
           "--model-name", "m", "--max-batch", str(batch), "--max-context", "96", "--log-level", "warning"]
    if budget:
        cmd += ["--dram-budget", budget]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", default="dense-big", choices=sorted(SCENARIOS))
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=12)
    ap.add_argument("--batches", default="1,8")
    args = ap.parse_args()
    rel, cap, budget = SCENARIOS[args.scenario]
    path = str(REPO / rel)
    if not os.path.exists(path):
        raise SystemExit(f"{path} is missing: run `python -m flashtier.benchmarks.bench_gguf --scenario {args.scenario}`")
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        port = free_port()
        proc = serve(path, cap, budget, batch, port)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 600
            while time.time() < deadline:
                try:
                    if httpx.get(f"{base}/health", timeout=5).json().get("status") == "ok":
                        break
                except (httpx.HTTPError, ValueError):
                    pass
                if proc.poll() is not None:
                    raise SystemExit(f"server exited: {proc.stderr.read()[-500:] if proc.stderr else ''}")
                time.sleep(0.5)
            wall, texts = asyncio.run(clients(base, args.clients, args.tokens))
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)
        rows.append((batch, wall, sum(texts) / wall, texts == [args.tokens] * args.clients))
    lines = [f"{args.scenario} Q4_K_M served under a {cap} cap, --dram-budget {budget or 'none'}; {args.clients} "
             f"concurrent completions of {args.tokens} tokens (greedy)", "",
             "| --max-batch | wall s (all answers) | aggregate tokens/s | every answer complete |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {b} | {w:.1f} | {t:.2f} | {'yes' if same else 'NO'} |" for b, w, t, same in rows]
    text = "\n".join(lines) + "\n"
    (REPO / "benchmarks" / "results").mkdir(exist_ok=True)
    (REPO / "benchmarks" / "results" / f"serve_batch_{args.scenario.replace('-', '_')}.md").write_text(text)
    print(text)
    return 0 if all(r[3] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
