"""Request bodies of the OpenAI-compatible endpoints, as pydantic models.

Contract: a body that validates is a request the engine can be asked to run, except for checks
that need the model (the prompt fits the context, token ids are in the vocabulary), which
:mod:`flashtier.apps.server.planning` makes. Fields the server does not know are ignored, as the
OpenAI API does; numbers, strings and booleans are strict (``"10"`` is not an integer), so a
wrong type is a 400, never a silent coercion. OpenAI fields that would change the answer in a way
the server cannot honour (``n > 1``, ``logprobs``, ``tools``, ``response_format``, ``logit_bias``,
penalties, ...: :data:`UNSUPPORTED_CHAT`, :data:`UNSUPPORTED_COMPLETION`) are rejected with a
message naming them, unless their value asks for nothing (``null``, ``[]``, ``0``, ...). Message
roles are ``system``, ``user`` and ``assistant``. A string that JSON allows but UTF-8 cannot
encode (a lone surrogate such as ``"\\ud800"``) is a 400 naming where it is.
"""

from __future__ import annotations

from typing import Annotated, Any, Callable, ClassVar, Mapping

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

StrictInt = Annotated[int, Field(strict=True)]
StrictStr = Annotated[str, Field(strict=True)]
StrictBool = Annotated[bool, Field(strict=True)]
MAX_STOP_STRINGS = 4
ROLES = ("system", "user", "assistant")
INVALID_UNICODE = "invalid_unicode"
UNSUPPORTED = "unsupported_field"


def _is_none(value: Any) -> bool:
    return value is None


def _is_empty(value: Any) -> bool:
    return value is None or value == [] or value == {}


def _is_zero(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0)


def _is_text_format(value: Any) -> bool:
    return value is None or value == {"type": "text"}


def _is_text_modality(value: Any) -> bool:
    return value is None or value == ["text"]


def _is_one(value: Any) -> bool:
    return value is None or (value == 1 and not isinstance(value, bool))


def _is_no_tool(value: Any) -> bool:
    return value is None or value == "none"


def _is_empty_text(value: Any) -> bool:
    return value is None or value == ""


Unsupported = Mapping[str, tuple[Callable[[Any], bool], str]]
"""Field -> (does this value ask for nothing?, what the field is and why it cannot be honoured)."""

UNSUPPORTED_COMMON: Unsupported = {
    "logit_bias": (_is_empty, "logit_bias is not supported (only {} or null)"),
    "presence_penalty": (_is_zero, "presence_penalty is not supported (only 0 or null)"),
    "frequency_penalty": (_is_zero, "frequency_penalty is not supported (only 0 or null)"),
}
UNSUPPORTED_CHAT: Unsupported = {
    **UNSUPPORTED_COMMON,
    "tools": (_is_empty, "tools are not supported: this server does no function calling"),
    "tool_choice": (_is_no_tool, "tool_choice is not supported: this server does no function calling "
                                 "(only \"none\" or null)"),
    "functions": (_is_empty, "functions are not supported: this server does no function calling"),
    "function_call": (_is_no_tool, "function_call is not supported: this server does no function calling "
                                   "(only \"none\" or null)"),
    "response_format": (_is_text_format, "response_format is not supported: only {\"type\": \"text\"} "
                                         "(no JSON mode or schemas)"),
    "top_logprobs": (_is_zero, "top_logprobs is not supported (logprobs are not returned)"),
    "audio": (_is_none, "audio output is not supported"),
    "modalities": (_is_text_modality, "modalities is not supported: only [\"text\"]"),
    "prediction": (_is_none, "prediction (predicted outputs) is not supported"),
}
UNSUPPORTED_COMPLETION: Unsupported = {
    **UNSUPPORTED_COMMON,
    "best_of": (_is_one, "best_of is not supported (only 1)"),
    "suffix": (_is_empty_text, "suffix is not supported (no fill-in-the-middle)"),
}
MESSAGE_UNSUPPORTED: Unsupported = {
    "tool_calls": (_is_empty, "tool calls are not supported: this server does no function calling"),
    "function_call": (_is_none, "function calls are not supported: this server does no function calling"),
}


def reject_unsupported(body: Any, unsupported: Unsupported) -> None:
    """Raise a validation error naming the first field of ``body`` that asks for what is not supported."""
    if not isinstance(body, dict):
        return
    for name, (harmless, why) in unsupported.items():
        if name in body and not harmless(body[name]):
            raise PydanticCustomError(UNSUPPORTED, "{why}; remove the field", {"field": name, "why": why})


def reject_invalid_unicode(value: Any, path: str = "") -> None:
    """Raise a validation error naming the first string (value or key) in ``value`` that UTF-8 cannot
    encode: JSON's ``\\ud800`` escapes decode to lone surrogates, which no tokenizer can take."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise PydanticCustomError(
                INVALID_UNICODE, "is not valid Unicode: it holds the lone surrogate {char} (from a \\u escape), "
                "which UTF-8 cannot encode", {"field": path, "char": f"U+{ord(value[e.start]):04X}"}) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            name = key if isinstance(key, str) else str(key)
            reject_invalid_unicode(key, path)
            reject_invalid_unicode(item, f"{path}.{name}" if path else name)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            reject_invalid_unicode(item, f"{path}[{i}]")


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
    n: StrictInt | None = 1
    """Number of choices; only 1 (or null) is supported."""
    ignore_eos: StrictBool = False
    """Keep generating after end-of-sequence tokens. An extension, as in vLLM."""

    unsupported: ClassVar[Unsupported] = UNSUPPORTED_COMMON

    @model_validator(mode="before")
    @classmethod
    def _strict_body(cls, data: Any) -> Any:
        reject_invalid_unicode(data)
        reject_unsupported(data, cls.unsupported)
        return data

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
    def _one_choice(cls, value: int | None) -> int:
        if value is None:
            return 1
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

    @model_validator(mode="before")
    @classmethod
    def _no_tool_calls(cls, data: Any) -> Any:
        reject_unsupported(data, MESSAGE_UNSUPPORTED)
        return data

    @field_validator("role")
    @classmethod
    def _known_role(cls, value: str) -> str:
        if value not in ROLES:
            raise ValueError(f"{value!r} is not a supported role; use one of {', '.join(ROLES)}")
        return value

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

    unsupported: ClassVar[Unsupported] = UNSUPPORTED_CHAT

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

    unsupported: ClassVar[Unsupported] = UNSUPPORTED_COMPLETION

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
