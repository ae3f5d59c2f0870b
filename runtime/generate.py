"""The generation loop: chunked prefill, then one decode step per token, with timing statistics.

:func:`generate_ids` is a generator of token ids: the caller may stop iterating at any time (a
client went away, a stop string appeared) and the cache stays consistent up to the last token
yielded. Statistics accumulate in the :class:`GenerationStats` passed in.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from flashtier.checkpoint.config import ModelConfig
from flashtier.errors import InputError
from flashtier.runtime.kv.cache import BlockKVCache
from flashtier.runtime.model import Transformer
from flashtier.runtime.sampling import Sampler


@dataclass
class GenerationStats:
    """Timings and counts of one generation (prompt tokens reused from the cache excluded)."""

    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    first_token_s: float = 0.0
    finish_reason: str = "length"
    extra: dict[str, float] = field(default_factory=dict)
    decode_start_counters: dict[str, float] = field(default_factory=dict)
    """Cumulative IO counters (bytes read, IO wait) when decoding began, to report decode-only rates."""

    @property
    def prefill_tok_s(self) -> float:
        n = self.prompt_tokens - self.cached_prompt_tokens
        return n / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        # The first generated token comes from the prefill logits; decode steps produce the rest.
        steps = max(self.generated_tokens - 1, 0)
        return steps / self.decode_s if self.decode_s > 0 else 0.0


def check_request(cfg: ModelConfig, prompt: Sequence[int], max_new_tokens: int, context_limit: int | None) -> None:
    """InputError for an empty prompt, a token outside the vocabulary, a negative
    ``max_new_tokens``, or a request longer than the context."""
    n = len(prompt)
    if n == 0:
        raise InputError("the prompt is empty; give at least one token")
    bad = [t for t in prompt if not 0 <= t < cfg.vocab_size]
    if bad:
        raise InputError(f"prompt token id {bad[0]} is outside the vocabulary (0..{cfg.vocab_size - 1})")
    if max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    limit = min(cfg.max_position_embeddings, context_limit or cfg.max_position_embeddings)
    if n + max_new_tokens > limit:
        what = "the model's context" if limit == cfg.max_position_embeddings else "the configured --max-context"
        raise InputError(
            f"prompt ({n} tokens) + max_new_tokens ({max_new_tokens}) exceeds {what} of "
            f"{limit} tokens; shorten the prompt or ask for fewer tokens"
        )


def generate_ids(
    model: Transformer,
    cache: BlockKVCache,
    prompt: Sequence[int],
    max_new_tokens: int,
    sampler: Sampler,
    stop_ids: Sequence[int] = (),
    stats: GenerationStats | None = None,
    prefill_chunk: int = 512,
    reuse: int = 0,
    context_limit: int | None = None,
    decode_threads: int | None = None,
) -> Iterator[int]:
    """Yield up to ``max_new_tokens`` new token ids after ``prompt``.

    ``reuse`` tokens of the prompt are already in ``cache`` (a shared prefix from an earlier turn);
    only the rest is prefilled. Stops after a token in ``stop_ids`` (which is yielded).
    ``decode_threads``: torch threads during decode steps (restored afterwards). With flashtier's
    C kernel doing the weight products on its own threads, torch's remaining decode ops are tiny,
    and torch's OpenMP threads spinning after each of them take the cores the kernel needs
    (measured on dense-1.7g in memory: 9.5 tok/s with 2 torch threads, 16.6 with them passive).
    """
    cfg = model.config
    stats = stats if stats is not None else GenerationStats()
    n = len(prompt)
    check_request(cfg, prompt, max_new_tokens, context_limit)
    reuse = max(0, min(reuse, n - 1, cache.length))
    cache.truncate(reuse)
    cache.reserve(n + max_new_tokens)
    stats.prompt_tokens, stats.cached_prompt_tokens = n, reuse
    if max_new_tokens == 0:
        return
    stop = set(stop_ids)
    ids = torch.tensor(prompt, dtype=torch.long)
    t0 = time.perf_counter()
    with torch.inference_mode():
        logits = None
        for s in range(reuse, n, prefill_chunk):
            logits = model.forward(ids[s : s + prefill_chunk], cache, s)
        assert logits is not None
        token = sampler(logits[-1])
        stats.prefill_s = stats.first_token_s = time.perf_counter() - t0
        stats.generated_tokens = 1
        pos = n
        saved_threads = torch.get_num_threads()
        if decode_threads is not None:
            torch.set_num_threads(decode_threads)
        try:
            yield from _decode(model, cache, token, pos, max_new_tokens, sampler, stop, stats)
        finally:
            if decode_threads is not None:
                torch.set_num_threads(saved_threads)


def _decode(model: Transformer, cache: BlockKVCache, token: int, pos: int, max_new_tokens: int,
            sampler: Sampler, stop: set[int], stats: GenerationStats) -> Iterator[int]:
    """The decode loop of :func:`generate_ids` (inside its inference mode)."""
    with torch.inference_mode():
        while True:
            yield token
            if token in stop:
                stats.finish_reason = "stop"
                return
            if stats.generated_tokens >= max_new_tokens:
                stats.finish_reason = "length"
                return
            t1 = time.perf_counter()
            logits = model.forward(torch.tensor([token]), cache, pos)
            pos += 1
            token = sampler(logits[-1])
            stats.decode_s += time.perf_counter() - t1
            stats.generated_tokens += 1
