"""Settings of the HTTP server (not of the engine: budgets go to the model loader)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from flashtier.errors import ConfigError

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
PROMPT_CHARS_PER_TOKEN = 16
"""Characters per token of context a prompt may have before it is refused untokenized: no
tokenizer makes fewer tokens than that of real text, so a longer prompt cannot fit."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """How the server answers; every field can be a ``flashtier serve`` flag."""

    model_name: str
    """Name the model is served under (``/v1/models``, the ``model`` field of requests)."""
    default_max_tokens: int = 512
    """Tokens generated when a request gives no max_tokens (clipped to the context left)."""
    retry_after_s: int = 2
    """``Retry-After`` seconds sent with 503 while the model loads."""
    live_interval_s: float = 0.5
    """How often, during a generation, the memory report of ``/v1/flashtier/stats`` is refreshed."""
    max_queue: int | None = None
    """Most requests waiting for the model besides the ``max_batch`` it runs; a request that finds
    the queue full gets 503 with ``Retry-After`` before its prompt is tokenized (checked when the
    request arrives, so requests tokenizing at that moment may overshoot it by a few). None:
    unbounded."""
    max_batch: int = 1
    """Requests that decode together (continuous batching: each weight fetched once per step for
    all of them; every request's tokens equal its tokens alone). 1: one request at a time, in
    arrival order, with the conversation-prefix reuse of the KV cache."""
    request_timeout_s: float | None = None
    """Seconds a request may take from being queued for the model (after its checks and
    tokenization; waiting time included) to its last token. Past it the request is answered with
    an error at once (504 ``request_timeout``, or an error event in a stream) and its generation
    stops at the next token boundary, freeing its KV and batch slot. None: no limit."""
    aliases: tuple[str, ...] = ()
    """Other names a request may use for the model (e.g. the folder path)."""
    created: int = field(default_factory=lambda: int(time.time()))
    """Unix time reported as the model's ``created``."""
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    """Largest request body accepted; a larger one gets 413 before it is parsed."""
    allowed_hosts: tuple[str, ...] = ()
    """Host names (``Host`` / ``Origin`` headers) accepted besides localhost, 127.0.0.1 and [::1]
    (give the address the server is bound to here); ``"*"`` accepts any host."""
    api_key: str | None = field(default=None, repr=False)
    """With a key, every ``/v1/...`` request needs ``Authorization: Bearer KEY`` (else 401);
    None: no authentication. ``/health``, ``/metrics`` and the chat page stay open."""
    max_prompt_chars: int | None = None
    """Longest prompt, in characters (all messages' contents, or the completion prompt), that is
    tokenized at all; a longer one gets 400 at once. None: ``PROMPT_CHARS_PER_TOKEN`` characters
    per token of the model's context."""

    def __post_init__(self) -> None:
        if not self.model_name:
            raise ConfigError("model_name must not be empty")
        if self.default_max_tokens < 1:
            raise ConfigError(f"default_max_tokens must be >= 1, got {self.default_max_tokens}")
        if self.retry_after_s < 0:
            raise ConfigError(f"retry_after_s must be >= 0, got {self.retry_after_s}")
        if self.max_queue is not None and (not isinstance(self.max_queue, int) or self.max_queue < 0):
            raise ConfigError(f"max_queue must be a whole number >= 0, got {self.max_queue!r}")
        if not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise ConfigError(f"max_batch must be a whole number >= 1, got {self.max_batch!r}")
        if self.request_timeout_s is not None and (
                isinstance(self.request_timeout_s, bool) or not isinstance(self.request_timeout_s, (int, float))
                or not math.isfinite(self.request_timeout_s) or self.request_timeout_s <= 0):
            raise ConfigError(f"request_timeout_s must be a positive number of seconds (or None for no limit), "
                              f"got {self.request_timeout_s!r}")
        if self.live_interval_s <= 0:
            raise ConfigError(f"live_interval_s must be positive, got {self.live_interval_s}")
        if self.max_body_bytes < 1:
            raise ConfigError(f"max_body_bytes must be >= 1, got {self.max_body_bytes}")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key
                                         or self.api_key != self.api_key.strip() or " " in self.api_key):
            raise ConfigError("api_key must be a non-empty string without spaces (or None for no authentication)")
        if self.max_prompt_chars is not None and self.max_prompt_chars < 1:
            raise ConfigError(f"max_prompt_chars must be >= 1, got {self.max_prompt_chars}")
        if any(not isinstance(h, str) or not h.strip() for h in self.allowed_hosts):
            raise ConfigError(f"allowed_hosts must be non-empty host names, got {self.allowed_hosts!r}")

    def model_aliases(self) -> set[str]:
        return {self.model_name, *self.aliases}

    def prompt_chars_limit(self, context_tokens: int) -> int:
        """Characters a prompt may have before it is tokenized, for a context of ``context_tokens``."""
        if self.max_prompt_chars is not None:
            return self.max_prompt_chars
        return PROMPT_CHARS_PER_TOKEN * context_tokens
