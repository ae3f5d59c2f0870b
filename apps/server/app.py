"""``create_app``: the FastAPI application of ``flashtier serve``.

    app = create_app(lambda: open_model("models/tiny-moe", dram_budget="1G"), ServerConfig("tiny-moe"))
    uvicorn.run(app, host="127.0.0.1", port=8000)

The model loads on the worker thread when the app starts (lifespan), so the server listens at
once: ``/health`` says ``loading`` and completion requests get 503 + ``Retry-After`` until it is
ready. Besides the OpenAI routes (:mod:`.routes`) the app serves ``/health``, ``/metrics``
(Prometheus text), ``/v1/flashtier/stats`` (JSON for the web page) and the chat page at ``/``.
Every request first passes :class:`~.guard.RequestGuard` (Host / Origin allow-list, the API key
when one is set, body size limit). Nothing is global: two apps in one process are independent.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from flashtier import __version__
from flashtier.apps.server.config import ServerConfig
from flashtier.apps.server.errors import error_body, install_error_handlers
from flashtier.apps.server.guard import RequestGuard
from flashtier.apps.server.metrics import ServerMetrics
from flashtier.apps.server.responses import error_for
from flashtier.apps.server.routes import ServerContext, completion_routes
from flashtier.apps.server.worker import ModelWorker, RequestTimeout, WorkerState, WorkerUnavailable
from flashtier.runtime import Model

COMPLETION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


def create_app(model_loader: Callable[[], Model], config: ServerConfig) -> FastAPI:
    """The server app. ``model_loader`` is called once, on the worker thread, after startup."""
    metrics = ServerMetrics()
    worker = ModelWorker(model_loader, metrics, config.live_interval_s, config.max_batch, config.request_timeout_s)
    ctx = ServerContext(worker, metrics, config)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop)  # joins the worker thread: not on the event loop

    app = FastAPI(title="flashtier", version=__version__, lifespan=lifespan)
    app.state.worker, app.state.metrics, app.state.config = worker, metrics, config
    # added first = inner: requests the guard refuses are counted (received, failed) as well
    app.add_middleware(RequestGuard, allowed_hosts=config.allowed_hosts, max_body_bytes=config.max_body_bytes,
                       on_reject=lambda scope: _count_refusal(metrics, scope), api_key=config.api_key)
    app.add_middleware(_CountRequests, metrics=metrics)
    install_error_handlers(app, lambda request: _count_failure(metrics, request))

    @app.exception_handler(WorkerUnavailable)
    async def _stopping(request: Request, exc: WorkerUnavailable) -> JSONResponse:
        _count_failure(metrics, request)
        return JSONResponse(error_body(503, str(exc), code="model_unavailable"), status_code=503)

    @app.exception_handler(RequestTimeout)
    async def _timed_out(request: Request, exc: RequestTimeout) -> JSONResponse:
        _count_failure(metrics, request)
        err = error_for(exc)
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    app.include_router(completion_routes(ctx))
    page = resources.files("flashtier.apps").joinpath("static/chat.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> JSONResponse:
        body: dict[str, Any] = {"status": worker.state.value, "model": config.model_name}
        if worker.state is WorkerState.READY:
            body["status"] = "ok"
            return JSONResponse(body)
        if worker.state is WorkerState.LOADING:
            return JSONResponse(body, status_code=503, headers={"Retry-After": str(config.retry_after_s)})
        body["message"] = str(worker.error) if worker.error is not None else worker.state.value
        return JSONResponse(body, status_code=503 if worker.state is WorkerState.STOPPED else 500)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> PlainTextResponse:
        gauges = {"model_ready": (int(worker.state is WorkerState.READY), "1 once the model is loaded."),
                  "queue_depth": (worker.queue_depth, "Generations queued or running."),
                  "queue_length": (worker.waiting, "Generations queued and not started."),
                  "batch_size": (worker.batch_size, "Generations decoding together now.")}
        return PlainTextResponse(metrics.prometheus(gauges), media_type=PROMETHEUS_TEXT)

    @app.get("/v1/flashtier/stats")
    async def stats() -> dict[str, Any]:
        """Live figures for the chat page: state, queue, latency, the running and the last generation, memory."""
        return {"model": config.model_name, "state": worker.state.value, "queue_depth": worker.queue_depth,
                "queue_length": worker.waiting, "batch_size": worker.batch_size, **metrics.snapshot()}

    return app


def _count_failure(metrics: ServerMetrics, request: Request) -> None:
    if request.url.path in COMPLETION_PATHS:
        metrics.request_failed()


def _count_refusal(metrics: ServerMetrics, scope: Scope) -> None:
    if scope.get("method") == "POST" and scope.get("path") in COMPLETION_PATHS:
        metrics.request_failed()


class _CountRequests:
    """Pure ASGI middleware counting completion requests (before the body is even parsed)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("method") == "POST" and scope.get("path") in COMPLETION_PATHS:
            self.metrics.request_received()
        await self.app(scope, receive, send)
