"""The key index interface: top-k inner-product search over the offloaded keys of one (layer, kv head).

Contract of every :class:`KeyIndex`:

- Keys arrive incrementally with their absolute token positions (``add``), append-only: the
  positions of one ``add`` are strictly increasing and greater than every position added before
  (blocks leave the resident window oldest first). Gaps are allowed.
- ``search(queries [R, D], k)`` returns, for each query row, ``min(k, ntotal)`` distinct positions
  of keys with (approximately) the largest inner product ``q . key``; rows are sets, their order is
  not part of the contract. One call serves a whole GQA group: the index may choose what to scan
  jointly for all rows, and ``keys_scanned`` counts the distinct keys whose exact score it computed
  for at least one row (the bytes of keys it had to read), not per-row work.
- When ``k >= ntotal`` every position is returned, exactly.
- ``build_time_s`` is the wall time spent so far inside ``add`` (training, clustering, inserting).
- ``add`` may also receive the tokens' values; an index that can estimate the attention on the
  keys a search did not return (see :meth:`ClusterIndex.estimate_rest`) keeps summaries of them,
  the others ignore them.

Implementations override ``_add`` and ``_search``; the public methods validate and account.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from flashtier.errors import InputError
from flashtier.retrieval.buffer import GrowableRows


@dataclass(frozen=True)
class SearchResult:
    """What one search found and what it cost."""

    positions: torch.Tensor
    """``[R, k']`` int64 absolute positions, one row per query row: ``k' = min(k, ntotal)``, or
    every key scanned (``k' >= min(k, ntotal)``) for an index configured to return them."""
    keys_scanned: int
    """Distinct keys whose exact score was computed for this search."""
    clusters_scored: int = 0
    """Coarse entries (centroids, lists) scored to decide what to scan; resident, not read from host."""
    shared: bool = False
    """Every row holds the same positions (an index that returns all it scanned for a group)."""


class KeyIndex(ABC):
    """Top-k inner-product search over keys ``[D]`` of one (layer, kv head), keyed by position."""

    name: ClassVar[str]

    def __init__(self, dim: int) -> None:
        if dim <= 0:
            raise InputError(f"key index dimension must be positive, got {dim}")
        self.dim = dim
        self._positions = GrowableRows((), torch.int64)  # [N] all positions, in add order
        self._build_time_s = 0.0

    @property
    def ntotal(self) -> int:
        """Number of keys added."""
        return len(self._positions)

    @property
    def build_time_s(self) -> float:
        """Wall seconds spent in :meth:`add` so far."""
        return self._build_time_s

    def positions(self) -> torch.Tensor:
        """All indexed positions ``[N]`` int64, increasing (a view: valid until the next add)."""
        return self._positions.view()

    def add(self, keys: torch.Tensor, positions: torch.Tensor, values: torch.Tensor | None = None) -> None:
        """Index ``keys [n, D]`` at absolute ``positions [n]`` (see the append-only contract);
        ``values [n, D_v]`` are summarised by indexes that estimate unretrieved attention."""
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise InputError(f"{self.name} index: keys must be [n, {self.dim}], got {tuple(keys.shape)}")
        positions = torch.as_tensor(positions, dtype=torch.int64).reshape(-1)
        if positions.shape[0] != keys.shape[0]:
            raise InputError(f"{self.name} index: {keys.shape[0]} keys but {positions.shape[0]} positions")
        if values is not None and (values.dim() != 2 or values.shape[0] != keys.shape[0]):
            raise InputError(f"{self.name} index: values must be [{keys.shape[0]}, D_v], got {tuple(values.shape)}")
        if keys.shape[0] == 0:
            return
        last = int(self._positions.view()[-1]) if self.ntotal else -1
        if int(positions[0]) <= last or (positions.shape[0] > 1 and not bool((positions[1:] > positions[:-1]).all())):
            raise InputError(
                f"{self.name} index: positions must be strictly increasing and after the last indexed "
                f"position {last}; got {positions[:4].tolist()}... (add blocks oldest first, once each)"
            )
        start = time.perf_counter()
        vals = None if values is None else values.detach().to(torch.float32).contiguous()
        self._add(keys.detach().to(torch.float32).contiguous(), positions, vals)
        self._positions.append(positions)
        self._build_time_s += time.perf_counter() - start

    def search(self, queries: torch.Tensor, k: int) -> SearchResult:
        """Top-``k`` positions per query row of ``queries [R, D]`` (see the module contract)."""
        if queries.dim() != 2 or queries.shape[1] != self.dim:
            raise InputError(f"{self.name} index: queries must be [R, {self.dim}], got {tuple(queries.shape)}")
        if k <= 0:
            raise InputError(f"{self.name} index: k must be positive, got {k}")
        rows = queries.shape[0]
        if self.ntotal == 0:
            return SearchResult(torch.empty((rows, 0), dtype=torch.int64), 0)
        if k >= self.ntotal:
            every = self._positions.view().unsqueeze(0).expand(rows, -1).clone()  # [R, N]
            return SearchResult(every, self.ntotal)
        return self._search(queries.detach().to(torch.float32).contiguous(), k)

    @abstractmethod
    def _add(self, keys: torch.Tensor, positions: torch.Tensor, values: torch.Tensor | None) -> None:
        """Insert validated fp32 ``keys [n, D]`` at validated ``positions [n]`` (before they are
        appended to :meth:`positions`); ``values`` (fp32 or None) may be ignored."""

    @abstractmethod
    def _search(self, queries: torch.Tensor, k: int) -> SearchResult:
        """Search fp32 ``queries [R, D]`` with ``0 < k < ntotal``."""

    @abstractmethod
    def nbytes(self) -> int:
        """Bytes the index holds (keys copies, centroids, lists)."""
