"""Request bodies of the OpenAI-compatible endpoints, as pydantic models.

Contract: a body that validates is a request the engine can be asked to run, except for checks
that need the model (the prompt fits the context, token ids are in the vocabulary), which
:mod:`flashtier.apps.server.planning` makes. Fields the server does not know are ignored, as the
OpenAI API does; numbers, strings and booleans are strict (``"10"`` is not an integer), so a
wrong type is a 400, never a silent coercion. Fields that would change the answer in a way the
server cannot honour (``n > 1``, ``logprobs``) are rejected with a message naming them.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

StrictInt = Annotated[int, Field(strict=True)]
StrictStr = Annotated[str, Field(strict=True)]
StrictBool = Annotated[bool, Field(strict=True)]
MAX_STOP_STRINGS = 4


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool = False
    """Send one more chunk before ``[DONE]`` with the request's token counts."""


class GenerationFields(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    """Served model name; another name is a 404. Optional (the server runs one model)."""
    max_tokens: Annotated[int | None, Field(strict=True, ge=1)] = None
    """Most tokens to generate (default: the server's default, clipped to the context left)."""
    temperature: Annotated[float, Field(strict=True, ge=0.0, le=2.0)] = 1.0
    """0 is greedy; higher values sample more freely."""
    top_p: Annotated[float, Field(strict=True, gt=0.0, le=1.0)] = 1.0
    """Nucleus sampling mass."""
    top_k: Annotated[int, Field(strict=True, ge=0)] = 0
    """Keep only the k most likely tokens (0 = all). An extension, as in vLLM."""
    seed: Annotated[int | None, Field(strict=True, ge=-(2**63), le=2**63 - 1)] = None
    """Seed of the sampler: the same request with the same seed gives the same answer."""
    stop: list[str] = Field(default_factory=list)
    """Up to 4 strings; generation stops before the first one (which is not returned)."""
    stream: StrictBool = False
    """Send server-sent events, one per piece of text."""
    stream_options: StreamOptions | None = None
    n: StrictInt = 1
    """Number of choices; only 1 is supported."""
    ignore_eos: StrictBool = False
    """Keep generating after end-of-sequence tokens. An extension, as in vLLM."""

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> list[str]:
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise ValueError("must be a string or a list of strings")
        if len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are supported, got {len(value)}")
        return [s for s in value if s]

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError(f"only n=1 is supported, got {value}")
        return value

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatMessage(BaseModel):
    """One turn: a role and its text (a string, or a list of ``{"type": "text", "text"}`` parts)."""

    model_config = ConfigDict(extra="ignore")

    role: Annotated[str, Field(strict=True, min_length=1)]
    content: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_content(cls, value: Any) -> str | None:
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list):
            texts = []
            for part in value:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError("only text content parts ({'type': 'text', 'text': ...}) are supported")
                texts.append(part["text"])
            return "".join(texts)
        raise ValueError("must be a string or a list of text parts")


class ChatCompletionRequest(GenerationFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage]
    """The conversation so far (at least one message); rendered with the checkpoint's chat template."""
    max_completion_tokens: Annotated[int | None, Field(strict=True, ge=1)] = None
    """Newer name of ``max_tokens``; wins when both are given."""
    logprobs: StrictBool | None = None

    @field_validator("messages")
    @classmethod
    def _some_messages(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if not value:
            raise ValueError("is empty; send at least one {'role': 'user', 'content': ...} message")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("logprobs are not supported")
        return value

    def engine_messages(self) -> list[dict[str, str]]:
        """The messages as the engine takes them (content ``None`` becomes empty text)."""
        return [{"role": m.role, "content": m.content or ""} for m in self.messages]

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(GenerationFields):
    """``POST /v1/completions``: one prompt, as text or token ids."""

    prompt: str | list[int]
    """Text, token ids, or a list holding exactly one of those."""
    echo: StrictBool = False
    """Return the prompt text before the completion."""
    logprobs: StrictInt | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> str | list[int]:
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
            value = value[0]  # a batch of one
        if isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            return value
        if isinstance(value, list) and value and all(isinstance(p, (str, list)) for p in value):
            raise ValueError(f"send one prompt per request (got a batch of {len(value)})")
        raise ValueError("must be a string or a list of token ids")

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: int | None) -> int | None:
        if value:
            raise ValueError("logprobs are not supported")
        return value

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens
