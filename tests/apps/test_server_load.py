"""Load: 16 concurrent streaming clients x 4 requests each. Every request completes, every answer
equals what the same request gets alone (greedy), and the server is healthy afterwards.

Runs on the shipped default model (models/tiny-moe-16k) when it is there, else on the fixture model.
"""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from flashtier.apps.common import DEFAULT_MODEL

CLIENTS = 16
REQUESTS_PER_CLIENT = 4
MAX_TOKENS = 8
DISTINCT = 8  # requests cycle through 8 different prompts, half chat, half text completion


@pytest.fixture(scope="module")
def load_server(live_server, server_factory, model_loader):
    """The default model's server when the shipped model exists, else the shared fixture server."""
    if not (DEFAULT_MODEL / "tokenizer.json").is_file():
        return live_server
    from flashtier.apps.server import ServerConfig, create_app

    app = create_app(model_loader(DEFAULT_MODEL), ServerConfig("chat-model"))
    live = server_factory(app)
    assert app.state.worker.wait_ready(timeout=120)
    return live


def request_kwargs(k: int) -> dict:
    """The k-th distinct request: even ones chat, odd ones text completion."""
    common = dict(model="chat-model", max_tokens=MAX_TOKENS, temperature=0, stream=True,
                  stream_options={"include_usage": True})
    if k % 2 == 0:
        return dict(common, messages=[{"role": "user", "content": f"question number {k}: what is {k} + {k}?"}])
    return dict(common, prompt=f"def function_{k}(x):\n    return")


async def run_one(client: openai.AsyncOpenAI, k: int) -> tuple[str, str, int, int]:
    """Stream request ``k``; its text, finish reason and token counts."""
    kwargs = request_kwargs(k)
    chat = "messages" in kwargs
    stream = await (client.chat.completions.create(**kwargs) if chat else client.completions.create(**kwargs))
    text, finish, usage = [], None, None
    async with stream:
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                text.append((choice.delta.content or "") if chat else choice.text)
                finish = choice.finish_reason or finish
    assert usage is not None and finish is not None
    return "".join(text), finish, usage.prompt_tokens, usage.completion_tokens


async def load(base_url: str) -> tuple[dict[int, tuple], list[tuple[int, tuple]]]:
    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
        alone = {k: await run_one(client, k) for k in range(DISTINCT)}

        async def one_client(i: int) -> list[tuple[int, tuple]]:
            out = []
            for j in range(REQUESTS_PER_CLIENT):
                k = (i * REQUESTS_PER_CLIENT + j) % DISTINCT
                out.append((k, await run_one(client, k)))
            return out

        results = await asyncio.wait_for(asyncio.gather(*(one_client(i) for i in range(CLIENTS))), timeout=240)
    return alone, [r for client_results in results for r in client_results]


def test_sixteen_concurrent_streaming_clients(load_server):
    alone, together = asyncio.run(load(load_server.base_url))
    assert len(together) == CLIENTS * REQUESTS_PER_CLIENT
    for k, got in together:
        assert got == alone[k], f"request {k} under load differs from the same request alone"
    assert all(alone[k][3] >= 1 for k in alone)
    health = httpx.get(f"{load_server.base_url}/health", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    stats = httpx.get(f"{load_server.base_url}/v1/flashtier/stats", timeout=30).json()
    assert stats["queue_depth"] == 0 and stats["live"] is None


@pytest.fixture(scope="module")
def batched_server(server_factory, model_loader, chat_model_dir):
    """The same model served with continuous batching (--max-batch 4)."""
    from flashtier.apps.server import ServerConfig, create_app

    model = DEFAULT_MODEL if (DEFAULT_MODEL / "tokenizer.json").is_file() else chat_model_dir
    app = create_app(model_loader(model), ServerConfig("chat-model", max_batch=4))
    live = server_factory(app)
    assert app.state.worker.wait_ready(timeout=120)
    return live


def test_continuous_batching_gives_every_request_its_answer_alone(batched_server, load_server):
    """16 clients on a server that decodes up to 4 requests together: every answer equals the
    same request alone on the one-at-a-time server (batch invariance), nothing is lost or mixed."""
    alone, together = asyncio.run(load(batched_server.base_url))
    reference, _ = asyncio.run(load_one_each(load_server.base_url))
    assert alone == reference  # batched path, batch of one == the one-at-a-time path
    assert len(together) == CLIENTS * REQUESTS_PER_CLIENT
    for k, got in together:
        assert got == reference[k], f"request {k} in a batch differs from the same request alone"
    assert batched_server.app.state.worker.peak_batch == 4  # requests did decode together
    metrics = httpx.get(f"{batched_server.base_url}/metrics", timeout=30).text
    assert "flashtier_batch_size 0" in metrics
    stats = httpx.get(f"{batched_server.base_url}/v1/flashtier/stats", timeout=30).json()
    assert stats["queue_depth"] == 0


async def load_one_each(base_url: str) -> tuple[dict[int, tuple], None]:
    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
        return {k: await run_one(client, k) for k in range(DISTINCT)}, None


def _metric(base_url: str, name: str) -> float:
    for line in httpx.get(f"{base_url}/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_a_client_leaving_a_batch_is_dropped_and_the_others_go_on(batched_server):
    import time

    base = batched_server.base_url
    cancelled = _metric(base, "flashtier_requests_cancelled_total")
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
    with client.completions.create(model="chat-model", prompt="def long(x):", max_tokens=1500, temperature=0,
                                   stream=True, extra_body={"ignore_eos": True}) as stream:
        for n, _ in enumerate(stream):
            if n == 3:
                break
    r = client.completions.create(model="chat-model", prompt="def short(x):", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens >= 1
    deadline = time.time() + 30
    while _metric(base, "flashtier_requests_cancelled_total") < cancelled + 1 and time.time() < deadline:
        time.sleep(0.1)
    assert _metric(base, "flashtier_requests_cancelled_total") == cancelled + 1
    assert batched_server.app.state.worker.batch_size == 0


def test_batched_worker_runs_with_the_threads_option(chat_model_dir, server_factory):
    """``serve --max-batch N --threads T``: the batch's prefill passes run with T torch threads, as
    ``Model.stream``'s and ``generate_batch``'s do (they ran with torch's default before: on a busy
    2-core machine the shipped model served ~10x slower batched than one at a time). Decode steps
    keep the engine's own choice (one thread with the native kernel)."""
    import threading

    import torch

    from flashtier.apps.server import ServerConfig, create_app
    from flashtier.runtime import open_model

    default: list[int] = []
    probe = threading.Thread(target=lambda: default.append(torch.get_num_threads()))
    probe.start()
    probe.join()
    threads = default[0] + 1  # differs from what a fresh thread gets
    seen: list[tuple[bool, int]] = []  # (a prefill pass, torch threads)

    def load():
        model = open_model(chat_model_dir, threads=threads)
        forward_groups = model.transformer.forward_groups

        def recording(groups, *args, **kwargs):
            seen.append((any(len(g) > 1 for g in groups), torch.get_num_threads()))
            return forward_groups(groups, *args, **kwargs)

        model.transformer.forward_groups = recording
        return model

    app = create_app(load, ServerConfig("chat-model", max_batch=2))
    live = server_factory(app)
    assert app.state.worker.wait_ready(timeout=60)
    r = httpx.post(f"{live.base_url}/v1/completions", timeout=60,
                   json={"prompt": "a prompt of several tokens", "max_tokens": 3, "temperature": 0,
                         "ignore_eos": True})
    assert r.status_code == 200
    prefill = {n for is_prefill, n in seen if is_prefill}
    assert prefill == {threads}, f"prefill ran with {sorted(prefill)} threads, --threads {threads}"
    live.stop()
