"""The OpenAI endpoints: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``.

Each completion request is checked in full before anything is queued (body schema, model name,
model loaded, prompt not too many characters to tokenize, prompt fits the context), so every
client mistake is a 400 with a JSON error; the generation then runs on the model worker, which
starts requests in arrival order (one at a time, or ``--max-batch`` together). A client that goes
away, streamed or not, cancels its generation; one that runs past ``--request-timeout`` gets 504
(non-streamed; :func:`~.responses.error_for`) or an error event (streamed).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Send

from flashtier.apps.reporting import context_limit
from flashtier.apps.server.config import ServerConfig
from flashtier.apps.server.errors import APIError
from flashtier.apps.server.metrics import ServerMetrics
from flashtier.apps.server.planning import check_prompt_chars, plan_generation
from flashtier.apps.server.responses import (Events, ResponseMeta, chat_chunks, chat_completion, collect,
                                             completion_chunks, event_stream, text_completion)
from flashtier.apps.server.schemas import ChatCompletionRequest, CompletionRequest, GenerationFields
from flashtier.apps.server.worker import Finished, ModelWorker, WorkerState, WorkerUnavailable
from flashtier.runtime import Model

CLIENT_CLOSED = 499  # nginx's "client closed request": never seen by the client, shows in access logs


@dataclass(frozen=True, slots=True)
class ServerContext:
    """What the routes share: the worker that owns the model, the counters, the settings."""

    worker: ModelWorker
    metrics: ServerMetrics
    config: ServerConfig

    def model_for(self, body: GenerationFields) -> Model:
        """The loaded model if ``body.model`` names it: else 404, or 503 / 500 while it cannot serve."""
        if body.model is not None and body.model not in self.config.model_aliases():
            raise APIError(404, f"the model {body.model!r} does not exist; this server runs {self.config.model_name!r}",
                           param="model", code="model_not_found")
        limit = self.config.max_queue
        if limit is not None and self.worker.queue_depth >= limit + self.config.max_batch:
            self.metrics.request_refused_busy()
            raise APIError(503, f"the server is busy: {self.worker.waiting} requests are waiting for the model "
                                f"(--max-queue {limit}); retry later", code="server_busy",
                           headers={"Retry-After": str(self.config.retry_after_s)})
        try:
            return self.worker.require_model()
        except WorkerUnavailable as e:
            if e.state is WorkerState.LOADING:
                raise APIError(503, str(e), code="model_loading",
                               headers={"Retry-After": str(self.config.retry_after_s)}) from e
            raise APIError(500 if e.state is WorkerState.FAILED else 503, str(e), code="model_unavailable") from e


class EventStreamResponse(StreamingResponse):
    """``text/event-stream`` that closes its body iterator however the response ends, so a client
    that goes away cancels its generation at once (not when the iterator is garbage collected)."""

    def __init__(self, content: Any) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


def completion_routes(ctx: ServerContext) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        entry: dict[str, Any] = {"id": ctx.config.model_name, "object": "model", "created": ctx.config.created,
                                 "owned_by": "flashtier"}
        if ctx.worker.model is not None:
            entry["max_model_len"] = context_limit(ctx.worker.model)
        return {"object": "list", "data": [entry]}

    @router.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        model = ctx.model_for(body)
        messages = body.engine_messages()
        check_prompt_chars(model, sum(len(m["content"]) for m in messages), ctx.config.prompt_chars_limit,
                           "messages")
        ids = await asyncio.to_thread(model.encode, messages=messages)
        plan = plan_generation(model, ids, body, body.requested_max_tokens, ctx.config.default_max_tokens, "messages")
        meta = ResponseMeta.new(ctx.config.model_name, "chatcmpl")
        if body.stream:
            return EventStreamResponse(event_stream(chat_chunks(meta, body.include_usage), ctx.worker.stream(plan),
                                                    None, ctx.metrics.request_failed))
        result = await collect_while_connected(request, ctx.worker.stream(plan))
        return JSONResponse(chat_completion(meta, *result)) if result else Response(status_code=CLIENT_CLOSED)

    @router.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        model = ctx.model_for(body)
        if isinstance(body.prompt, str):  # token ids are counted, not tokenized, by plan_generation
            check_prompt_chars(model, len(body.prompt), ctx.config.prompt_chars_limit, "prompt")
        ids = await asyncio.to_thread(model.encode, body.prompt)
        plan = plan_generation(model, ids, body, body.requested_max_tokens, ctx.config.default_max_tokens, "prompt")
        echo = ""
        if body.echo:
            echo = body.prompt if isinstance(body.prompt, str) else await asyncio.to_thread(_decode, model, ids)
        meta = ResponseMeta.new(ctx.config.model_name, "cmpl")
        if body.stream:
            return EventStreamResponse(event_stream(completion_chunks(meta, body.include_usage),
                                                    ctx.worker.stream(plan), echo, ctx.metrics.request_failed))
        result = await collect_while_connected(request, ctx.worker.stream(plan))
        if result is None:
            return Response(status_code=CLIENT_CLOSED)
        return JSONResponse(text_completion(meta, echo + result[0], result[1]))

    return router


async def collect_while_connected(request: Request, events: Events) -> tuple[str, Finished] | None:
    """:func:`collect` the job, unless the client closes the connection first: then the job is
    cancelled (the model moves on to the next request) and the result is None."""
    result = asyncio.ensure_future(collect(events))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (result, gone):
            if not task.done():
                task.cancel()
    return result.result() if result.done() and not result.cancelled() else None


async def _disconnected(request: Request) -> None:
    """Return when the client goes away (the body is read already, so the next message is that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _decode(model: Model, ids: list[int]) -> str:
    return model.tokenizer.decode(ids) if model.tokenizer is not None else ""
