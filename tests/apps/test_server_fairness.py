"""Fairness of the model worker: requests start in arrival order (FIFO), and none starves while
others keep arriving.

Scenario, on the fixture model with continuous batching (``max_batch`` 2): three requests arrive
at once (the third one a long prompt that asks for many tokens, the kind a shortest-first policy
would keep behind the others), then one more arrives every time any running request gets a token,
until 12 have arrived, so the queue never empties while the early ones wait. A request's first
token is delivered when it is admitted, so the order of first tokens is the admission order; it
must be the arrival order, and every request must end with all its tokens, equal to its tokens
alone.
"""

from __future__ import annotations

import asyncio

import pytest

from flashtier.apps.server.metrics import ServerMetrics
from flashtier.apps.server.worker import Finished, GenerationRequest, ModelWorker
from flashtier.runtime import Model, SamplingConfig, TokenEvent

ARRIVALS = 12
MAX_BATCH = 2


def request(k: int, model: Model) -> GenerationRequest:
    """Request ``k``: a short prompt and 4..9 tokens, except k == 2: a long prompt, 24 tokens."""
    text = "The quick brown fox jumps over the lazy dog. " * 12 if k == 2 else f"request {k}:"
    ids = tuple(model.encode(text))
    return GenerationRequest(ids, 24 if k == 2 else 4 + k % 6, SamplingConfig(temperature=0.0), ignore_eos=True)


@pytest.fixture(scope="module")
def worker(chat_model_dir, model_loader):
    w = ModelWorker(model_loader(chat_model_dir), ServerMetrics(), max_batch=MAX_BATCH)
    w.start()
    assert w.wait_ready(timeout=60)
    yield w
    w.stop()


async def tokens_of(worker: ModelWorker, req: GenerationRequest) -> list[int]:
    out = []
    async for item in worker.stream(req):
        if isinstance(item, TokenEvent) and item.token_id is not None:
            out.append(item.token_id)
    return out


def test_admission_is_in_arrival_order_and_none_starves(worker):
    model = worker.require_model()
    requests = [request(k, model) for k in range(ARRIVALS)]
    assert len(requests[2].prompt_ids) > 5 * len(requests[3].prompt_ids)

    async def scenario() -> tuple[dict[int, list[int]], list[int], list[int], dict[int, Finished], int,
                                  dict[int, list[int]]]:
        alone = {k: await tokens_of(worker, r) for k, r in enumerate(requests)}
        arrived: list[int] = []
        admitted: list[int] = []
        got: dict[int, list[int]] = {}
        done: dict[int, Finished] = {}
        most_waiting = 0
        tasks: list[asyncio.Task] = []

        def arrive() -> None:
            k = len(arrived)
            arrived.append(k)
            tasks.append(asyncio.create_task(consume(k)))

        async def consume(k: int) -> None:
            nonlocal most_waiting
            got[k] = []
            async for item in worker.stream(requests[k]):
                if isinstance(item, Finished):
                    done[k] = item
                elif item.token_id is not None:
                    if not got[k]:
                        admitted.append(k)
                    got[k].append(item.token_id)
                    most_waiting = max(most_waiting, worker.waiting)
                    if len(arrived) < ARRIVALS:
                        arrive()
                        await asyncio.sleep(0)  # let it queue its job before this stream goes on

        for _ in range(3):
            arrive()
            await asyncio.sleep(0)  # each task queues its job at its first step: in arrival order
        while len(tasks) < ARRIVALS or not all(t.done() for t in tasks):
            await asyncio.gather(*tasks)
        return alone, arrived, admitted, done, most_waiting, got

    alone, arrived, admitted, done, most_waiting, got = asyncio.run(asyncio.wait_for(scenario(), timeout=120))
    assert arrived == list(range(ARRIVALS))
    assert most_waiting >= 3, "requests should have queued up behind the batch"
    assert admitted == arrived, f"admitted in the order {admitted}, arrived in the order {arrived}"
    for k, r in enumerate(requests):
        assert done[k].finish_reason == "length" and done[k].completion_tokens == r.max_new_tokens
        assert got[k] == alone[k], f"request {k} in the batch differs from the same request alone"
    assert worker.peak_batch == MAX_BATCH and worker.queue_depth == 0


def alone_then_together(worker: ModelWorker, requests: list[GenerationRequest]
                        ) -> tuple[list[list[int]], list[list[int]], int]:
    """Each request's tokens alone (one after another), then all of them arriving at once, and
    the largest batch the worker ran."""
    async def scenario() -> tuple[list[list[int]], list[list[int]], int]:
        alone = [await tokens_of(worker, r) for r in requests]
        tasks = []
        for r in requests:
            tasks.append(asyncio.create_task(tokens_of(worker, r)))
            await asyncio.sleep(0)
        together = list(await asyncio.gather(*tasks))
        return alone, together, worker.peak_batch

    return asyncio.run(asyncio.wait_for(scenario(), timeout=120))


def test_requests_wait_for_kv_budget_in_arrival_order(chat_model_dir, model_loader):
    """--kv-sequences below --max-batch under a budget: the KV of one context is planned, so a
    request that does not fit beside the running ones waits (not refused) and joins, in arrival
    order, as they finish; every answer equals its answer alone."""
    import gc

    options = dict(dram_budget="64M", max_context=48, kv_sequences=1, kv_block_size=16)
    w = ModelWorker(model_loader(chat_model_dir, **options), ServerMetrics(), max_batch=4)
    w.start()
    try:
        assert w.wait_ready(timeout=60)
        model = w.require_model()
        requests = [GenerationRequest(tuple(model.encode(f"request {k}:")), 6 + k, SamplingConfig(temperature=0.0),
                                      ignore_eos=True) for k in range(5)]

        alone, together, peak = alone_then_together(w, requests)
        assert together == alone
        assert peak < 4  # the KV budget, not --max-batch, bounded the batch
        assert w.queue_depth == 0
        gc.collect()
        kv = model.weights.store.stats(["kv.blocks"]).tiers["host"]
        assert kv.used_bytes <= kv.capacity_bytes
    finally:
        w.stop()


def test_retrieval_attention_requests_batch_with_their_own_caches(chat_model_dir, model_loader):
    """--attention retrieval with --max-batch 4 and --kv-sequences 2 under a KV budget: each request
    has its own long-context cache (1/2 of the budget), at most two decode together, the others
    wait in order; every answer equals its answer alone."""
    options = dict(attention="retrieval", window=32, kv_block_size=16, prefill_chunk=16, kv_dram_budget="16M",
                   kv_sequences=2)
    w = ModelWorker(model_loader(chat_model_dir, **options), ServerMetrics(), max_batch=4)
    w.start()
    try:
        assert w.wait_ready(timeout=60)
        model = w.require_model()
        text = "The quick brown fox jumps over the lazy dog. " * 6  # longer than the window: blocks are searched
        requests = [GenerationRequest(tuple(model.encode(f"{text} request {k}:")), 6 + k,
                                      SamplingConfig(temperature=0.0), ignore_eos=True) for k in range(4)]

        alone, together, peak = alone_then_together(w, requests)
        assert together == alone and all(len(t) == 6 + k for k, t in enumerate(together))
        assert peak == 2  # the KV budget's two shares, not --max-batch, bounded the batch
        assert w.queue_depth == 0
    finally:
        w.stop()
