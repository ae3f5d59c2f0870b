"""Serving with continuous batching: throughput, time to first token, and that nothing is lost,
mixed or truncated.

    python -m flashtier.benchmarks.bench_serve_batch [--scenario dense-big] [--clients 8] [--batches 1,8]
    python -m flashtier.benchmarks.bench_serve_batch --scenario tiny-moe [--clients 32 --requests 4 --tokens 32]

For each ``--max-batch`` value a fresh ``flashtier serve`` runs the scenario's model, then:

* ``dense-big`` / ``dense-fit``: the Q4_K_M GGUF made by ``bench_gguf``, under ``memcap.sh`` with
  flashtier's budget; ``--clients`` clients each send one text completion at the same time
  (different 16-token-ish prompts as token ids, since the random-weight files have no tokenizer;
  greedy, ``--tokens`` new tokens, ``ignore_eos``). Reports the wall time until every answer is
  complete and the aggregate generated tokens/s.
* ``tiny-moe`` (the issue's load check): the shipped default model; every one of the
  ``clients x requests`` requests is different (half chat, half text completion, greedy, at most
  ``--tokens`` tokens, ending where the model ends them) and is first run alone, one after the
  other; then ``--clients`` clients of the real ``openai`` client (``AsyncOpenAI``) each stream
  their ``--requests`` requests one after the other, all clients at once. Checked: none lost (every
  request answered, no error), none mixed or truncated (each stream's text, finish reason and usage
  equal the same request's alone), and the answers alone equal across ``--max-batch`` values.
  Reported: p50 / p99 time to first token (client's clock: request sent -> first text) and
  aggregate tokens/s (completion tokens of all streams / wall time of the load).

Writes ``benchmarks/results/serve_batch_<scenario>.md``; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import Any

import httpx

from flashtier.benchmarks.common import MEMCAP, PY, REPO


@dataclass(frozen=True, slots=True)
class Scenario:
    """A model served one way and the load sent to it."""

    model: str
    """Path under the repository: a model folder or a GGUF file."""
    cap: str | None
    """memcap.sh memory cap of the server process (None: no cap)."""
    budget: str | None
    """--dram-budget (None: weights in memory)."""
    streaming: bool
    """True: openai-client streams checked against their answers alone; False: one plain completion
    per client, prompts as token ids."""
    clients: int
    requests: int
    """Requests per client, sent one after the other."""
    tokens: int
    max_context: int | None
    threads: int | None = None
    """--threads of the server (None: torch's choice)."""


SCENARIOS = {"dense-big": Scenario("bench_out/gguf-dense-big-q4_k_m.gguf", "1G", "650M", False, 8, 1, 12, 96),
             "dense-fit": Scenario("bench_out/gguf-dense-fit-q4_k_m.gguf", "1G", None, False, 8, 1, 12, 96),
             # one thread: the fastest for a model this small (the clients share the machine's cores)
             "tiny-moe": Scenario("models/tiny-moe", None, None, True, 32, 4, 32, None, threads=1)}


@dataclass(frozen=True, slots=True)
class Answer:
    """One streamed request's outcome: what must equal the request alone, and its timing."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    """Request sent -> first chunk with text."""
    total_s: float
    """Request sent -> end of the stream."""

    def content(self) -> tuple[str, str | None, int, int]:
        return self.text, self.finish_reason, self.prompt_tokens, self.completion_tokens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- GGUF scenarios: one completion per client
async def plain_clients(base: str, n: int, tokens: int) -> tuple[float, list[int]]:
    async with httpx.AsyncClient(base_url=base, timeout=3600) as http:
        async def one(i: int) -> int:
            r = await http.post("/v1/completions", json={
                "model": "m", "prompt": list(range(1 + 7 * i, 17 + 7 * i)), "max_tokens": tokens,
                "temperature": 0, "ignore_eos": True})
            r.raise_for_status()
            return int(r.json()["usage"]["completion_tokens"])

        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one(i) for i in range(n)))
        return time.perf_counter() - t0, list(counts)


# ---------------------------------------------------------------- tiny-moe: openai streams vs alone
def request_kwargs(k: int, tokens: int) -> dict[str, Any]:
    """The k-th distinct request: even ones chat, odd ones text completion."""
    common: dict[str, Any] = dict(model="m", max_tokens=tokens, temperature=0, stream=True,
                                  stream_options={"include_usage": True})
    if k % 2 == 0:
        return dict(common, messages=[{"role": "user", "content": f"Question {k}: what is {k} plus {k % 7}?"}])
    return dict(common, prompt=f"Story {k}: once upon a time, a fox named {k}")


async def stream_one(client: Any, k: int, tokens: int) -> Answer:
    kwargs = request_kwargs(k, tokens)
    chat = "messages" in kwargs
    t0 = time.perf_counter()
    stream = await (client.chat.completions.create(**kwargs) if chat else client.completions.create(**kwargs))
    parts: list[str] = []
    finish = None
    usage = None
    ttft = None
    async with stream:
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                piece = (choice.delta.content or "") if chat else choice.text
                if piece and ttft is None:
                    ttft = time.perf_counter() - t0
                parts.append(piece)
                finish = choice.finish_reason or finish
    if usage is None:
        raise RuntimeError(f"request {k}: the stream ended without usage")
    total = time.perf_counter() - t0
    return Answer("".join(parts), finish, usage.prompt_tokens, usage.completion_tokens,
                  ttft if ttft is not None else total, total)


async def streaming_load(base: str, s: Scenario) -> dict[str, Any]:
    """Every request alone, then all clients at once; the checks and the figures."""
    import openai

    n = s.clients * s.requests
    async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=600) as client:
        alone = [await stream_one(client, k, s.tokens) for k in range(n)]

        async def one_client(i: int) -> list[tuple[int, Answer | BaseException]]:
            out: list[tuple[int, Answer | BaseException]] = []
            for j in range(s.requests):
                k = i * s.requests + j
                try:
                    out.append((k, await stream_one(client, k, s.tokens)))
                except Exception as e:  # noqa: BLE001 - a lost request is counted, not fatal
                    out.append((k, e))
            return out

        t0 = time.perf_counter()
        per_client = await asyncio.gather(*(one_client(i) for i in range(s.clients)))
        wall = time.perf_counter() - t0
    results = dict(r for rs in per_client for r in rs)
    answers = {k: a for k, a in results.items() if isinstance(a, Answer)}
    lost = n - len(answers)
    differ = sorted(k for k, a in answers.items() if a.content() != alone[k].content())
    cut = sorted(k for k, a in answers.items()  # ended elsewhere than alone (fewer tokens, or another reason)
                 if (a.finish_reason, a.completion_tokens) != (alone[k].finish_reason, alone[k].completion_tokens))
    ttfts = sorted(a.ttft_s for a in answers.values())
    tokens = sum(a.completion_tokens for a in answers.values())
    errors = sorted({f"{type(e).__name__}: {e}" for e in results.values() if isinstance(e, BaseException)})
    return {"alone": [a.content() for a in alone], "lost": lost, "differ": differ, "cut": cut, "errors": errors[:3],
            "wall_s": wall, "tokens": tokens, "tok_s": tokens / wall,
            "ttft_p50": _quantile(ttfts, 0.5), "ttft_p99": _quantile(ttfts, 0.99),
            "alone_tok_s": sum(a.completion_tokens for a in alone) / sum(a.total_s for a in alone)}


def _quantile(ordered: list[float], q: float) -> float:
    """Nearest-rank quantile of sorted values (NaN when empty)."""
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


# ---------------------------------------------------------------- the server
def serve(s: Scenario, batch: int, port: int) -> subprocess.Popen:
    cmd = [PY, "-m", "flashtier", "serve", str(REPO / s.model), "--port", str(port), "--model-name", "m",
           "--max-batch", str(batch), "--log-level", "warning"]
    if s.max_context:
        cmd += ["--max-context", str(s.max_context)]
    if s.threads:
        cmd += ["--threads", str(s.threads)]
    if s.budget:
        cmd += ["--dram-budget", s.budget]
    if s.cap:
        cmd = ["bash", str(MEMCAP), s.cap, "--", *cmd]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_healthy(base: str, proc: subprocess.Popen, timeout_s: float = 600) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:  # a fresh process: nothing to wait on but its port
        try:
            if httpx.get(f"{base}/health", timeout=5).json().get("status") == "ok":
                return
        except (httpx.HTTPError, ValueError):
            pass
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read()[-500:] if proc.stderr else ''}")
        time.sleep(0.5)
    raise SystemExit(f"the server did not become healthy within {timeout_s:.0f} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", default="dense-big", choices=sorted(SCENARIOS))
    ap.add_argument("--clients", type=int, default=None, help="concurrent clients (default: the scenario's)")
    ap.add_argument("--requests", type=int, default=None, help="requests per client, one after the other "
                                                                "(streaming scenarios; default: the scenario's)")
    ap.add_argument("--tokens", type=int, default=None, help="max new tokens per request (default: the scenario's)")
    ap.add_argument("--batches", default="1,8", help="--max-batch values to serve with, one server each")
    args = ap.parse_args()
    base_s = SCENARIOS[args.scenario]
    s = dataclasses.replace(base_s, clients=args.clients or base_s.clients, requests=args.requests or base_s.requests,
                            tokens=args.tokens or base_s.tokens)
    if min(s.clients, s.requests, s.tokens) < 1:
        raise SystemExit("--clients, --requests and --tokens must be >= 1")
    if not os.path.exists(REPO / s.model):
        raise SystemExit(f"{REPO / s.model} is missing: run `python -m flashtier.benchmarks.bench_gguf "
                         f"--scenario {args.scenario}`")
    rows: list[tuple[int, dict[str, Any]]] = []
    for batch in [int(b) for b in args.batches.split(",")]:
        port = free_port()
        proc = serve(s, batch, port)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(base, proc)
            if s.streaming:
                rows.append((batch, asyncio.run(streaming_load(base, s))))
            else:
                wall, counts = asyncio.run(plain_clients(base, s.clients, s.tokens))
                rows.append((batch, {"wall_s": wall, "tok_s": sum(counts) / wall,
                                     "ok": counts == [s.tokens] * s.clients}))
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)
    text, ok = (streaming_table if s.streaming else plain_table)(args.scenario, s, rows)
    (REPO / "benchmarks" / "results").mkdir(exist_ok=True)
    (REPO / "benchmarks" / "results" / f"serve_batch_{args.scenario.replace('-', '_')}.md").write_text(text)
    print(text)
    return 0 if ok else 1


def plain_table(name: str, s: Scenario, rows: list[tuple[int, dict[str, Any]]]) -> tuple[str, bool]:
    lines = [f"{name} Q4_K_M served under a {s.cap} cap, --dram-budget {s.budget or 'none'}; {s.clients} "
             f"concurrent completions of {s.tokens} tokens (greedy)", "",
             "| --max-batch | wall s (all answers) | aggregate tokens/s | every answer complete |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {b} | {r['wall_s']:.1f} | {r['tok_s']:.2f} | {'yes' if r['ok'] else 'NO'} |" for b, r in rows]
    return "\n".join(lines) + "\n", all(r["ok"] for _, r in rows)


def streaming_table(name: str, s: Scenario, rows: list[tuple[int, dict[str, Any]]]) -> tuple[str, bool]:
    n = s.clients * s.requests
    same_alone = all(r["alone"] == rows[0][1]["alone"] for _, r in rows)
    lines = [f"{name} ({s.model}) served by `flashtier serve --max-batch B`; {s.clients} clients of the openai "
             f"client x {s.requests} streamed requests each ({n} different requests, half chat, half text "
             f"completion, greedy, at most {s.tokens} tokens); server --threads {s.threads or 'default'}, "
             f"{os.cpu_count()} CPU cores", "",
             "| --max-batch | lost | differ from alone | of which end differently | TTFT p50 s | TTFT p99 s | "
             "aggregate tokens/s | wall s | tokens | alone, one after the other: tokens/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for b, r in rows:
        lines.append(f"| {b} | {r['lost']} | {len(r['differ'])} | {len(r['cut'])} | {r['ttft_p50']:.2f} | "
                     f"{r['ttft_p99']:.2f} | "
                     f"{r['tok_s']:.1f} | {r['wall_s']:.1f} | {r['tokens']} | {r['alone_tok_s']:.1f} |")
    lines += ["", f"Answers alone identical across --max-batch values: {'yes' if same_alone else 'NO'}."]
    for b, r in rows:
        if r["errors"] or r["differ"]:
            lines.append(f"--max-batch {b}: errors {r['errors']}, differing requests {r['differ'][:10]}")
    ok = same_alone and all(r["lost"] == 0 and not r["differ"] for _, r in rows)
    return "\n".join(lines) + "\n", ok


if __name__ == "__main__":
    raise SystemExit(main())
