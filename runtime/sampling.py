"""Choosing the next token from logits: greedy, or temperature / top-k / top-p with a seed."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flashtier.errors import ConfigError


@dataclass(frozen=True, slots=True)
class SamplingConfig:
    """How the next token is picked. ``temperature == 0`` means greedy."""

    temperature: float = 0.0
    """0 picks the most likely token; higher values flatten the distribution."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = all)."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches top_p (1 = all)."""
    seed: int | None = None
    """Seed for reproducible sampling (None = nondeterministic)."""

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and self.temperature == self.temperature):
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Sampler:
    """Stateful sampler: owns the random generator so a seed reproduces a whole generation."""

    def __init__(self, config: SamplingConfig) -> None:
        self.config = config
        self._gen = torch.Generator()
        if config.seed is not None:
            self._gen.manual_seed(config.seed)
        else:
            self._gen.seed()

    def __call__(self, logits: torch.Tensor) -> int:
        """Pick a token id from ``logits`` ``[V]``."""
        c = self.config
        if c.greedy:
            return int(torch.argmax(logits))
        logits = logits.float() / c.temperature
        if c.top_k:
            kth = torch.topk(logits, min(c.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if c.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            cum = torch.cumsum(sorted_p, dim=0)
            drop = cum - sorted_p >= c.top_p  # keep tokens until the mass before them reaches top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        return int(torch.multinomial(probs, 1, generator=self._gen))
