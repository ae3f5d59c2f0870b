"""The server through the real ``openai`` client on loopback: chat and text completions, plain
and streamed, usage counts, seed and stop, errors, a client that leaves mid-stream."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(live_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def metric(base_url: str, name: str) -> float:
    for line in httpx.get(f"{base_url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["chat-model"]


def test_chat_completion_and_usage(client):
    r = client.chat.completions.create(model="chat-model", messages=MESSAGES, max_tokens=6, temperature=0)
    assert r.object == "chat.completion"
    choice = r.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 5 and 1 <= r.usage.completion_tokens <= 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streamed_chat_equals_the_plain_answer(client):
    plain = client.chat.completions.create(model="chat-model", messages=MESSAGES, max_tokens=10, temperature=0)
    stream = client.chat.completions.create(model="chat-model", messages=MESSAGES, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == plain.choices[0].message.content
    assert finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens
    # The same conversation again: the engine reuses its KV cache (OpenAI's cached_tokens) in whole
    # prefill chunks (16 tokens on this server), what a fresh prefill computes bit for bit.
    prompt = chunks[-1].usage.prompt_tokens
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == (prompt - 1) // 16 * 16 > 0


def test_text_completion_plain_and_streamed(client):
    plain = client.completions.create(model="chat-model", prompt="def fibonacci(n):", max_tokens=8, temperature=0)
    assert plain.object == "text_completion" and plain.usage.completion_tokens >= 1
    chunks = list(client.completions.create(model="chat-model", prompt="def fibonacci(n):", max_tokens=8,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    ids = client.completions.create(model="chat-model", prompt=[5, 6, 7], max_tokens=3, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert ids.usage.prompt_tokens == 3 and ids.usage.completion_tokens == 3
    echo = client.completions.create(model="chat-model", prompt="def f(", max_tokens=2, temperature=0, echo=True)
    assert echo.choices[0].text.startswith("def f(")


def test_seed_reproduces_a_sampled_answer(client):
    def ask(seed: int) -> str:
        r = client.chat.completions.create(model="chat-model", messages=MESSAGES, max_tokens=12, temperature=1.0,
                                           seed=seed, extra_body={"ignore_eos": True})
        return r.choices[0].message.content

    first = ask(7)
    assert ask(7) == first
    assert len({first, ask(8), ask(9)}) > 1, "different seeds should not all give the same sample"


def test_stop_string_ends_the_answer_before_it(client):
    full = client.completions.create(prompt="hello", max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True}, model="chat-model").choices[0].text
    k = next(i for i in range(2, len(full) - 1) if full.find(full[i:i + 2]) == i)
    stop = full[k:k + 2]
    r = client.completions.create(model="chat-model", prompt="hello", max_tokens=24, temperature=0, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == full[:k]
    assert r.choices[0].finish_reason == "stop"


def test_errors_come_back_as_openai_errors(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=MESSAGES, max_tokens=4)
    assert e.value.status_code == 404 and "does not exist" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="chat-model", messages=MESSAGES, max_tokens=10**9)
    assert e.value.code == "context_length_exceeded" and "maximum context length is 2048" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="chat-model", messages=[], max_tokens=4)
    assert e.value.body["param"] == "messages"


def test_client_leaving_mid_stream_cancels_its_generation(client, live_server):
    cancelled = metric(live_server.base_url, "flashtier_requests_cancelled_total")
    generated = metric(live_server.base_url, "flashtier_generated_tokens_total")
    with client.chat.completions.create(model="chat-model", messages=MESSAGES, max_tokens=1500, temperature=0,
                                        stream=True, extra_body={"ignore_eos": True}) as stream:
        pieces = 0
        for chunk in stream:
            pieces += bool(chunk.choices and chunk.choices[0].delta.content)
            if pieces == 3:
                break
    # The next request runs after the abandoned one, which must have stopped early.
    t0 = time.perf_counter()
    r = client.chat.completions.create(model="chat-model", messages=MESSAGES, max_tokens=3, temperature=0)
    assert r.usage.completion_tokens >= 1
    assert metric(live_server.base_url, "flashtier_requests_cancelled_total") == cancelled + 1
    assert metric(live_server.base_url, "flashtier_generated_tokens_total") - generated < 1500
    assert time.perf_counter() - t0 < 60


def test_client_timing_out_on_a_plain_request_cancels_it(client, live_server):
    cancelled = metric(live_server.base_url, "flashtier_requests_cancelled_total")
    generated = metric(live_server.base_url, "flashtier_generated_tokens_total")
    impatient = client.with_options(timeout=0.5)
    with pytest.raises(openai.APITimeoutError):
        impatient.chat.completions.create(model="chat-model", messages=MESSAGES, max_tokens=2000, temperature=0,
                                          extra_body={"ignore_eos": True})
    r = client.chat.completions.create(model="chat-model", messages=MESSAGES, max_tokens=3, temperature=0)
    assert r.usage.completion_tokens >= 1
    assert metric(live_server.base_url, "flashtier_requests_cancelled_total") == cancelled + 1
    assert metric(live_server.base_url, "flashtier_generated_tokens_total") - generated < 2000
