"""``ivf``: faiss inverted-file index with an inner-product coarse quantizer (plain ANN baseline).

Keys are buffered and scanned exactly until ``train_min_keys`` have arrived; then the coarse
quantizer (k-means, ``nlist`` lists) is trained on them once and every later key is assigned to its
best list. A search probes ``nprobe`` lists per query row (derived from ``scan_budget_fraction``
when ``nprobe`` is not given); ``keys_scanned`` is the total size of the union of lists probed by
the group's rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import faiss
import numpy as np
import torch

from flashtier.errors import ConfigError
from flashtier.retrieval.buffer import GrowableRows
from flashtier.retrieval.index import KeyIndex, SearchResult
from flashtier.retrieval.index_config import IndexConfig


@dataclass(frozen=True)
class IVFIndexConfig(IndexConfig):
    """Knobs of the faiss IVF index."""

    nlist: int = 128
    """Number of inverted lists (coarse centroids)."""
    nprobe: int | None = None
    """Lists probed per query; ``None`` = ``ceil(scan_budget_fraction * nlist)``."""
    train_min_keys: int | None = None
    """Keys to buffer before training; ``None`` = ``8 * nlist``."""
    kmeans_iters: int = 10
    """k-means iterations when training the coarse quantizer."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.nlist <= 0:
            raise ConfigError(f"ivf nlist must be positive, got {self.nlist}")
        if self.nprobe is not None and not 0 < self.nprobe <= self.nlist:
            raise ConfigError(f"ivf nprobe must be in 1..nlist={self.nlist}, got {self.nprobe}")
        if self.train_min_keys is not None and self.train_min_keys < self.nlist:
            raise ConfigError(f"ivf train_min_keys must be >= nlist={self.nlist}, got {self.train_min_keys}")
        if self.kmeans_iters <= 0:
            raise ConfigError(f"ivf kmeans_iters must be positive, got {self.kmeans_iters}")

    @property
    def effective_nprobe(self) -> int:
        return self.nprobe if self.nprobe is not None else max(1, math.ceil(self.scan_budget_fraction * self.nlist))

    @property
    def effective_train_min_keys(self) -> int:
        return self.train_min_keys if self.train_min_keys is not None else 8 * self.nlist


class IVFIndex(KeyIndex):
    """faiss ``IndexIVFFlat`` (inner product) with positions as ids."""

    name: ClassVar[str] = "ivf"

    def __init__(self, dim: int, config: IVFIndexConfig = IVFIndexConfig()) -> None:
        super().__init__(dim)
        self.config = config
        self._quantizer = faiss.IndexFlatIP(dim)
        self._ivf = faiss.IndexIVFFlat(self._quantizer, dim, config.nlist, faiss.METRIC_INNER_PRODUCT)
        self._ivf.cp.niter = config.kmeans_iters
        self._ivf.cp.seed = config.seed
        self._ivf.cp.min_points_per_centroid = 1  # we train on >= 8 keys per list by default
        self._ivf.nprobe = config.effective_nprobe
        self._pending = GrowableRows((dim,), torch.float32)  # [P, D] keys waiting for training
        self._pending_pos = GrowableRows((), torch.int64)  # [P]
        self._list_sizes = np.zeros(config.nlist, dtype=np.int64)  # keys per list

    @property
    def trained(self) -> bool:
        return bool(self._ivf.is_trained)

    def _add(self, keys: torch.Tensor, positions: torch.Tensor, values: torch.Tensor | None) -> None:
        if not self.trained:
            self._pending.append(keys)
            self._pending_pos.append(positions)
            if len(self._pending) < self.config.effective_train_min_keys:
                return
            keys, positions = self._pending.view().clone(), self._pending_pos.view().clone()
            self._pending = GrowableRows((self.dim,), torch.float32)
            self._pending_pos = GrowableRows((), torch.int64)
            self._ivf.train(keys.numpy())
        x = keys.numpy()
        self._ivf.add_with_ids(x, positions.numpy())
        _, assigned = self._quantizer.search(x, 1)  # [n, 1] list of each key
        self._list_sizes += np.bincount(assigned[:, 0], minlength=self.config.nlist)

    def _search(self, queries: torch.Tensor, k: int) -> SearchResult:
        if not self.trained:  # few keys so far: exact scan of the buffer
            scores = queries @ self._pending.view().T  # [R, P]
            top = torch.topk(scores, k, dim=1).indices
            return SearchResult(self._pending_pos.view()[top], len(self._pending))
        q = queries.numpy()
        _, ids = self._ivf.search(q, k)  # [R, k], -1 where the probed lists hold fewer than k keys
        _, probed = self._quantizer.search(q, self._ivf.nprobe)  # [R, nprobe]
        scanned = int(self._list_sizes[np.unique(probed)].sum())
        positions = torch.from_numpy(ids)
        if bool((positions < 0).any()):
            positions = self._fill_missing(positions)
        return SearchResult(positions, scanned, clusters_scored=self.config.nlist)

    def _fill_missing(self, positions: torch.Tensor) -> torch.Tensor:
        """Rows whose probed lists held fewer than k keys: pad with unused positions (not found
        by the search, so they only keep the row width at k)."""
        every = self.positions()
        rows = []
        for row in positions:
            found = row[row >= 0]
            extra = every[~torch.isin(every, found)][: row.shape[0] - found.shape[0]]
            rows.append(torch.cat([found, extra]))
        return torch.stack(rows)

    def nbytes(self) -> int:
        return self.ntotal * (self.dim * 4 + 8) + self.config.nlist * self.dim * 4
