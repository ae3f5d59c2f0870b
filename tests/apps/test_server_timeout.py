"""``--request-timeout``: a request that runs past it is answered with an error at its deadline
(504 ``request_timeout`` not streamed, an ``{"error": ...}`` event streamed), its generation stops
at the next token boundary and leaves the batch, and the requests decoding beside it go on with
the tokens they get alone.

The model sleeps a fixed time before every pass over its weights (``slow_model_loader``), so
"longer than the timeout" does not depend on this machine's speed.
"""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import openai
import pytest

PASS_S = 0.01  # sleep per pass over the weights: a 1500-token answer takes >= 15 s
LONG = {"prompt": "Once upon a time", "max_tokens": 1500, "temperature": 0, "ignore_eos": True}


def metric(base_url: str, name: str) -> float:
    for line in httpx.get(f"{base_url}/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def wait_idle(app, timeout: float = 20) -> None:
    """Until the worker has dropped every job (it does so at its next token boundary)."""
    deadline = time.monotonic() + timeout
    while app.state.worker.queue_depth and time.monotonic() < deadline:  # the test waits; the server never polls
        time.sleep(0.02)
    assert app.state.worker.queue_depth == 0 and app.state.worker.batch_size == 0


@pytest.fixture(scope="module")
def start(chat_model_dir, server_factory, slow_model_loader):
    """``start(timeout_s, max_batch)``: a ready server on the slowed fixture model."""
    from flashtier.apps.server import ServerConfig, create_app

    def make(timeout_s: float, max_batch: int):
        app = create_app(slow_model_loader(chat_model_dir, PASS_S),
                         ServerConfig("chat-model", max_batch=max_batch, request_timeout_s=timeout_s))
        live = server_factory(app)
        assert app.state.worker.wait_ready(timeout=60)
        return app, live

    return make


def test_a_request_past_the_timeout_gets_504_naming_the_flag(start):
    app, live = start(0.5, 1)
    t0 = time.perf_counter()
    r = httpx.post(f"{live.base_url}/v1/completions", json=LONG, timeout=60)
    elapsed = time.perf_counter() - t0
    assert r.status_code == 504, r.text
    assert r.headers["x-should-retry"] == "false"
    err = r.json()["error"]
    assert err["code"] == "request_timeout" and err["type"] == "timeout_error"
    assert "--request-timeout 0.5 s" in err["message"] and "generated tokens" in err["message"]
    assert 0.5 <= elapsed < 1.5  # answered at the deadline, not when the 1500 tokens would be done
    wait_idle(app)
    assert metric(live.base_url, "flashtier_requests_timed_out_total") == 1
    assert metric(live.base_url, "flashtier_requests_failed_total") == 1
    assert metric(live.base_url, "flashtier_requests_cancelled_total") == 0
    short = httpx.post(f"{live.base_url}/v1/completions", json={**LONG, "max_tokens": 3}, timeout=60)
    assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] == 3
    live.stop()


def test_queued_requests_time_out_at_their_deadline_not_at_their_turn(start):
    """One at a time, three long requests: each is answered ~timeout after it was sent (the waiting
    ones are never run, or stopped at once), not one timeout after the other."""
    app, live = start(0.5, 1)

    async def three() -> list[tuple[int, float]]:
        async with httpx.AsyncClient(base_url=live.base_url, timeout=60) as http:
            async def one() -> tuple[int, float]:
                t0 = time.perf_counter()
                r = await http.post("/v1/completions", json=LONG)
                return r.status_code, time.perf_counter() - t0

            return await asyncio.gather(one(), one(), one())

    results = asyncio.run(three())
    assert [status for status, _ in results] == [504] * 3
    assert all(elapsed < 1.5 for _, elapsed in results), results
    wait_idle(app)
    assert metric(live.base_url, "flashtier_requests_timed_out_total") == 3
    live.stop()


def test_openai_client_raises_and_does_not_retry(start):
    """OpenAI's client retries 5xx answers, unless told not to: the 504 says x-should-retry: false,
    so one request is sent, not three. A stream ends with an error event: the client raises
    APIError with the server's message after the text it already gave."""
    app, live = start(0.5, 2)
    client = openai.OpenAI(base_url=f"{live.base_url}/v1", api_key="unused", timeout=60)  # default max_retries=2
    with pytest.raises(openai.InternalServerError) as info:
        client.completions.create(model="chat-model", **{k: v for k, v in LONG.items() if k != "ignore_eos"},
                                  extra_body={"ignore_eos": True})
    assert info.value.status_code == 504 and "--request-timeout" in info.value.message
    assert metric(live.base_url, "flashtier_requests_total") == 1
    pieces = []
    with pytest.raises(openai.APIError, match="did not finish within --request-timeout 0.5 s"):
        stream = client.chat.completions.create(model="chat-model", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=1500, temperature=0, stream=True,
                                                extra_body={"ignore_eos": True})
        for chunk in stream:
            pieces.extend(c.delta.content or "" for c in chunk.choices)
            assert all(c.finish_reason is None for c in chunk.choices)
    assert "".join(pieces), "the stream should have given text before the timeout"
    wait_idle(app)
    assert metric(live.base_url, "flashtier_requests_timed_out_total") == 2
    live.stop()


def test_the_others_in_the_batch_go_on_with_their_tokens_alone(start):
    """A long request L times out while a request S decodes beside it (S started after L, and ends
    after L's deadline but before its own): S's text equals S alone, L's generation left the batch."""
    timeout = 2.0
    app, live = start(timeout, 4)
    base = live.base_url
    chat = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0,
            "ignore_eos": True}
    with httpx.Client(base_url=base, timeout=60) as http:
        # S's length: ~0.75 of the timeout at this server's pace (measured after a warm-up: the time
        # 40 more tokens take; at least the sleep per pass)
        took = []
        for tokens in (10, 10, 50):
            t0 = time.perf_counter()
            assert http.post("/v1/chat/completions", json={**chat, "max_tokens": tokens}).status_code == 200
            took.append(time.perf_counter() - t0)
        s_tokens = int(0.75 * timeout / max(PASS_S, (took[2] - took[1]) / 40))
        alone = http.post("/v1/chat/completions", json={**chat, "max_tokens": s_tokens}).json()
    assert alone.get("usage", {}).get("completion_tokens") == s_tokens, alone

    l_error: dict[str, object] = {}

    def run_long() -> None:
        with httpx.Client(base_url=base, timeout=60) as http, \
                http.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
            for line in r.iter_lines():
                if '"error"' in line:
                    l_error.update(at=time.perf_counter(), line=line)

    long = threading.Thread(target=run_long)
    t_long = time.perf_counter()
    long.start()
    time.sleep(0.45 * timeout)
    s_started = time.perf_counter()
    s = httpx.post(f"{base}/v1/chat/completions", json={**chat, "max_tokens": s_tokens}, timeout=60)
    s_ended = time.perf_counter()
    long.join(30)
    assert "request_timeout" in str(l_error.get("line")), l_error
    assert s_started < l_error["at"] < s_ended, (  # S decoded beside L when L was stopped
        f"S ran {s_started - t_long:.2f}..{s_ended - t_long:.2f} s, L stopped at {l_error['at'] - t_long:.2f} s")
    assert s.status_code == 200, s.text
    assert s.json()["choices"][0]["message"]["content"] == alone["choices"][0]["message"]["content"]
    assert s.json()["usage"] == alone["usage"] and s.json()["choices"][0]["finish_reason"] == "length"
    wait_idle(app)
    assert app.state.worker.peak_batch == 2
    assert metric(base, "flashtier_requests_timed_out_total") == 1
    live.stop()


def test_request_timeout_must_be_positive():
    from flashtier.apps.server import ServerConfig
    from flashtier.errors import ConfigError

    for bad in (0, -1, float("nan"), float("inf"), True, "5"):
        with pytest.raises(ConfigError, match="request_timeout_s must be a positive number"):
            ServerConfig("m", request_timeout_s=bad)  # type: ignore[arg-type]
    assert ServerConfig("m", request_timeout_s=2).request_timeout_s == 2


def test_request_timeout_flag_errors_are_one_line(capsys):
    from flashtier.apps.cli import main

    for bad, message in (("0", "must be a positive number of seconds"), ("soon", "must be a number of seconds")):
        with pytest.raises(SystemExit):
            main(["serve", "--request-timeout", bad])
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
