"""Bad requests get a 400 in the OpenAI error shape with a message that says what to fix, and the
server keeps serving; a model that is still loading gets 503 + Retry-After; one that failed, 500."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from flashtier.errors import CheckpointError, StorageError

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]
LONG_PROMPT = "hello world " * 300  # ~2700 tokens; the fixture model's context is 2048


@pytest.fixture(scope="module")
def http(live_server) -> httpx.Client:
    with httpx.Client(base_url=live_server.base_url, timeout=60) as c:
        yield c


@pytest.mark.parametrize("path, body, param, message", [
    (CHAT, b'{"messages": [', None, "not valid JSON"),
    (CHAT, b"", None, "body is missing"),
    (CHAT, b"[1, 2]", None, "must be a JSON object"),
    (CHAT, b'{"max_tokens": 4}', "messages", "messages is required"),
    (CHAT, b'{"messages": []}', "messages", "messages is empty"),
    (CHAT, b'{"messages": "hi"}', "messages", "valid list"),
    (CHAT, b'{"messages": [{"role": "user", "content": 5}]}', "messages[0].content", "string or a list of text parts"),
    (CHAT, b'{"messages": [{"content": "x"}]}', "messages[0].role", "is required"),
    (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": "10"}', "max_tokens", "valid integer"),
    (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}', "max_tokens",
     "greater than or equal to 1"),
    (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', "max_tokens",
     "greater than or equal to 1"),
    (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000000000000000000}', "max_tokens",
     "maximum context length is 2048"),
    (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 2048}', "max_tokens",
     "lower max_tokens to at most"),
    (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}', "temperature", "valid number"),
    (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "temperature": -0.5}', "temperature", "greater than"),
    (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "top_p": 0}', "top_p", "greater than 0"),
    (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "stream": "yes"}', "stream", "valid boolean"),
    (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "n": 2}', "n", "only n=1"),
    (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}', "stop", "at most 4"),
    (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "logprobs": true}', "logprobs", "not supported"),
    (CHAT, json.dumps({"messages": [{"role": "user", "content": LONG_PROMPT}]}).encode(), "messages",
     "maximum context length is 2048"),
    (COMPLETIONS, b'{"prompt": ""}', "prompt", "prompt is empty"),
    (COMPLETIONS, b'{"prompt": 12}', "prompt", "string or a list of token ids"),
    (COMPLETIONS, b'{"prompt": ["a", "b"]}', "prompt", "one prompt per request"),
    (COMPLETIONS, b'{"prompt": [1, 2, 99999]}', "prompt", "outside the vocabulary"),
    (COMPLETIONS, json.dumps({"prompt": LONG_PROMPT, "stream": True}).encode(), "prompt", "maximum context length"),
])
def test_bad_request_is_a_400_with_a_clear_message(http, path, body, param, message):
    r = http.post(path, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert message in err["message"]


def test_server_keeps_serving_after_bad_requests(http):
    for body in (b"{", b'{"messages": []}', b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": -3}'):
        assert http.post(CHAT, content=body, headers={"Content-Type": "application/json"}).status_code == 400
    r = http.post(CHAT, json={"messages": USER, "max_tokens": 3, "temperature": 0, "unknown_field": {"a": 1}})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    assert http.get("/health").json()["status"] == "ok"
    failed = [ln for ln in http.get("/metrics").text.splitlines() if ln.startswith("flashtier_requests_failed_total ")]
    assert float(failed[0].split()[1]) >= 3


def test_unknown_path_is_a_404_in_the_same_shape(http):
    r = http.get("/v1/nothing-here")
    assert r.status_code == 404 and "no route" in r.json()["error"]["message"]


def test_503_with_retry_after_while_the_model_loads(chat_model_dir, server_factory):
    from flashtier.apps.server import ServerConfig, create_app
    from flashtier.runtime import open_model

    release = threading.Event()

    def slow_loader():
        release.wait(60)
        return open_model(chat_model_dir)

    app = create_app(slow_loader, ServerConfig("chat-model", retry_after_s=3))
    live = server_factory(app)
    with httpx.Client(base_url=live.base_url, timeout=60) as http:
        health = http.get("/health")
        assert health.status_code == 503 and health.headers["Retry-After"] == "3"
        assert health.json()["status"] == "loading"
        r = http.post(CHAT, json={"messages": USER, "max_tokens": 2})
        assert r.status_code == 503 and r.headers["Retry-After"] == "3"
        assert r.json()["error"]["code"] == "model_loading" and "still loading" in r.json()["error"]["message"]
        assert http.get("/").status_code == 200  # the page and the model list work while loading
        assert http.get("/v1/models").json()["data"][0]["id"] == "chat-model"
        release.set()
        assert app.state.worker.wait_ready(timeout=60)
        assert http.post(CHAT, json={"messages": USER, "max_tokens": 2}).status_code == 200
    live.stop()


def test_a_model_that_fails_to_load_is_reported(server_factory):
    from flashtier.apps.server import ServerConfig, create_app

    def broken_loader():
        raise CheckpointError("/models/x: model.safetensors is truncated")

    app = create_app(broken_loader, ServerConfig("x"))
    live = server_factory(app)
    assert not app.state.worker.wait_ready(timeout=30)
    with httpx.Client(base_url=live.base_url, timeout=30) as http:
        health = http.get("/health")
        assert health.status_code == 500 and "truncated" in health.json()["message"]
        r = http.post(CHAT, json={"messages": USER})
        assert r.status_code == 500 and "failed to load" in r.json()["error"]["message"]
    live.stop()


class FaultyModel:
    """The real model, except that a generation fails with a storage error after two tokens."""

    def __init__(self, model) -> None:
        self._model = model

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def stream(self, *args, **kwargs):
        events = self._model.stream(*args, **kwargs)
        try:
            tokens = 0
            for event in events:
                tokens += event.token_id is not None
                if tokens == 3:
                    raise StorageError("/models/x/model.safetensors: short read (4096 of 65536 bytes)")
                yield event
        finally:
            events.close()


def test_a_fault_during_generation_is_reported_and_the_server_goes_on(chat_model_dir, server_factory, model_loader):
    from flashtier.apps.server import ServerConfig, create_app

    load = model_loader(chat_model_dir)
    app = create_app(lambda: FaultyModel(load()), ServerConfig("chat-model"))
    live = server_factory(app)
    assert app.state.worker.wait_ready(timeout=60)
    body = {"messages": USER, "max_tokens": 20, "temperature": 0, "ignore_eos": True}
    with httpx.Client(base_url=live.base_url, timeout=60) as http:
        r = http.post(CHAT, json=body)
        assert r.status_code == 500 and "short read" in r.json()["error"]["message"]
        with http.stream("POST", CHAT, json={**body, "stream": True}) as r:
            assert r.status_code == 200
            events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert "short read" in error["message"] and error["type"] == "server_error"
        assert http.post(COMPLETIONS, json={"prompt": "x", "max_tokens": 2}).status_code == 200  # 2 tokens: no fault
        assert http.get("/health").json()["status"] == "ok"
    live.stop()
