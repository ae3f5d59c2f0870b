"""Eviction policies, chosen by name from a small registry.

A policy only ranks the pages resident in one tier; the store's manager skips pages that are
pinned (in use, in flight, resident-pinned) and evicts the first acceptable ones. A policy never
sees page contents.

Registered here:
  * ``lru``  least recently used.
  * ``mru``  most recently used: for cyclic scans larger than the tier (dense layers streamed every
    token) it keeps a fixed subset cached across passes where LRU would keep none.
  * ``lfu``  least frequently used (ties: least recent).
  * ``cost`` GreedyDual-Size: keeps pages whose reload cost per byte is high (small pages pay the
    storage latency on every reload) and ages everything on each eviction, so recency still counts.
  * ``lrfu`` frequency and recency together: each access adds 1 to a score that halves every
    ``half_life`` accesses to the tier; evicts the lowest score. The MoE expert cache starts here;
    a routing-aware "least-stale" policy can register itself with ``register_policy``.

Interface: ``insert`` when a page arrives, ``touch`` on each use, ``remove`` when it leaves for any
reason other than eviction, ``evict`` when the manager evicts it, and ``victims()`` yielding keys in
eviction order. ``victims`` is consumed before the manager mutates the policy.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator

from flashtier.errors import ConfigError

Key = Hashable


class EvictionPolicy(ABC):
    """Ranks one tier's resident pages for eviction (see the module docstring)."""

    @abstractmethod
    def insert(self, key: Key, nbytes: int, reload_cost_s: float) -> None:
        """A page arrived; ``reload_cost_s`` estimates the time to bring it back once evicted."""

    @abstractmethod
    def touch(self, key: Key) -> None:
        """The page was used (or announced as needed soon)."""

    @abstractmethod
    def remove(self, key: Key) -> None:
        """The page left the tier for a reason other than eviction."""

    def evict(self, key: Key) -> None:
        """The manager evicted the page (policies that age on eviction override this)."""
        self.remove(key)

    @abstractmethod
    def victims(self) -> Iterator[Key]:
        """Keys in eviction order, best victim first."""

    @abstractmethod
    def __len__(self) -> int:
        """Number of pages tracked."""


_REGISTRY: dict[str, Callable[..., EvictionPolicy]] = {}


def register_policy(name: str) -> Callable[[type[EvictionPolicy]], type[EvictionPolicy]]:
    """Class decorator adding a policy to the registry under ``name``."""

    def add(cls: type[EvictionPolicy]) -> type[EvictionPolicy]:
        if name in _REGISTRY:
            raise ValueError(f"eviction policy {name!r} is already registered")
        _REGISTRY[name] = cls
        return cls

    return add


def available_policies() -> list[str]:
    """Names accepted by ``make_policy``."""
    return sorted(_REGISTRY)


def make_policy(name: str, **options: float) -> EvictionPolicy:
    """A new policy instance by registry name; ConfigError naming the choices if unknown."""
    factory = _REGISTRY.get(name)
    if factory is None:
        raise ConfigError(
            f"unknown eviction policy {name!r}; choose one of {', '.join(available_policies())}"
        )
    return factory(**options)


@register_policy("lru")
class LruPolicy(EvictionPolicy):
    """Least recently used first."""

    def __init__(self) -> None:
        self._order: OrderedDict[Key, None] = OrderedDict()

    def insert(self, key: Key, nbytes: int, reload_cost_s: float) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def touch(self, key: Key) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: Key) -> None:
        self._order.pop(key, None)

    def victims(self) -> Iterator[Key]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)


@register_policy("mru")
class MruPolicy(LruPolicy):
    """Most recently used first (scan-resistant for cyclic access larger than the tier)."""

    def victims(self) -> Iterator[Key]:
        return reversed(self._order)


@register_policy("lfu")
class LfuPolicy(EvictionPolicy):
    """Least frequently used first; among equals, least recently used."""

    def __init__(self) -> None:
        self._clock = itertools.count()
        self._count: dict[Key, int] = {}
        self._last: dict[Key, int] = {}

    def insert(self, key: Key, nbytes: int, reload_cost_s: float) -> None:
        self._count[key] = self._count.get(key, 0) + 1
        self._last[key] = next(self._clock)

    def touch(self, key: Key) -> None:
        if key in self._count:
            self._count[key] += 1
            self._last[key] = next(self._clock)

    def remove(self, key: Key) -> None:
        self._count.pop(key, None)
        self._last.pop(key, None)

    def victims(self) -> Iterator[Key]:
        return iter(sorted(self._count, key=lambda k: (self._count[k], self._last[k])))

    def __len__(self) -> int:
        return len(self._count)


@register_policy("cost")
class CostAwarePolicy(EvictionPolicy):
    """GreedyDual-Size: priority ``H = L + reload_cost / size``; evict the lowest ``H``.

    ``L`` rises to the evicted page's ``H`` on each eviction, so pages not touched for a while
    fall behind newly touched ones (recency), while among pages of equal age those cheap to reload
    per byte (large sequential reads) go first.
    """

    def __init__(self) -> None:
        self._inflation = 0.0
        self._value: dict[Key, float] = {}  # reload cost per byte
        self._priority: dict[Key, float] = {}

    def insert(self, key: Key, nbytes: int, reload_cost_s: float) -> None:
        self._value[key] = reload_cost_s / max(nbytes, 1)
        self._priority[key] = self._inflation + self._value[key]

    def touch(self, key: Key) -> None:
        if key in self._value:
            self._priority[key] = self._inflation + self._value[key]

    def remove(self, key: Key) -> None:
        self._value.pop(key, None)
        self._priority.pop(key, None)

    def evict(self, key: Key) -> None:
        priority = self._priority.get(key)
        if priority is not None:
            self._inflation = max(self._inflation, priority)
        self.remove(key)

    def victims(self) -> Iterator[Key]:
        return iter(sorted(self._priority, key=self._priority.__getitem__))

    def __len__(self) -> int:
        return len(self._priority)


@register_policy("lrfu")
class LrfuPolicy(EvictionPolicy):
    """Frequency and recency: score += 1 per access, halving every ``half_life`` tier accesses."""

    def __init__(self, half_life: float = 64.0) -> None:
        if half_life <= 0:
            raise ConfigError(f"lrfu half_life must be > 0 accesses, got {half_life}")
        self._decay = 0.5 ** (1.0 / half_life)
        self._now = 0
        self._score: dict[Key, float] = {}
        self._last: dict[Key, int] = {}

    def _bump(self, key: Key) -> None:
        self._now += 1
        previous = self._score.get(key, 0.0) * self._decay ** (self._now - self._last.get(key, 0))
        self._score[key] = previous + 1.0
        self._last[key] = self._now

    def insert(self, key: Key, nbytes: int, reload_cost_s: float) -> None:
        self._bump(key)

    def touch(self, key: Key) -> None:
        if key in self._score:
            self._bump(key)

    def remove(self, key: Key) -> None:
        self._score.pop(key, None)
        self._last.pop(key, None)

    def victims(self) -> Iterator[Key]:
        now, decay = self._now, self._decay
        return iter(
            sorted(self._score, key=lambda k: self._score[k] * decay ** (now - self._last[k]))
        )

    def __len__(self) -> int:
        return len(self._score)
