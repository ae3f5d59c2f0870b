"""KV selection policies for one kv head, behind one interface so they can be compared.

A policy sees every token's key as it enters the cache (``append``), names the positions the query
group attends at a decode step (``select``), and may learn from the attention probabilities those
positions received (``observe``). Positions are absolute, tokens are numbered ``0 .. length-1`` in
``append`` order.

- ``streaming`` (StreamingLLM): the first ``sink_tokens`` and the last ``window`` positions.
- ``h2o`` (heavy hitters): the last ``recent`` positions plus the ``heavy`` evicted-never positions
  with the highest attention accumulated by ``observe``; H2O evicts for good, so a token dropped
  once never comes back.
- ``retrieval``: sinks + window (resident) plus the union of the group's top-k from a key index
  over every older token (see :mod:`flashtier.retrieval.attention`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar, Mapping

import torch

from flashtier.errors import ConfigError, InputError
from flashtier.retrieval.attention import GroupSearch, RetrievalConfig
from flashtier.retrieval.buffer import GrowableRows


class SelectionPolicy(ABC):
    """Which cached positions one kv head's query group attends at each decode step."""

    name: ClassVar[str]

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.length = 0  # tokens appended so far

    def append(self, keys: torch.Tensor) -> None:
        """New tokens' keys ``[n, D]`` at positions ``length .. length + n - 1``."""
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise InputError(f"{self.name} policy: keys must be [n, {self.dim}], got {tuple(keys.shape)}")
        start = self.length
        self.length += keys.shape[0]
        self._append(keys.detach().float(), start)

    @abstractmethod
    def _append(self, keys: torch.Tensor, start: int) -> None:
        """Account for validated ``keys [n, D]`` at positions ``start ..`` (``length`` already updated)."""

    @abstractmethod
    def select(self, queries: torch.Tensor) -> torch.Tensor:
        """Positions ``[n]`` (increasing, distinct) the group ``queries [G, D]`` attends now."""

    @abstractmethod
    def observe(self, positions: torch.Tensor, probs: torch.Tensor) -> None:
        """Attention ``probs [G, n]`` the group gave to the selected ``positions [n]`` this step."""


@dataclass(frozen=True)
class StreamingConfig:
    """StreamingLLM: attention sinks + recent window."""

    sink_tokens: int = 4
    """First positions always kept."""
    window: int = 256
    """Most recent positions kept."""

    def __post_init__(self) -> None:
        if self.sink_tokens < 0 or self.window < 0:
            raise ConfigError(f"streaming policy needs sink_tokens >= 0 and window >= 0, got {self.sink_tokens}, {self.window}")


class StreamingPolicy(SelectionPolicy):
    """Keeps sinks + window; ignores keys and attention."""

    name: ClassVar[str] = "streaming"

    def __init__(self, dim: int, config: StreamingConfig = StreamingConfig()) -> None:
        super().__init__(dim)
        self.config = config

    def _append(self, keys: torch.Tensor, start: int) -> None:
        """Nothing to remember: the kept set depends only on ``length``."""

    def select(self, queries: torch.Tensor) -> torch.Tensor:
        sinks = min(self.config.sink_tokens, self.length)
        return torch.cat([torch.arange(sinks), torch.arange(max(sinks, self.length - self.config.window), self.length)])

    def observe(self, positions: torch.Tensor, probs: torch.Tensor) -> None:
        """Attention does not change what streaming keeps."""


@dataclass(frozen=True)
class H2OConfig:
    """H2O: heavy hitters + recent tokens."""

    heavy: int = 128
    """Older positions kept by accumulated attention."""
    recent: int = 128
    """Most recent positions always kept."""

    def __post_init__(self) -> None:
        if self.heavy < 0 or self.recent < 0 or self.heavy + self.recent == 0:
            raise ConfigError(f"h2o policy needs heavy, recent >= 0 and heavy + recent > 0, got {self.heavy}, {self.recent}")


class H2OPolicy(SelectionPolicy):
    """Keeps at most ``heavy + recent`` positions, evicting the lowest accumulated attention first
    (ties: the older position) among those outside the recent window."""

    name: ClassVar[str] = "h2o"

    def __init__(self, dim: int, config: H2OConfig = H2OConfig()) -> None:
        super().__init__(dim)
        self.config = config
        self._scores = GrowableRows((), torch.float64)  # [length] accumulated attention
        self._kept = GrowableRows((), torch.bool)  # [length] still in the cache

    def _append(self, keys: torch.Tensor, start: int) -> None:
        n = keys.shape[0]
        self._scores.append(torch.zeros(n, dtype=torch.float64))
        self._kept.append(torch.ones(n, dtype=torch.bool))
        kept = self._kept.view()
        excess = int(kept.sum()) - (self.config.heavy + self.config.recent)
        if excess <= 0:
            return
        old = kept.clone()
        old[max(0, self.length - self.config.recent) :] = False  # the recent window is never evicted
        candidates = torch.nonzero(old).squeeze(1)  # [c] increasing positions
        order = torch.argsort(self._scores.view()[candidates], stable=True)  # lowest first, older first on ties
        kept[candidates[order[:excess]]] = False

    def select(self, queries: torch.Tensor) -> torch.Tensor:
        return torch.nonzero(self._kept.view()).squeeze(1)

    def observe(self, positions: torch.Tensor, probs: torch.Tensor) -> None:
        self._scores.view()[positions] += probs.detach().double().sum(dim=0)


class RetrievalPolicy(SelectionPolicy):
    """Sinks + window resident; older tokens go to a key index and come back by top-k search."""

    name: ClassVar[str] = "retrieval"

    def __init__(self, dim: int, config: RetrievalConfig = RetrievalConfig()) -> None:
        super().__init__(dim)
        self.config = config
        self.index = config.make_index(dim)
        self._waiting = GrowableRows((dim,), torch.float32)  # [w, D] keys of positions not yet indexed
        self._first_waiting = 0  # position of _waiting row 0
        self.last_keys_scanned = 0  # keys the last select() scored

    def _append(self, keys: torch.Tensor, start: int) -> None:
        self._waiting.append(keys)
        sinks = self.config.sink_tokens
        if self._first_waiting < sinks:  # sinks stay resident: drop them from the waiting rows
            drop = min(sinks, self.length) - self._first_waiting
            rest = self._waiting.view()[drop:].clone()
            self._waiting = GrowableRows((self.dim,), torch.float32)
            self._waiting.append(rest)
            self._first_waiting += drop
        leaving = max(0, self.length - self.config.window) - self._first_waiting  # rows that left the window
        if leaving <= 0:
            return
        waiting = self._waiting.view()
        self.index.add(waiting[:leaving], torch.arange(self._first_waiting, self._first_waiting + leaving))
        rest = waiting[leaving:].clone()
        self._waiting = GrowableRows((self.dim,), torch.float32)
        self._waiting.append(rest)
        self._first_waiting += leaving

    def select(self, queries: torch.Tensor) -> torch.Tensor:
        resident = self.config.resident_positions(self.length)
        rows = queries.float().mean(dim=0, keepdim=True) if self.config.group_search is GroupSearch.MEAN else queries.float()
        found = self.index.search(rows, self.config.top_k)
        self.last_keys_scanned = found.keys_scanned
        return torch.unique(torch.cat([resident, found.positions.reshape(-1)]))

    def observe(self, positions: torch.Tensor, probs: torch.Tensor) -> None:
        """Retrieval does not learn from attention (the index is rebuilt from keys only)."""


@dataclass(frozen=True)
class PolicyEntry:
    """One registered policy: its class and its config dataclass."""

    cls: type[SelectionPolicy]
    config_cls: type


POLICIES: Mapping[str, PolicyEntry] = MappingProxyType({
    StreamingPolicy.name: PolicyEntry(StreamingPolicy, StreamingConfig),
    H2OPolicy.name: PolicyEntry(H2OPolicy, H2OConfig),
    RetrievalPolicy.name: PolicyEntry(RetrievalPolicy, RetrievalConfig),
})


def policy_names() -> list[str]:
    """Registered selection policy names."""
    return sorted(POLICIES)


def make_policy(name: str, dim: int, **options: object) -> SelectionPolicy:
    """A new policy ``name`` for keys of dimension ``dim``, its config built from ``options``."""
    entry = POLICIES.get(name)
    if entry is None:
        raise ConfigError(f"unknown selection policy {name!r}; choose one of {policy_names()}")
    try:
        config = entry.config_cls(**options)
    except TypeError as e:
        raise ConfigError(f"selection policy {name!r}: bad options {sorted(options)} ({e})") from e
    return entry.cls(dim, config)
