"""Bad requests get a 400 in the OpenAI error shape with a message that says what to fix, and the
server keeps serving; a model that is still loading gets 503 + Retry-After; one that failed, 500."""

from __future__ import annotations

import json
import threading
import time

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
    # OpenAI fields the server does not implement: refused by name, never silently ignored
    (CHAT, json.dumps({"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]}).encode(),
     "tools", "tools are not supported"),
    (CHAT, json.dumps({"messages": USER, "tool_choice": "auto"}).encode(), "tool_choice", "tool_choice is not"),
    (CHAT, json.dumps({"messages": USER, "functions": [{"name": "f"}]}).encode(), "functions", "functions are not"),
    (CHAT, json.dumps({"messages": USER, "function_call": "auto"}).encode(), "function_call", "function_call is"),
    (CHAT, json.dumps({"messages": USER, "response_format": {"type": "json_object"}}).encode(), "response_format",
     "response_format is not supported"),
    (CHAT, json.dumps({"messages": USER, "top_logprobs": 3}).encode(), "top_logprobs", "top_logprobs is not"),
    (CHAT, json.dumps({"messages": USER, "logit_bias": {"50": 10}}).encode(), "logit_bias", "logit_bias is not"),
    (CHAT, json.dumps({"messages": USER, "presence_penalty": 0.5}).encode(), "presence_penalty", "not supported"),
    (CHAT, json.dumps({"messages": USER, "n": 3}).encode(), "n", "only n=1"),
    (COMPLETIONS, b'{"prompt": "x", "logit_bias": {"1": -100}}', "logit_bias", "logit_bias is not supported"),
    (COMPLETIONS, b'{"prompt": "x", "best_of": 2}', "best_of", "best_of is not supported"),
    (COMPLETIONS, b'{"prompt": "x", "suffix": "end"}', "suffix", "suffix is not supported"),
    # roles and message content
    (CHAT, b'{"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}', "messages[0].role",
     "'tool' is not a supported role; use one of system, user, assistant"),
    (CHAT, b'{"messages": [{"role": "user", "content": "x"}, {"role": "wizard", "content": "y"}]}',
     "messages[1].role", "'wizard' is not a supported role"),
    (CHAT, b'{"messages": [{"role": "assistant", "content": null, "tool_calls": [{"id": "c1"}]}]}',
     "messages[0].tool_calls", "tool calls are not supported"),
    (CHAT, b'{"messages": [{"role": "user", "content": {"text": "x"}}]}', "messages[0].content",
     "string or a list of text parts"),
    (CHAT, b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}',
     "messages[0].content", "only text content parts"),
    # JSON accepts lone surrogates, UTF-8 does not: a 400, never a 500
    (CHAT, b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}', "messages[0].content",
     "messages[0].content is not valid Unicode"),
    (CHAT, b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
     "messages[0].content[0].text", "is not valid Unicode"),
    (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "stop": "\\ud83d"}', "stop", "stop is not valid Unicode"),
    (COMPLETIONS, b'{"prompt": "\\ud83d\\ude00 ok \\ud800"}', "prompt", "prompt is not valid Unicode"),
    (COMPLETIONS, b'{"prompt": "x", "model": "\\udc80"}', "model", "model is not valid Unicode"),
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
        metrics = {ln.split()[0]: float(ln.split()[1]) for ln in http.get("/metrics").text.splitlines()
                   if ln.startswith("flashtier_") and " " in ln}
    # two failed requests, each counted once (not once by the worker and again by the route)
    assert metrics["flashtier_requests_failed_total"] == 2 and metrics["flashtier_generations_failed_total"] == 2
    live.stop()


@pytest.mark.parametrize("extra", [
    {"tools": [], "tool_choice": "none", "functions": None, "function_call": "none"},
    {"response_format": {"type": "text"}, "top_logprobs": 0, "logit_bias": {}, "n": 1},
    {"n": None, "presence_penalty": 0, "frequency_penalty": 0.0, "logprobs": False, "parallel_tool_calls": True},
])
def test_unsupported_fields_that_ask_for_nothing_are_accepted(http, extra):
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                {"role": "assistant", "content": "hello", "tool_calls": []}, {"role": "user", "content": "again"}]
    r = http.post(CHAT, json={"messages": messages, "max_tokens": 2, "temperature": 0, **extra})
    assert r.status_code == 200, r.text


def test_valid_unicode_outside_the_bmp_is_accepted(http):
    """A surrogate *pair* escape is one valid character (U+1F600); only lone surrogates are refused."""
    r = http.post(COMPLETIONS, content=b'{"prompt": "smile \\ud83d\\ude00", "max_tokens": 2}',
                  headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text


def refused(r: httpx.Response, status: int, *words: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for word in words:
        assert word in err["message"], err["message"]
    return err


def test_body_over_the_limit_is_a_413_before_it_is_parsed(server_factory):
    from flashtier.apps.server import ServerConfig, create_app

    def no_model():
        raise CheckpointError("no model in this test")

    app = create_app(no_model, ServerConfig("x", max_body_bytes=1000))
    live = server_factory(app)
    with httpx.Client(base_url=live.base_url, timeout=30) as http:
        big = b'{"messages": [' + b" " * 1000 + b"]}"  # not even valid JSON: never parsed
        err = refused(http.post(CHAT, content=big, headers={"Content-Type": "application/json"}), 413,
                      "larger than the limit of 1000 bytes", "--max-body-bytes")
        assert err["code"] == "request_too_large" and err["type"] == "invalid_request_error"

        def chunks():  # no Content-Length: chunked transfer, counted while read
            for _ in range(50):
                yield b" " * 100

        r = http.post(CHAT, content=chunks(), headers={"Content-Type": "application/json"})
        assert r.request.headers.get("Transfer-Encoding") == "chunked" and "Content-Length" not in r.request.headers
        refused(r, 413, "more than 1000 bytes")
        # at the limit the body is read and parsed (and refused for what it says)
        body = json.dumps({"messages": [{"role": "user", "content": "x" * 900}], "n": 2}).encode()
        assert len(body) <= 1000
        refused(http.post(CHAT, content=body, headers={"Content-Type": "application/json"}), 400, "only n=1")
        small_chunks = (body[i:i + 100] for i in range(0, len(body), 100))
        refused(http.post(CHAT, content=small_chunks, headers={"Content-Type": "application/json"}), 400, "only n=1")
        failed = [ln for ln in http.get("/metrics").text.splitlines()
                  if ln.startswith("flashtier_requests_failed_total ")]
        assert float(failed[0].split()[1]) == 4
    live.stop()


def test_default_body_limit_is_4_mib(http):
    from flashtier.apps.server import ServerConfig

    assert ServerConfig("x").max_body_bytes == 4 * 1024 * 1024
    r = http.post(CHAT, content=b" " * (4 * 1024 * 1024 + 1), headers={"Content-Type": "application/json"})
    refused(r, 413, "limit of 4194304 bytes")


@pytest.mark.parametrize("headers", [
    {"Host": "evil.example"},
    {"Host": "evil.example:8000"},
    {"Host": "127.0.0.1.evil.example"},
    {"Origin": "http://evil.example"},
    {"Origin": "https://evil.example:8000"},
    {"Origin": "null"},
])
def test_hosts_that_are_not_allowed_get_a_403(http, headers):
    for method, path in (("GET", "/v1/models"), ("GET", "/"), ("POST", CHAT)):
        r = http.request(method, path, headers=headers, json={"messages": USER, "max_tokens": 1})
        err = refused(r, 403, "not allowed")
        assert err["type"] == "permission_error" and err["code"] == "host_not_allowed"
        if "evil.example" in str(headers):
            assert "evil.example" in err["message"] and "--allow-host" in err["message"]


@pytest.mark.parametrize("headers", [
    {"Host": "localhost"},
    {"Host": "LOCALHOST:8000"},
    {"Host": "127.0.0.1:9"},
    {"Host": "[::1]:8000"},
    {"Origin": "http://localhost:8000"},
    {"Origin": "http://[::1]:1234"},
])
def test_loopback_hosts_are_allowed(http, headers):
    r = http.get("/v1/models", headers=headers)
    assert r.status_code == 200, r.text


def test_allow_host_adds_names_and_star_allows_any(server_factory):
    from flashtier.apps.server import ServerConfig, create_app

    def no_model():
        raise CheckpointError("no model in this test")

    named = server_factory(create_app(no_model, ServerConfig("x", allowed_hosts=("my.box", "10.0.0.5"))))
    anyone = server_factory(create_app(no_model, ServerConfig("x", allowed_hosts=("*",))))
    with httpx.Client(base_url=named.base_url, timeout=30) as http:
        assert http.get("/v1/models", headers={"Host": "my.box:8000"}).status_code == 200
        assert http.get("/v1/models", headers={"Host": "10.0.0.5", "Origin": "http://My.Box"}).status_code == 200
        refused(http.get("/v1/models", headers={"Host": "other.box"}), 403, "--allow-host other.box")
        refused(http.get("/v1/models", headers={"Origin": "http://other.box"}), 403, "--allow-host other.box")
    with httpx.Client(base_url=anyone.base_url, timeout=30) as http:
        r = http.get("/v1/models", headers={"Host": "evil.example", "Origin": "http://evil.example"})
        assert r.status_code == 200
    named.stop()
    anyone.stop()


def test_serve_flags_reach_the_server_config(monkeypatch, chat_model_dir):
    """``--max-body-bytes`` and ``--allow-host`` (repeatable); the --host address is allowed too."""
    import uvicorn

    from flashtier.apps.cli import build_parser

    apps, kwargs = [], []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: (apps.append(app), kwargs.append(kw)))
    args = build_parser().parse_args(["serve", str(chat_model_dir), "--host", "192.168.1.7", "--max-body-bytes",
                                      "2048", "--allow-host", "my.box", "--allow-host", "[fd00::1]",
                                      "--shutdown-timeout", "7", "--max-batch", "3"])
    assert args.func(args) == 0
    assert kwargs[0]["timeout_graceful_shutdown"] == 7  # a stuck request cannot hold the shutdown forever
    config = apps[0].state.config
    assert config.max_body_bytes == 2048
    assert config.allowed_hosts == ("192.168.1.7", "my.box", "[fd00::1]")
    assert config.max_batch == 3
    defaults = build_parser().parse_args(["serve", str(chat_model_dir)])
    assert defaults.max_body_bytes == 4 * 1024 * 1024 and defaults.allow_host == [] and defaults.max_batch == 1
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--max-batch", "0"])
    assert defaults.shutdown_timeout == 30
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--max-body-bytes", "0"])


@pytest.mark.parametrize("command", ["serve", "chat"])
def test_serve_and_chat_take_the_attention_and_sparse_ffn_flags(command, chat_model_dir):
    """Long contexts and the sparse FFN are served too (``generate`` had the flags, the server and
    the chat did not): the flags reach the engine options, and a sparse flag without --sparse-ffn
    is refused as in ``generate``."""
    from flashtier.apps.cli import build_parser
    from flashtier.apps.common import engine_options
    from flashtier.errors import ConfigError

    args = build_parser().parse_args([command, str(chat_model_dir), "--attention", "retrieval", "--window", "64",
                                      "--sparse-ffn", "--window-k", "2"])
    opts = engine_options(args)
    assert opts["attention"] == "retrieval" and opts["window"] == 64
    assert opts["sparse_ffn"] is True and opts["sparse_ffn_window_k"] == 2
    with pytest.raises(ConfigError, match="only apply with --sparse-ffn"):
        engine_options(build_parser().parse_args([command, str(chat_model_dir), "--window-k", "2"]))
    with pytest.raises(ConfigError, match="only apply with --attention retrieval"):
        engine_options(build_parser().parse_args([command, str(chat_model_dir), "--window", "64"]))


def test_api_key_is_required_on_v1_but_not_on_health_or_the_page(server_factory):
    from flashtier.apps.server import ServerConfig, create_app

    def no_model():
        raise CheckpointError("no model in this test")

    config = ServerConfig("x", api_key="s3cret-key")
    assert "s3cret-key" not in repr(config)
    live = server_factory(create_app(no_model, config))
    with httpx.Client(base_url=live.base_url, timeout=30) as http:
        for headers, words in (({}, "requires an API key"), ({"Authorization": "Bearer wrong"}, "not valid"),
                               ({"Authorization": "Basic s3cret-key"}, "not a Bearer token"),
                               ({"Authorization": "Bearer s3cret-keyX"}, "not valid"),
                               ({"Authorization": "Bearer"}, "not a Bearer token")):
            for method, path in (("GET", "/v1/models"), ("POST", CHAT), ("GET", "/v1/flashtier/stats")):
                r = http.request(method, path, headers=headers, json={"messages": USER})
                err = refused(r, 401, words, "Authorization: Bearer")
                assert err["code"] == "invalid_api_key" and r.headers["WWW-Authenticate"] == "Bearer"
        # checked before the body is read: an unauthenticated client cannot make the server read 4 MiB
        refused(http.post(CHAT, content=b" " * 10_000_000, headers={"Content-Type": "application/json"}), 401)
        ok = {"Authorization": "Bearer s3cret-key"}
        assert http.get("/v1/models", headers=ok).status_code == 200
        assert http.get("/v1/models", headers={"Authorization": "bearer  s3cret-key"}).status_code == 200
        assert http.post(CHAT, headers=ok, json={"messages": USER}).status_code == 500  # passes auth: no model
        assert http.get("/health").status_code == 500 and http.get("/").status_code == 200
        assert http.get("/metrics").status_code == 200
        # the Host check still comes first
        refused(http.get("/v1/models", headers={"Host": "evil.example"}), 403)
    live.stop()
    with pytest.raises(Exception, match="api_key"):
        ServerConfig("x", api_key="")


def test_no_api_key_means_no_auth(http):
    assert http.get("/v1/models").status_code == 200


class CountingModel:
    """The real model; counts the prompts given to the tokenizer."""

    def __init__(self, model) -> None:
        self._model = model
        self.encoded = 0

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def encode(self, *args, **kwargs):
        self.encoded += 1
        return self._model.encode(*args, **kwargs)


def test_prompt_over_the_character_limit_is_refused_untokenized(chat_model_dir, server_factory, model_loader):
    from flashtier.apps.server import ServerConfig, create_app

    load = model_loader(chat_model_dir)
    models = []
    app = create_app(lambda: models.append(CountingModel(load())) or models[0], ServerConfig("chat-model"))
    live = server_factory(app)
    assert app.state.worker.wait_ready(timeout=60)
    model = models[0]
    limit = 16 * 2048
    assert ServerConfig("x").prompt_chars_limit(2048) == limit
    assert ServerConfig("x", max_prompt_chars=10).prompt_chars_limit(2048) == 10
    with httpx.Client(base_url=live.base_url, timeout=60) as http:
        half = "x" * (limit // 2 + 1)  # two messages, each under the limit, together over it
        messages = [{"role": "system", "content": half}, {"role": "user", "content": [{"type": "text", "text": half}]}]
        err = refused(http.post(CHAT, json={"messages": messages}), 400, "too long for this model's context of 2048",
                      f"{limit + 2} characters", "shorten the prompt")
        assert err["param"] == "messages" and err["code"] == "context_length_exceeded"
        err = refused(http.post(COMPLETIONS, json={"prompt": "y" * (limit + 1), "stream": True}), 400, "too long")
        assert err["param"] == "prompt"
        assert model.encoded == 0
        # under the character limit the token-level check still answers
        refused(http.post(COMPLETIONS, json={"prompt": LONG_PROMPT}), 400, "maximum context length is 2048")
        assert model.encoded == 1
        assert http.post(COMPLETIONS, json={"prompt": "hi", "max_tokens": 1}).status_code == 200
    live.stop()
    small = server_factory(create_app(load, ServerConfig("chat-model", max_prompt_chars=50)))
    with httpx.Client(base_url=small.base_url, timeout=60) as http:
        assert small.app.state.worker.wait_ready(timeout=60)
        refused(http.post(CHAT, json={"messages": [{"role": "user", "content": "z" * 51}]}), 400, "more than the 50")
        assert http.post(CHAT, json={"messages": [{"role": "user", "content": "z" * 50}], "max_tokens": 1}
                         ).status_code == 200
    small.stop()


def test_api_key_and_max_prompt_chars_flags(monkeypatch, chat_model_dir):
    """``--api-key``, else $FLASHTIER_API_KEY (read by the command, not the server); ``--max-prompt-chars``."""
    import uvicorn

    from flashtier.apps.cli import build_parser

    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: apps.append(app))
    monkeypatch.delenv("FLASHTIER_API_KEY", raising=False)

    def config_of(*flags):
        args = build_parser().parse_args(["serve", str(chat_model_dir), *flags])
        assert args.func(args) == 0
        return apps[-1].state.config

    assert config_of().api_key is None and config_of().max_prompt_chars is None
    assert config_of("--api-key", "k1", "--max-prompt-chars", "1000").api_key == "k1"
    assert apps[-1].state.config.max_prompt_chars == 1000
    monkeypatch.setenv("FLASHTIER_API_KEY", "from-env")
    assert config_of().api_key == "from-env"
    assert config_of("--api-key", "flag-wins").api_key == "flag-wins"
    monkeypatch.setenv("FLASHTIER_API_KEY", "")
    assert config_of().api_key is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--max-prompt-chars", "0"])


def test_a_full_queue_is_a_503_with_retry_after(chat_model_dir, server_factory, model_loader):
    """--max-queue 0 with one request at a time: while one runs, the next is refused at once."""
    import threading

    from flashtier.apps.server import ServerConfig, create_app

    app = create_app(model_loader(chat_model_dir), ServerConfig("chat-model", max_queue=0))
    live = server_factory(app)
    assert app.state.worker.wait_ready(timeout=60)
    started, leave = threading.Event(), threading.Event()

    def long_request():
        with httpx.stream("POST", f"{live.base_url}/v1/completions", timeout=120,
                          json={"prompt": "x", "max_tokens": 1500, "stream": True, "ignore_eos": True}) as r:
            for _ in r.iter_lines():
                started.set()
                if leave.wait(0):
                    break  # leave: the generation is cancelled

    t = threading.Thread(target=long_request)
    t.start()
    assert started.wait(60)
    r = httpx.post(f"{live.base_url}/v1/completions", json={"prompt": "y", "max_tokens": 2}, timeout=60)
    leave.set()
    t.join(60)
    err = refused(r, 503, "the server is busy")
    assert err["code"] == "server_busy" and r.headers["Retry-After"] == "2"
    assert "flashtier_requests_refused_busy_total 1" in httpx.get(f"{live.base_url}/metrics", timeout=30).text
    for _ in range(100):  # once the long one is cancelled, requests are accepted again
        r = httpx.post(f"{live.base_url}/v1/completions", json={"prompt": "y", "max_tokens": 2}, timeout=60)
        if r.status_code == 200:
            break
        time.sleep(0.1)
    assert r.status_code == 200
