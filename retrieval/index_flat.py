"""``flat``: exact inner-product search by one matmul over every key (the reference index)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from flashtier.retrieval.buffer import GrowableRows
from flashtier.retrieval.index import KeyIndex, SearchResult
from flashtier.retrieval.index_config import IndexConfig


@dataclass(frozen=True)
class FlatIndexConfig(IndexConfig):
    """The flat index has no knobs: it always scans every key (``scan_budget_fraction`` is ignored)."""


class FlatIndex(KeyIndex):
    """Exact top-k: scores every key, so ``keys_scanned == ntotal``."""

    name: ClassVar[str] = "flat"

    def __init__(self, dim: int, config: FlatIndexConfig = FlatIndexConfig()) -> None:
        super().__init__(dim)
        self.config = config
        self._keys = GrowableRows((dim,), torch.float32, huge_pages=config.huge_pages)  # [N, D]

    def _add(self, keys: torch.Tensor, positions: torch.Tensor, values: torch.Tensor | None) -> None:
        self._keys.append(keys)

    def _search(self, queries: torch.Tensor, k: int) -> SearchResult:
        scores = queries @ self._keys.view().T  # [R, N]
        top = torch.topk(scores, k, dim=1).indices  # [R, k]
        return SearchResult(self.positions()[top], self.ntotal)

    def nbytes(self) -> int:
        return self._keys.nbytes() + self._positions.nbytes()
