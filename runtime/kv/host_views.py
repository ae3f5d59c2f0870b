"""Views of the host KV pool for retrieval attention: per-head stores and the layer's offloaded part.

:class:`PagedLayerKV` is the :class:`~flashtier.retrieval.attention.OffloadedLayerKV` of one layer
whose K/V bytes are blocks of a :class:`~flashtier.runtime.kv.host.HostKVPool` (host memory or
storage): the indexes are built as blocks are demoted, and ``gather`` reads every kv head's
retrieved rows with one indexing of the pool. The bytes are never copied into the retrieval stores.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flashtier.errors import InputError
from flashtier.retrieval.attention import OffloadedLayerKV, RetrievalConfig
from flashtier.retrieval.cluster_batch import attend_rows_in_place
from flashtier.retrieval.merge import PartialAttention
from flashtier.retrieval.store import KVStore
from flashtier.runtime.kv.host import HostKVPool


class HostHeadStore(KVStore):
    """One kv head's view of one layer's blocks in a :class:`HostKVPool`, as the
    :class:`~flashtier.retrieval.store.KVStore` that retrieval attention gathers from.

    ``append`` only records positions: the cache puts the blocks into the pool before it offloads
    them to the index, so the bytes are not copied twice.
    """

    def __init__(self, pool: HostKVPool, layer: int, head: int) -> None:
        super().__init__(pool.layout.head_dim)
        self._pool, self._layer, self._head = pool, layer, head

    def _append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """The bytes are already in the pool (see the class docstring)."""

    def gather(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[n, D]`` of ``positions [n]``, straight from the pool's block table."""
        positions = torch.as_tensor(positions, dtype=torch.int64).reshape(-1)
        stored = self._positions.view()
        if positions.numel() and (len(self) == 0 or int(positions.min()) < int(stored[0]) or int(positions.max()) > int(stored[-1])):
            raise InputError(f"KV store: positions {positions[:8].tolist()} were never offloaded")
        k, v = self._pool.gather(self._layer, torch.tensor([self._head]), positions.unsqueeze(0))
        return k[0], v[0]

    def _gather_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gather(self._positions.view()[rows])

    def first_position(self) -> int:
        """The first offloaded position (an error when nothing is offloaded)."""
        if len(self) == 0:
            raise InputError("KV store: nothing offloaded yet")
        return int(self._positions.view()[0])

    def nbytes(self) -> int:
        """Only the positions: the K/V bytes are the pool's."""
        return self._positions.nbytes()


class PagedLayerKV(OffloadedLayerKV):
    """The offloaded part of one layer whose K/V bytes are blocks of a :class:`HostKVPool`:
    per kv head an index (built as blocks are demoted) and a :class:`HostHeadStore`; ``gather``
    reads every head's retrieved rows in one indexing of the pool."""

    def __init__(self, pool: HostKVPool, layer: int, config: RetrievalConfig) -> None:
        lay = pool.layout
        super().__init__(lay.num_kv_heads, lay.head_dim, config,
                         stores=[HostHeadStore(pool, layer, h) for h in range(lay.num_kv_heads)])
        self._pool, self._layer = pool, layer
        self._all_heads = torch.arange(lay.num_kv_heads)  # [H_kv]

    def gather_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """See :meth:`OffloadedLayerKV.gather_rows`: one read of the pool (one native call when
        every block is in host memory)."""
        return self._pool.gather(self._layer, self._all_heads, rows)

    def attend_rows(self, q: torch.Tensor, resident_k: Sequence[torch.Tensor], resident_v: Sequence[torch.Tensor],
                    rows: torch.Tensor, rest: PartialAttention | None, scale: float,
                    threads: int | None = None) -> torch.Tensor | None:
        """See :meth:`OffloadedLayerKV.attend_rows`: the retrieved rows are read in place from the
        pool's blocks (one native call, no gathered copy) when every one is in host memory."""
        raw = self._pool.raw_rows(self._layer)
        if raw is None:
            return None
        records, table = raw
        found = attend_rows_in_place(q, resident_k, resident_v, records, table, rows, self._pool.layout.block_size,
                                     self._pool.layout.dtype, rest, scale, threads)
        if found is None:
            return None
        out, slots = found
        self._pool.mark_read(slots)
        return out

    def gather(self, positions: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """See :meth:`OffloadedLayerKV.gather`; padding rows repeat a real position and are masked."""
        if len(positions) != self.num_kv_heads:
            raise InputError(f"gather needs positions for each of the {self.num_kv_heads} kv heads, got {len(positions)}")
        lengths = torch.tensor([p.numel() for p in positions])  # [H_kv]
        n = int(lengths.max())
        valid = torch.arange(n).unsqueeze(0) < lengths.unsqueeze(1)  # [H_kv, n]
        if bool(valid.all()):
            rows = torch.stack(list(positions))  # [H_kv, n]
        else:
            first = self.heads[0].store.first_position()
            rows = torch.stack([torch.cat([p, p.new_full((n - p.numel(),), int(p[0]) if p.numel() else first)])
                                for p in positions])
        k, v = self._pool.gather(self._layer, torch.arange(self.num_kv_heads), rows)
        return k, v, valid
