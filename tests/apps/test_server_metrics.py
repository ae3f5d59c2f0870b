"""``/metrics`` (Prometheus text) and ``/v1/flashtier/stats`` (JSON for the web page), on a model
paged through the tiered store so per-tier bytes and hit rates are there to report; the latency
histograms and the queue length after real requests; and the ``flashtier serve`` command end to end."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="[^"]*"'
SAMPLE = re.compile(rf'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{{{LABEL}(,{LABEL})*\}})? (-?[0-9.]+(e[+-]?[0-9]+)?|NaN|[+-]Inf)$')


def parse_prometheus(text: str) -> dict[str, float]:
    """``{"name{labels}": value}``; asserts the exposition format (TYPE before samples, valid lines;
    a histogram's samples are its ``_bucket`` / ``_sum`` / ``_count`` series)."""
    typed: set[str] = set()
    samples: dict[str, float] = {}
    for line in text.strip().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram"), line
            typed |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else {name}
        elif line.startswith("# HELP "):
            continue
        else:
            m = SAMPLE.match(line)
            assert m, f"not a Prometheus sample line: {line!r}"
            assert m.group(1) in typed, f"{m.group(1)} has no # TYPE line"
            samples[m.group(1) + (m.group(2) or "")] = float(m.group(4))
    return samples


def histogram(samples: dict[str, float], name: str) -> tuple[list[tuple[float, float]], float, float]:
    """``([(le, cumulative count)] in exposition order, sum, count)`` of histogram ``name``;
    asserts the buckets are cumulative (never decreasing) and end with ``+Inf`` equal to the count."""
    buckets = [(float(key.split('le="')[1].rstrip('"}')), value) for key, value in samples.items()
               if key.startswith(f'{name}_bucket{{le="')]
    assert len(buckets) >= 2 and buckets[-1][0] == float("inf"), buckets
    assert [le for le, _ in buckets] == sorted(le for le, _ in buckets), "bucket bounds out of order"
    assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:])), f"{name} buckets are not cumulative: {buckets}"
    count = samples[f"{name}_count"]
    assert buckets[-1][1] == count
    return buckets, samples[f"{name}_sum"], count


@pytest.fixture(scope="module")
def paged_server(chat_model_dir, server_factory, model_loader):
    from flashtier.apps.server import ServerConfig, create_app

    # 1600K is just above this model's minimum: some weights stream from storage every token.
    app = create_app(model_loader(chat_model_dir, dram_budget="1600K"), ServerConfig("chat-model"))
    live = server_factory(app)
    assert app.state.worker.wait_ready(timeout=60)
    yield live
    live.stop()


def test_prometheus_metrics(paged_server):
    with httpx.Client(base_url=paged_server.base_url, timeout=60) as http:
        r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
                                                     "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200
        assert http.post("/v1/completions", json={"prompt": ""}).status_code == 400
        page = http.get("/metrics")
    assert page.headers["content-type"].startswith("text/plain; version=0.0.4")
    m = parse_prometheus(page.text)
    assert m["flashtier_requests_total"] == 2 and m["flashtier_requests_failed_total"] == 1
    assert m["flashtier_generated_tokens_total"] == 5
    assert m["flashtier_last_request_decode_tok_s"] > 0 and m["flashtier_last_request_prefill_tok_s"] > 0
    assert m["flashtier_model_ready"] == 1 and m["flashtier_queue_depth"] == 0
    assert m['flashtier_tier_resident_bytes{tier="storage"}'] > m['flashtier_tier_resident_bytes{tier="host"}'] > 0
    assert m["flashtier_last_request_bytes_read_storage"] > 0  # bytes moved up from storage
    assert 0 <= m['flashtier_tier_hit_rate{tier="host"}'] <= 1
    assert m["flashtier_kv_bytes"] > 0 and m["flashtier_peak_rss_bytes"] > 0


def test_stats_json_for_the_page(paged_server):
    stats = httpx.get(f"{paged_server.base_url}/v1/flashtier/stats", timeout=30).json()
    assert stats["state"] == "ready" and stats["live"] is None and stats["queue_depth"] == 0
    assert set(stats["tiers"]) >= {"host", "storage"} and "resident_bytes" in stats["tiers"]["host"]
    assert stats["last"]["generated_tokens"] >= 1 and "host" in stats["hit_rates"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_end_to_end(chat_model_dir):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "flashtier", "serve", str(chat_model_dir), "--port", str(port),
                             "--threads", "1", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:  # the test waits for a fresh process to start; the server itself never polls
            try:
                if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "flashtier serve did not become healthy within 90 s"
            time.sleep(0.2)
        r = httpx.post(f"{base}/v1/chat/completions", timeout=60, json={
            "model": chat_model_dir.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert r.status_code == 200 and r.json()["model"] == chat_model_dir.name
        assert "<title>flashtier chat</title>" in httpx.get(base + "/", timeout=30).text
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal: -15 is a clean exit.
    assert proc.returncode in (0, -signal.SIGTERM) and "Traceback" not in err, err


def test_serve_command_refuses_a_missing_model_in_one_line(tmp_path, capsys):
    from flashtier.apps.cli import main

    assert main(["serve", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- latency histograms and the queue

async def _timed_stream(http: httpx.AsyncClient, max_tokens: int, k: int) -> tuple[int, float, float]:
    """Stream a text completion of ``max_tokens`` tokens; (completion tokens, seconds from sending to
    the first text, seconds from sending to the end)."""
    t0 = time.perf_counter()
    first = None
    usage = None
    body = {"prompt": f"def f{k}(x):", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    async with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and any(c["text"] for c in chunk["choices"]):
                first = time.perf_counter() - t0
            usage = chunk.get("usage") or usage
    assert first is not None and usage is not None
    return usage["completion_tokens"], first, time.perf_counter() - t0


@pytest.mark.parametrize("max_batch", [1, 3])
def test_latency_histograms_count_every_token_of_real_requests(chat_model_dir, server_factory, model_loader,
                                                                max_batch):
    """4 concurrent streams of 5/9/13/17 tokens and one non-streamed answer of 4: time to first token
    is observed once per request that produced a token (5), inter-token latency once per token
    after each request's first (4 + 8 + 12 + 16 + 3 = 43), and both agree with the client's clock."""
    import asyncio

    from flashtier.apps.server import ServerConfig, create_app

    app = create_app(model_loader(chat_model_dir), ServerConfig("chat-model", max_batch=max_batch))
    live = server_factory(app)
    assert app.state.worker.wait_ready(timeout=60)

    async def scenario() -> tuple[list[tuple[int, float, float]], float]:
        async with httpx.AsyncClient(base_url=live.base_url, timeout=60) as http:
            assert (await http.post("/v1/completions", json={"prompt": ""})).status_code == 400  # no token
            t0 = time.perf_counter()
            plain = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 4, "temperature": 0,
                                                       "ignore_eos": True})
            streams = await asyncio.gather(*(_timed_stream(http, n, n) for n in (5, 9, 13, 17)), plain)
            assert streams[-1].status_code == 200 and streams[-1].json()["usage"]["completion_tokens"] == 4
            return list(streams[:-1]), time.perf_counter() - t0

    streams, wall = asyncio.run(scenario())
    assert [n for n, _, _ in streams] == [5, 9, 13, 17]
    m = parse_prometheus(httpx.get(f"{live.base_url}/metrics", timeout=30).text)
    _, ttft_sum, ttft_count = histogram(m, "flashtier_time_to_first_token_seconds")
    itl_buckets, itl_sum, itl_count = histogram(m, "flashtier_inter_token_latency_seconds")
    assert ttft_count == 5 and itl_count == 4 + 8 + 12 + 16 + 3
    # the server's clock starts later and stops earlier than the client's
    assert 0 < ttft_sum <= sum(first for _, first, _ in streams) + wall
    assert 0 < itl_sum <= sum(total for _, _, total in streams) + wall
    assert itl_buckets[0][1] <= itl_count  # (monotone and +Inf == count: checked by histogram())
    assert m["flashtier_queue_length"] == 0 and m["flashtier_requests_timed_out_total"] == 0
    latency = httpx.get(f"{live.base_url}/v1/flashtier/stats", timeout=30).json()["latency"]
    assert latency["time_to_first_token"]["count"] == 5 and latency["inter_token_latency"]["count"] == 43
    for name, prometheus_sum in (("time_to_first_token", ttft_sum), ("inter_token_latency", itl_sum)):
        assert 0 < latency[name]["p50"] <= latency[name]["p99"]
        assert latency[name]["sum"] == pytest.approx(prometheus_sum, abs=1e-5)
    live.stop()


def test_queue_length_counts_the_requests_waiting(chat_model_dir, server_factory, slow_model_loader, hold_stream):
    """One request at a time: while a long generation runs, two more wait; the gauge and the JSON
    say 2 waiting (3 with the running one), then 0 once the clients have gone."""
    import threading

    from flashtier.apps.server import ServerConfig, create_app

    app = create_app(slow_model_loader(chat_model_dir, 0.01), ServerConfig("chat-model"))
    live = server_factory(app)
    assert app.state.worker.wait_ready(timeout=60)
    stop = threading.Event()
    threads = [threading.Thread(target=hold_stream, args=(live.base_url, stop)) for _ in range(3)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while True:  # the test waits for three clients to be queued; the server itself never polls
            m = parse_prometheus(httpx.get(f"{live.base_url}/metrics", timeout=30).text)
            if m["flashtier_queue_depth"] == 3 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert m["flashtier_queue_length"] == 2 and m["flashtier_queue_depth"] == 3
        stats = httpx.get(f"{live.base_url}/v1/flashtier/stats", timeout=30).json()
        assert stats["queue_length"] == 2
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    deadline = time.monotonic() + 20
    while app.state.worker.queue_depth and time.monotonic() < deadline:
        time.sleep(0.05)
    m = parse_prometheus(httpx.get(f"{live.base_url}/metrics", timeout=30).text)
    assert m["flashtier_queue_length"] == 0 and m["flashtier_requests_cancelled_total"] == 3
    live.stop()


def test_histogram_buckets_and_quantiles():
    from flashtier.apps.server.metrics import Histogram

    h = Histogram((0.1, 1.0), window=3)
    for v in (0.05, 0.1, 0.5, 2.0):  # le is inclusive: 0.1 counts in the 0.1 bucket
        h.observe(v)
    assert h.cumulative() == [("0.1", 2), ("1.0", 3), ("+Inf", 4)]
    assert h.count == 4 and h.sum == pytest.approx(2.65)
    assert (h.quantile(0.5), h.quantile(0.99)) == (0.5, 2.0)  # over the last 3: 0.1, 0.5, 2.0
    assert Histogram((1.0,)).summary() == {"count": 0, "sum": 0.0, "window": 0, "p50": None, "p99": None}
    with pytest.raises(ValueError, match="strictly increasing"):
        Histogram((1.0, 0.5))


def test_live_progress_covers_every_running_generation():
    """With batching several generations run at once: ``live`` counts all of them until each ends."""
    from flashtier.apps.server.metrics import Outcome, ServerMetrics

    m = ServerMetrics()
    assert m.snapshot()["live"] is None
    m.job_started(1)
    m.job_started(2)
    m.job_progress(1, 5)
    m.job_progress(2, 3)
    live = m.snapshot()["live"]
    assert live["running"] == 2 and live["generated_tokens"] == 8 and live["tok_s"] > 0
    m.job_finished(1, {"generated_tokens": 5}, Outcome.DONE)  # one ends: the other is still live
    assert m.snapshot()["live"]["running"] == 1 and m.snapshot()["live"]["generated_tokens"] == 3
    m.job_failed(2)
    assert m.snapshot()["live"] is None
    m.job_progress(7, 1)  # progress of a generation that is not running is ignored
    assert m.snapshot()["live"] is None
