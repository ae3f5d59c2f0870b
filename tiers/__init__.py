"""flashtier.tiers: capacity-bounded pools and the TieredStore.

Knows nothing of what a page means to the model. Entry points: :class:`TieredStore` with
:class:`StoreConfig` and its arenas (:class:`ArenaConfig`), :class:`PageDesc` / :class:`PageSource` to describe pages,
:func:`stream_pages` for in-order streaming with prefetch, and the eviction policy registry
(:func:`make_policy`, :func:`register_policy`, :func:`available_policies`).
"""

from flashtier.tiers.config import ArenaConfig, StoreConfig
from flashtier.tiers.jobs import TransferJob
from flashtier.tiers.page import PageDesc, PageId, PageSource
from flashtier.tiers.policies import (
    EvictionPolicy,
    available_policies,
    make_policy,
    register_policy,
)
from flashtier.tiers.stats import StoreStats, TierStats
from flashtier.tiers.store import PageLocation, TieredStore
from flashtier.tiers.streaming import stream_pages

__all__ = [
    "ArenaConfig",
    "EvictionPolicy",
    "PageDesc",
    "PageId",
    "PageLocation",
    "PageSource",
    "StoreConfig",
    "StoreStats",
    "TierStats",
    "TieredStore",
    "TransferJob",
    "available_policies",
    "make_policy",
    "register_policy",
    "stream_pages",
]
