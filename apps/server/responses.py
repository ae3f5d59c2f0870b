"""OpenAI response objects and server-sent-event streams built from the worker's job items.

A stream is ``data: <json>\\n\\n`` events: chat streams open with a chunk carrying
``delta.role``; text arrives in content chunks (empty pieces are skipped); a chunk with empty
delta / text carries ``finish_reason``; with ``stream_options.include_usage`` every chunk has
``"usage": null`` and one more chunk with no choices carries the usage; ``data: [DONE]`` ends it.
An engine fault after the stream began, or the request running past ``--request-timeout``, is sent
as one ``{"error": ...}`` event before ``[DONE]`` (OpenAI's Python client raises ``APIError``
with its message; the chat page shows it); ``finish_reason`` is then never sent.
"""

from __future__ import annotations

import json
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from flashtier.apps.server.errors import APIError, from_engine_error
from flashtier.apps.server.worker import Finished, RequestTimeout
from flashtier.errors import FlashtierError
from flashtier.runtime import TokenEvent

Events = AsyncIterator[TokenEvent | Finished]


@dataclass(frozen=True, slots=True)
class ResponseMeta:
    """What every object of one response shares: model name, response id, creation time."""

    model: str
    id: str
    created: int

    @classmethod
    def new(cls, model: str, prefix: str) -> ResponseMeta:
        """A fresh id with OpenAI's prefix: ``chatcmpl`` (chat) or ``cmpl`` (text completion)."""
        return cls(model, f"{prefix}-{uuid.uuid4().hex}", int(time.time()))

    def head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "system_fingerprint": None}


def error_for(exc: Exception) -> APIError:
    """The error response for a generation that ended with ``exc``: 504 for a request timeout,
    400 for bad input or configuration found by the engine, else 500."""
    if isinstance(exc, RequestTimeout):
        return APIError(504, str(exc), code="request_timeout", headers={"x-should-retry": "false"})
    if isinstance(exc, FlashtierError):
        return from_engine_error(exc)
    return APIError(500, f"generation failed: {type(exc).__name__}: {exc}")


def usage(done: Finished) -> dict[str, Any]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": done.cached_prompt_tokens}}


async def collect(events: Events) -> tuple[str, Finished]:
    """Run a job to its end: the whole text and its :class:`Finished`."""
    parts: list[str] = []
    async with aclosing(events):
        async for item in events:
            if isinstance(item, Finished):
                return "".join(parts), item
            parts.append(item.text)
    raise RuntimeError("the generation ended without a finish item")


def chat_completion(meta: ResponseMeta, text: str, done: Finished) -> dict[str, Any]:
    return {**meta.head("chat.completion"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": done.finish_reason}],
            "usage": usage(done)}


def text_completion(meta: ResponseMeta, text: str, done: Finished) -> dict[str, Any]:
    return {**meta.head("text_completion"),
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": done.finish_reason}],
            "usage": usage(done)}


def sse(obj: dict[str, Any] | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, separators=(',', ':'))}\n\n"


def chat_chunks(meta: ResponseMeta, include_usage: bool) -> ChunkMaker:
    """Chunks of ``chat.completion.chunk``: text goes in ``delta.content``."""

    def make(text: str | None, finish: str | None) -> dict[str, Any]:
        delta = {"role": "assistant", "content": ""} if text is None else ({"content": text} if text else {})
        out = {**meta.head("chat.completion.chunk"),
               "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        return {**out, "usage": None} if include_usage else out

    return ChunkMaker(meta.head("chat.completion.chunk"), make, include_usage)


def completion_chunks(meta: ResponseMeta, include_usage: bool) -> ChunkMaker:
    """Chunks of ``text_completion``: text goes in ``choices[0].text``."""

    def make(text: str | None, finish: str | None) -> dict[str, Any]:
        out = {**meta.head("text_completion"),
               "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]}
        return {**out, "usage": None} if include_usage else out

    return ChunkMaker(meta.head("text_completion"), make, include_usage)


@dataclass(frozen=True, slots=True)
class ChunkMaker:
    """How one kind of stream wraps text: ``make(text, finish_reason)``; ``text=None`` is the opening."""

    head: dict[str, Any]
    make: Callable[[str | None, str | None], dict[str, Any]]
    include_usage: bool


async def event_stream(chunks: ChunkMaker, events: Events, opening: str | None,
                       on_failure: Callable[[], None]) -> AsyncIterator[str]:
    """The SSE body of one streamed response; ``opening`` is the first chunk's text (None: a chat
    role chunk, "" for none, else an echoed prompt)."""
    if opening is None or opening:
        yield sse(chunks.make(opening, None))
    async with aclosing(_pieces(events, on_failure)) as pieces:
        async for piece in pieces:
            if isinstance(piece, Finished):
                yield sse(chunks.make("", piece.finish_reason))
                if chunks.include_usage:
                    yield sse({**chunks.head, "choices": [], "usage": usage(piece)})
            elif isinstance(piece, str):
                yield sse(chunks.make(piece, None))
            else:
                yield sse(piece)
    yield sse("[DONE]")


async def _pieces(events: Events, on_failure: Callable[[], None]) -> AsyncIterator[str | Finished | dict[str, Any]]:
    """Non-empty text pieces, then the :class:`Finished`; an engine fault becomes an error body.

    ``events`` is closed however this ends (a disconnect throws into the ``yield``), which cancels
    the generation.
    """
    async with aclosing(events):
        try:
            async for item in events:
                if isinstance(item, Finished):
                    yield item
                elif item.text:
                    yield item.text
        except Exception as e:  # noqa: BLE001 - reported to the client, the stream must end cleanly
            on_failure()
            yield error_for(e).body()
