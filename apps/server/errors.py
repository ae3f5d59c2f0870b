"""Errors as the OpenAI API returns them: ``{"error": {"message", "type", "param", "code"}}``.

Every error response of the server has this shape and a status that says whose fault it is:
400 for a request the server cannot run (malformed JSON, a wrong type, a prompt longer than the
context, a field the server does not implement: FastAPI's 422 validation errors are turned into
400 here), 401 without the API key when one is set, 403 for a Host or Origin that is not allowed and 413 for a body over the limit
(:mod:`.guard`), 404 for an unknown model or path, 503 with ``Retry-After`` while the model loads,
504 for a request stopped by ``--request-timeout`` (with ``x-should-retry: false``, so that OpenAI's
clients do not send it again: it would time out again), 500 for a fault of the server.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from flashtier.errors import ConfigError, FlashtierError, InputError

log = logging.getLogger("flashtier.server")

STATUS_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error", 404: "not_found_error",
                405: "invalid_request_error", 413: "invalid_request_error", 503: "service_unavailable",
                504: "timeout_error", 500: "server_error"}


class APIError(Exception):
    """An error response: HTTP status, message, and the OpenAI ``type`` / ``param`` / ``code``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": STATUS_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def from_engine_error(err: FlashtierError) -> APIError:
    """The engine's user-facing errors: bad input or configuration is the client's (400)."""
    status = 400 if isinstance(err, (InputError, ConfigError)) else 500
    return APIError(status, str(err))


def validation_error(errors: Sequence[dict[str, Any]]) -> APIError:
    """One 400 from pydantic's error list: the first error names the field (``param``)."""
    first = errors[0] if errors else {"msg": "invalid request", "loc": ()}
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return APIError(400, f"the request body is not valid JSON: {detail}".rstrip(": "), code="invalid_json")
    loc = [p for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "missing" and not loc:
        return APIError(400, "the request body is missing; send a JSON object", code="invalid_request")
    if first.get("type") == "model_attributes_type" or (not loc and first.get("type") == "dict_type"):
        return APIError(400, "the request body must be a JSON object", code="invalid_request")
    param = _param_path(loc)
    field = (first.get("ctx") or {}).get("field")  # raised by a model validator (schemas): names the field
    if isinstance(field, str) and field:
        param = f"{param}{'' if field.startswith('[') or not param else '.'}{field}"
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "unsupported_field":  # a top-level field's message starts with its name
        return APIError(400, msg if msg.startswith(param) else f"{param}: {msg}", param=param,
                        code="unsupported_field")
    if first.get("type") == "invalid_unicode":
        return APIError(400, f"{param or 'the request body'} {msg}", param=param or None, code="invalid_unicode")
    if first.get("type") == "missing":
        msg = "is required"  # -> "messages is required"
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    sep = " " if msg.startswith("is ") else ": "
    return APIError(400, f"{param}{sep}{msg}{more}" if param else f"{msg}{more}", param=param or None,
                    code="invalid_value")


def _param_path(loc: Sequence[Any]) -> str:
    """``("messages", 0, "content")`` -> ``messages[0].content``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def install_error_handlers(app: FastAPI, on_error: Callable[[Request], None]) -> None:
    """Render every error in the OpenAI shape; ``on_error(request)`` is called for each (to count it)."""

    def respond(request: Request, err: APIError) -> JSONResponse:
        on_error(request)
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError) -> JSONResponse:
        return respond(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return respond(request, validation_error(exc.errors()))

    @app.exception_handler(FlashtierError)
    async def _engine(request: Request, exc: FlashtierError) -> JSONResponse:
        return respond(request, from_engine_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return respond(request, APIError(exc.status_code, message, headers=getattr(exc, "headers", None)))

    @app.exception_handler(Exception)
    async def _fault(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return respond(request, APIError(500, f"internal server error: {type(exc).__name__}: {exc}"))
