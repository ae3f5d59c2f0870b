"""Turn a validated request body into a :class:`GenerationRequest` the worker can run.

This is where the checks that need the model live: the prompt is not too many characters to be
worth tokenizing (:func:`check_prompt_chars`, before the tokenizer runs), it is not empty, its token ids are in
the vocabulary, and prompt + ``max_tokens`` fit the context. Each failed check is a 400 that
names the parameter and says what to change; a request that passes cannot fail in the engine for
a reason the client could have fixed.
"""

from __future__ import annotations

from typing import Callable, Sequence

from flashtier.apps.reporting import context_limit
from flashtier.apps.server.errors import APIError, from_engine_error
from flashtier.apps.server.schemas import GenerationFields
from flashtier.apps.server.worker import GenerationRequest
from flashtier.errors import FlashtierError
from flashtier.runtime import Model, SamplingConfig


def check_prompt_chars(model: Model, chars: int, limit_for: Callable[[int], int], prompt_param: str) -> None:
    """Refuse (400) a prompt of ``chars`` characters over ``limit_for(context)`` before it is
    tokenized: tokenizing megabytes of text only to learn it does not fit would block the server."""
    context = context_limit(model)
    limit = limit_for(context)
    if chars > limit:
        raise APIError(400, f"the prompt is too long for this model's context of {context} tokens: {chars} "
                            f"characters, more than the {limit} this server tokenizes at most; shorten the prompt",
                       param=prompt_param, code="context_length_exceeded")


def plan_generation(model: Model, prompt_ids: Sequence[int], body: GenerationFields, requested_max: int | None,
                    default_max: int, prompt_param: str) -> GenerationRequest:
    """Check ``prompt_ids`` and the budget against ``model``; raise :class:`APIError` (400) if they
    cannot run. Without ``requested_max`` the answer may use ``default_max`` tokens or what is
    left of the context, whichever is smaller."""
    context = context_limit(model)
    vocab = model.config.vocab_size
    n = len(prompt_ids)
    if n == 0:
        raise APIError(400, f"{prompt_param} is empty; give at least one token of prompt", param=prompt_param,
                       code="invalid_value")
    bad = next((t for t in prompt_ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(400, f"{prompt_param}: token id {bad} is outside the vocabulary (0..{vocab - 1})",
                       param=prompt_param, code="invalid_value")
    if n >= context:
        raise APIError(400, f"this model's maximum context length is {context} tokens, but the prompt is {n} "
                            f"tokens; shorten the prompt", param=prompt_param, code="context_length_exceeded")
    if requested_max is None:
        max_new = min(default_max, context - n)
    elif n + requested_max > context:
        raise APIError(400, f"this model's maximum context length is {context} tokens; the request asks for "
                            f"{n + requested_max} ({n} in the prompt, {requested_max} to generate); lower max_tokens "
                            f"to at most {context - n} or shorten the prompt",
                       param="max_tokens", code="context_length_exceeded")
    else:
        max_new = requested_max
    try:
        sampling = SamplingConfig(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p, seed=body.seed)
    except FlashtierError as e:
        raise from_engine_error(e) from e
    return GenerationRequest(tuple(prompt_ids), max_new, sampling, tuple(body.stop), body.ignore_eos)
