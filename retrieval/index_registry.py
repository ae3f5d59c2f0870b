"""Key indexes by name, so configs and the CLI choose one without if/else chains.

``make_index("cluster", dim=64, scan_budget_fraction=0.02, segment_size=1024)`` builds the index
with its config dataclass; unknown names or options raise :class:`ConfigError` listing what exists.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

from flashtier.errors import ConfigError
from flashtier.retrieval.index import KeyIndex
from flashtier.retrieval.index_cluster import ClusterIndex, ClusterIndexConfig
from flashtier.retrieval.index_config import IndexConfig
from flashtier.retrieval.index_flat import FlatIndex, FlatIndexConfig
from flashtier.retrieval.index_ivf import IVFIndex, IVFIndexConfig


@dataclass(frozen=True)
class IndexEntry:
    """One registered index: its class and its config dataclass."""

    cls: type[KeyIndex]
    config_cls: type[IndexConfig]


INDEXES: Mapping[str, IndexEntry] = MappingProxyType({
    FlatIndex.name: IndexEntry(FlatIndex, FlatIndexConfig),
    IVFIndex.name: IndexEntry(IVFIndex, IVFIndexConfig),
    ClusterIndex.name: IndexEntry(ClusterIndex, ClusterIndexConfig),
})


def index_names() -> list[str]:
    """Registered index names."""
    return sorted(INDEXES)


def index_config(name: str, **options: int | float | None) -> IndexConfig:
    """The config of index ``name`` built from ``options`` (validated)."""
    entry = INDEXES.get(name)
    if entry is None:
        raise ConfigError(f"unknown retrieval index {name!r}; choose one of {index_names()}")
    fields = {f.name for f in dataclasses.fields(entry.config_cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ConfigError(f"index {name!r} has no option(s) {unknown}; its options are {sorted(fields)}")
    return entry.config_cls(**options)


def make_index(name: str, dim: int, **options: int | float | None) -> KeyIndex:
    """A new, empty index ``name`` over keys of dimension ``dim``."""
    config = index_config(name, **options)
    return INDEXES[name].cls(dim, config)
