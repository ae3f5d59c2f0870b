"""``/metrics`` (Prometheus text) and ``/v1/flashtier/stats`` (JSON for the web page), on a model
paged through the tiered store so per-tier bytes and hit rates are there to report; and the
``flashtier serve`` command end to end."""

from __future__ import annotations

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
    """``{"name{labels}": value}``; asserts the exposition format (TYPE before samples, valid lines)."""
    typed: set[str] = set()
    samples: dict[str, float] = {}
    for line in text.strip().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge"), line
            typed.add(name)
        elif line.startswith("# HELP "):
            continue
        else:
            m = SAMPLE.match(line)
            assert m, f"not a Prometheus sample line: {line!r}"
            assert m.group(1) in typed, f"{m.group(1)} has no # TYPE line"
            samples[m.group(1) + (m.group(2) or "")] = float(m.group(4))
    return samples


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
