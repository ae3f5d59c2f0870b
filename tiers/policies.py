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
    ``half_life`` accesses to the tier; evicts the lowest score.
  * ``least-stale`` frequency and recency on the owner's step clock (``tick``), for the per-layer
    MoE expert caches: a page's score counts the steps that used it, halving every ``half_life``
    steps; a page is the more stale the lower its score is now. Several touches in one step (a
    prediction, then the use) count once, and the clock does not run faster because a layer routes
    more tokens, so every expert of a layer ages at the same rate.

Interface: ``insert`` when a page arrives, ``touch`` on each use, ``remove`` when it leaves for any
reason other than eviction, ``evict`` when the manager evicts it, and ``victims()`` yielding keys in
eviction order. ``victims`` is consumed before the manager mutates the policy. ``tick`` marks one
step of the owner's logical clock (one forward pass); policies that age by steps use it.
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

    def place(self, key: Key, block: object) -> None:
        """Where the page landed in its pool (a :class:`~flashtier.tiers.base.Block`), told just
        before ``insert``; for policies that index pages by position (most ignore it)."""
        return None

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

    def tick(self) -> None:
        """One step of the owner's clock passed (e.g. one forward pass); most policies ignore it."""
        return None

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


@register_policy("least-stale")
class LeastStalePolicy(EvictionPolicy):
    """Frequency and recency in steps of the owner's clock (see the module docstring).

    ``score = sum over the steps that used the page of 0.5 ** (steps since then / half_life)``;
    the victim is the page with the lowest score now (ties: the least recently used). A small
    ``half_life`` makes it LRU over steps, a large one LFU. The score of an evicted page is
    remembered (up to ``history`` pages), so a page that comes back resumes its record.
    """

    def __init__(self, half_life: float = 8.0, history: int = 4096) -> None:
        if half_life <= 0:
            raise ConfigError(f"least-stale half_life must be > 0 steps, got {half_life}")
        self._decay = 0.5 ** (1.0 / half_life)
        self._history = int(history)
        self._step = 0
        self._order = itertools.count()
        self._record: dict[Key, tuple[float, int]] = {}
        """Resident pages: (score at ``last`` step, last step used)."""
        self._ghosts: OrderedDict[Key, tuple[float, int]] = OrderedDict()
        """Evicted pages' records, oldest first."""
        self._seq: dict[Key, int] = {}

    def _use(self, key: Key, record: tuple[float, int] | None) -> None:
        if record is None:
            self._record[key] = (1.0, self._step)
        elif record[1] != self._step:  # several touches in one step are one use
            self._record[key] = (record[0] * self._decay ** (self._step - record[1]) + 1.0, self._step)
        else:
            self._record[key] = record
        self._seq[key] = next(self._order)

    def insert(self, key: Key, nbytes: int, reload_cost_s: float) -> None:
        self._use(key, self._record.get(key) or self._ghosts.pop(key, None))

    def touch(self, key: Key) -> None:
        if key in self._record:
            self._use(key, self._record[key])

    def remove(self, key: Key) -> None:
        record = self._record.pop(key, None)
        self._seq.pop(key, None)
        if record is not None and self._history > 0:
            self._ghosts[key] = record
            if len(self._ghosts) > self._history:
                self._ghosts.popitem(last=False)

    def tick(self) -> None:
        self._step += 1

    def score(self, key: Key) -> float:
        """The page's score now (lower is staler)."""
        value, last = self._record[key]
        return value * self._decay ** (self._step - last)

    def victims(self) -> Iterator[Key]:
        return iter(sorted(self._record, key=lambda k: (self.score(k), self._seq[k])))

    def __len__(self) -> int:
        return len(self._record)
