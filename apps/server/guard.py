"""What every request passes before the app sees it: a Host / Origin allow-list, an optional API
key, a body size limit.

* **Host allow-list** (against DNS rebinding: a web page on ``evil.example`` whose name is then
  made to resolve to 127.0.0.1 could otherwise call a server on loopback as its own origin). A
  request whose ``Host`` header names another host than ``localhost``, ``127.0.0.1``, ``[::1]``,
  the address the server is bound to, or one allowed with ``--allow-host NAME`` gets 403. So does
  one whose ``Origin`` header (sent by browsers on cross-origin and on POST requests) is not such
  a host, or is ``null``: a page elsewhere cannot call the API either. A request without a
  ``Host`` header (HTTP/1.0) passes. ``--allow-host '*'`` turns both checks off.
* **API key** (``--api-key``, optional): with a key set, every request to ``/v1/...`` needs the
  header ``Authorization: Bearer KEY`` (compared in constant time), else 401 with
  ``WWW-Authenticate: Bearer``; this is checked before the body is read. ``/health``,
  ``/metrics`` and the chat page at ``/`` stay open (the page's own API calls then get 401).
* **Body size limit**: a body over ``max_body_bytes`` gets 413 before any of it is parsed: at once
  when ``Content-Length`` says so, else (chunked bodies) as soon as the bytes read pass the limit.
  The body is read here, whole, and handed to the app as one message.

Rejections are OpenAI-shaped errors (:func:`~flashtier.apps.server.errors.error_body`).
"""

from __future__ import annotations

import hmac
import json
from typing import Callable
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flashtier.apps.server.errors import error_body

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
ANY_HOST = "*"


def normalize_host(host: str) -> str:
    """``"[::1]"`` / ``"::1"`` -> ``"::1"``; names lower case, without a trailing dot."""
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host.rstrip(".")


def host_of(header: str) -> str:
    """The host of a ``Host`` header value (``name``, ``name:port``, ``[v6]``, ``[v6]:port``)."""
    header = header.strip()
    if header.startswith("["):
        end = header.find("]")
        return normalize_host(header[: end + 1] if end >= 0 else header)
    if header.count(":") == 1:
        header = header.split(":", 1)[0]
    return normalize_host(header)


def display_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class RequestGuard:
    """Pure ASGI middleware: Host / Origin allow-list, then the API key, then the body size limit."""

    def __init__(self, app: ASGIApp, allowed_hosts: tuple[str, ...], max_body_bytes: int,
                 on_reject: Callable[[Scope], None] | None = None, api_key: str | None = None) -> None:
        self.app = app
        self.any_host = ANY_HOST in allowed_hosts
        self.allowed = {normalize_host(h) for h in (*LOOPBACK_HOSTS, *allowed_hosts) if h and h != ANY_HOST}
        self.max_body_bytes = max_body_bytes
        self.on_reject = on_reject
        self.api_key = api_key.encode("utf-8") if api_key is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        refusal = None if self.any_host else self._host_refusal(headers)
        if refusal is not None:
            await self._reject(scope, send, 403, refusal, "host_not_allowed")
            return
        if self.api_key is not None and _needs_key(scope.get("path", "")):
            refusal = self._key_refusal(headers)
            if refusal is not None:
                await self._reject(scope, send, 401, refusal, "invalid_api_key",
                                   [(b"www-authenticate", b"Bearer")])
                return
        length = headers.get("content-length")
        if length is not None:
            try:
                declared = int(length)
                if declared < 0:
                    raise ValueError(length)
            except ValueError:
                await self._reject(scope, send, 400, f"invalid Content-Length header: {length!r}",
                                   "invalid_request")
                return
            if declared > self.max_body_bytes:
                await self._reject(scope, send, 413, self._too_large(f"{declared} bytes"), "request_too_large")
                return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left while sending: nobody to answer
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                await self._reject(scope, send, 413, self._too_large(f"more than {self.max_body_bytes} bytes"),
                                   "request_too_large")
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(bytes(body), receive), send)

    def _host_refusal(self, headers: dict[str, str]) -> str | None:
        host = headers.get("host")
        if host is not None and host_of(host) not in self.allowed:
            name = display_host(host_of(host))
            return (f"the Host header {name!r} is not allowed (protection against DNS rebinding); "
                    f"start the server with --allow-host {name} to accept it")
        origin = headers.get("origin")
        if origin is not None:
            try:
                origin_host = urlsplit(origin).hostname
            except ValueError:
                origin_host = None
            if origin_host is None:
                return (f"requests from the Origin {origin!r} are not allowed; call the API from a page served "
                        "by an allowed host")
            if normalize_host(origin_host) not in self.allowed:
                name = display_host(normalize_host(origin_host))
                return (f"requests from the Origin {origin!r} are not allowed (host {name!r}); "
                        f"start the server with --allow-host {name} to accept them")
        return None

    def _key_refusal(self, headers: dict[str, str]) -> str | None:
        how = "pass the server's API key (--api-key) in the header 'Authorization: Bearer YOUR_KEY'"
        value = headers.get("authorization")
        if value is None:
            return f"this server requires an API key; {how}"
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return f"the Authorization header is not a Bearer token; {how}"
        assert self.api_key is not None
        # header values are latin-1 strings here: back to their bytes, compared in constant time
        if not hmac.compare_digest(token.strip().encode("latin-1"), self.api_key):
            return f"the API key is not valid; {how}"
        return None

    def _too_large(self, size: str) -> str:
        return (f"the request body ({size}) is larger than the limit of {self.max_body_bytes} bytes; "
                "start the server with a larger --max-body-bytes to accept it")

    async def _reject(self, scope: Scope, send: Send, status: int, message: str, code: str,
                      extra_headers: list[tuple[bytes, bytes]] | None = None) -> None:
        if self.on_reject is not None:
            self.on_reject(scope)
        payload = json.dumps(error_body(status, message, code=code)).encode("utf-8")
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        headers.extend(extra_headers or ())
        headers.append((b"connection", b"close"))  # the body (or its rest) is not read
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


def _needs_key(path: str) -> bool:
    """The OpenAI API and the stats under ``/v1``; not ``/health``, ``/metrics`` or the page."""
    return path == "/v1" or path.startswith("/v1/")


def _headers(scope: Scope) -> dict[str, str]:
    """Header names in lower case -> the first value of each (latin-1, as HTTP/1.1 has them)."""
    out: dict[str, str] = {}
    for name, value in scope.get("headers", ()):
        out.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return out


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives the whole body as one message, then what the client sends next
    (``http.disconnect`` when it goes away: the routes watch for that to cancel generations)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
