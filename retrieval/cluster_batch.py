"""One native call searches the cluster indexes of every kv head of a layer (and estimates the rest).

A decode step used to search each (layer, kv head) index in Python: about twenty small torch
operations per head, ~1.5 ms whatever the context, where the bytes a search reads (super
centroids, the opened clusters' centroids, at most ``scan_max_keys`` keys) take a few tens of
microseconds to stream. :func:`search_heads` runs the same steps as :meth:`ClusterIndex.search`
followed by :meth:`ClusterIndex.estimate_rest` (one query row per query head of the group, each row
attending its own top-k: ``GroupSearch.ROWS``) for all heads at once in C
(``native/cluster_search.c``), heads spread over the thread pool. The heads may belong to different
sequences of a batch (indexes of different lengths: each head scans its own index's budget), so a
batched decode step searches every sequence's heads of a layer in one call; each head is searched
by the same operations alone or beside others, so a sequence's result does not depend on its batch.

Contract: the positions found and the estimate equal the reference's up to fp32 rounding of the
sums (the reference and the kernel both score in fp32; a key whose score ties another's to the
last bit may be ranked the other way). It returns None where it does not apply (no native
extension, an index that is not a ``cluster`` index with the options the kernel implements, an
empty index, ``k`` covering every key): the caller then runs the per-head reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from flashtier.retrieval.index import KeyIndex
from flashtier.retrieval.index_cluster import ClusterIndex
from flashtier.retrieval.merge import PartialAttention

try:
    from flashtier._native import cluster_search as _cluster_search
except ImportError:  # extension not built, or built before it existed
    _cluster_search = None
try:
    from flashtier._native import retrieval_attend as _retrieval_attend
except ImportError:
    _retrieval_attend = None
try:
    from flashtier._native import retrieval_attend_pool as _retrieval_attend_pool
except ImportError:
    _retrieval_attend_pool = None

_KV_DTYPES = (torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class HeadsSearch:
    """What :func:`search_heads` found for ``H`` kv heads of ``R`` query rows each."""

    positions: torch.Tensor
    """``[H, R, k]`` int64: each row's top ``k`` positions (a set: in no particular order)."""
    keys_scanned: tuple[int, ...]
    """Per head, keys whose exact score was computed (tail + opened clusters)."""
    rest: PartialAttention | None
    """The estimate of the attention on the keys each row did not attend: out ``[H, R, D]``, lse ``[H, R]``."""


def native_search_available() -> bool:
    """Whether the native kernel is built."""
    return _cluster_search is not None


def _supported(indexes: Sequence[KeyIndex]) -> bool:
    first = indexes[0]
    if not isinstance(first, ClusterIndex):
        return False
    cfg = first.config
    if cfg.attend_scanned or cfg.variance_correction:
        return False
    return all(isinstance(i, ClusterIndex) and i.config == cfg for i in indexes)


def search_heads(indexes: Sequence[KeyIndex], queries: torch.Tensor, k: int, *, estimate_scale: float | None,
                 threads: int | None = None) -> HeadsSearch | None:
    """Search ``indexes[h]`` with ``queries[h] [R, D]`` (``queries [H, R, D]``) for each row's top
    ``k``; with ``estimate_scale`` (the attention's ``q . k`` multiplier) also estimate each row's
    attention on the keys it did not get (needs indexes built with ``track_values``). None where the
    native search does not apply (see the module docstring)."""
    if _cluster_search is None or not indexes or queries.dim() != 3 or queries.shape[0] != len(indexes):
        return None
    if not _supported(indexes):
        return None
    first: ClusterIndex = indexes[0]  # type: ignore[assignment]
    cfg = first.config
    h, r, d = queries.shape
    totals = [i.ntotal for i in indexes]
    if d != first.dim or k <= 0 or any(n == 0 or k >= n for n in totals):
        return None
    if estimate_scale is not None and not cfg.track_values:
        return None
    budget = np.array([cfg.scan_budget(n, k) for n in totals], dtype=np.int64)  # [H] per head's index
    tables = [i.native_tables() for i in indexes]  # type: ignore[attr-defined]
    ptrs = np.array([t[0] for t in tables], dtype=np.int64)  # [H, 21]
    counts = np.array([t[1] for t in tables], dtype=np.int64)  # [H, 4]
    q = queries.detach().to(torch.float32).contiguous()  # [H, R, D]
    positions = torch.empty((h, r, k), dtype=torch.int64)  # [H, R, k]
    scanned = np.empty(h, dtype=np.int64)
    estimate = estimate_scale is not None
    out = torch.empty((h, r, d) if estimate else (0,), dtype=torch.float32)  # [H, R, D]
    lse = torch.empty((h, r) if estimate else (0,), dtype=torch.float32)  # [H, R]
    _cluster_search(q.numpy(), ptrs, counts, positions.numpy(), scanned, out.numpy(), lse.numpy(), r, d, k, budget,
                    float(cfg.oversample), int(cfg.store_dtype == "bfloat16") | (2 if first.int8_summaries else 0),
                    int(cfg.super_size > 0), int(estimate),
                    float(cfg.bound_weight), float(first.group_scale), float(estimate_scale or 0.0),
                    threads if threads is not None else torch.get_num_threads())
    rest = PartialAttention(out, lse) if estimate else None
    return HeadsSearch(positions, tuple(int(s) for s in scanned), rest)


def _rest_buffers(rest: PartialAttention | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The estimate of the rest as the native attention takes it: out ``[H, G, D]`` and lse
    ``[H, G]`` contiguous fp32, or two empty buffers without one."""
    if rest is None:
        empty = torch.empty(0, dtype=torch.float32)
        return empty, empty
    return rest.out.detach().to(torch.float32).contiguous(), rest.lse.detach().to(torch.float32).contiguous()


def attend_rows(q: torch.Tensor, resident_k: torch.Tensor, resident_v: torch.Tensor, retrieved_k: torch.Tensor,
                retrieved_v: torch.Tensor, rest: PartialAttention | None, scale: float,
                threads: int | None = None) -> torch.Tensor | None:
    """The exact part of a retrieval decode step and the merge in one native call: query row
    ``q[h, g]`` (``q [H, G, D]`` fp32) attends the resident ``K/V [H, S, D]`` of kv head ``h`` and
    its own retrieved ``K/V [H, G, n, D]``, and ``rest`` (the estimate of the other keys: out
    ``[H, G, D]``, lse ``[H, G]``) joins the same softmax. Returns ``[H, G, D]`` fp32, equal to
    :func:`~flashtier.retrieval.merge.partial_attention` of each part merged by
    :func:`~flashtier.retrieval.merge.merge_partials` up to fp32 rounding; None where it does not
    apply (no native extension, other dtypes, tensors on a GPU)."""
    if _retrieval_attend is None or q.dtype != torch.float32 or q.device.type != "cpu" or q.dim() != 3:
        return None
    if resident_k.dtype not in _KV_DTYPES or retrieved_k.dtype not in _KV_DTYPES:
        return None
    if resident_v.dtype != resident_k.dtype or retrieved_v.dtype != retrieved_k.dtype:
        return None
    h, g, d = q.shape
    if resident_k.shape[0] != h or retrieved_k.dim() != 4 or retrieved_k.shape[:2] != (h, g):
        return None
    parts = [t.detach().contiguous() for t in (q, resident_k, resident_v, retrieved_k, retrieved_v)]
    est_out, est_lse = _rest_buffers(rest)  # [H, G, D], [H, G] (empty without an estimate)
    out = torch.empty((h, g, d), dtype=torch.float32)  # [H, G, D]
    views = [t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy() for t in parts]
    _retrieval_attend(*views, est_out.numpy(), est_lse.numpy(), out.numpy(), h, g, resident_k.shape[1],
                      retrieved_k.shape[2], d, int(resident_k.dtype == torch.bfloat16),
                      int(retrieved_k.dtype == torch.bfloat16), float(scale),
                      threads if threads is not None else torch.get_num_threads())
    return out


def resident_segments(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> np.ndarray | None:
    """The native attention's table of resident rows given in parts (sinks, window spans; no
    concatenated copy): per part ``(key address, value address, rows, head stride)`` int64 for
    ``keys[j], values[j] [H, n_j, D]`` whose rows are contiguous; None when a part is not (then
    the caller concatenates). The tensors must stay alive while the table is used."""
    rows = []
    for k, v in zip(keys, values):
        if k.shape != v.shape or k.dtype != v.dtype or k.dim() != 3 or k.stride() != v.stride():
            return None
        if k.shape[1] and (k.stride(2) != 1 or k.stride(1) != k.shape[2]):
            return None
        rows.append((k.data_ptr(), v.data_ptr(), k.shape[1], k.stride(0)))
    return np.array(rows, dtype=np.int64).reshape(-1, 4)


def attend_rows_in_place(q: torch.Tensor, resident_k: Sequence[torch.Tensor], resident_v: Sequence[torch.Tensor],
                         records: torch.Tensor, table: torch.Tensor, rows: torch.Tensor, block: int,
                         dtype: torch.dtype, rest: PartialAttention | None, scale: float,
                         threads: int | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`attend_rows` with the resident K/V in parts (``resident_k[j], resident_v[j] [H, n_j,
    D]``, in position order: sinks, then the window; no concatenated copy) and the retrieved K/V read
    in place from a host KV pool: ``records [slots, bytes]`` (uint8; a slot holds one block of every
    kv head, raw ``[2, H_all, block, D]`` of ``dtype``), ``table [blocks]`` (int64 slot of each block
    of the layer, -1 when not in host memory), ``rows [H, G, n]`` the offloaded positions query row
    ``(h, g)`` attends (kv head ``h``). Returns the output ``[H, G, D]`` fp32 (equal to
    :func:`attend_rows` over the concatenated resident and the gathered rows, to the bit) and the
    slot of every row read ``[H * G * n]``; None where it does not apply (no native extension, other
    dtypes, parts that are not row-contiguous, a block not in host memory)."""
    if _retrieval_attend_pool is None or q.dtype != torch.float32 or q.device.type != "cpu" or q.dim() != 3:
        return None
    if not resident_k or len(resident_k) != len(resident_v):
        return None
    res_dtype = resident_k[0].dtype
    if res_dtype not in _KV_DTYPES or dtype not in _KV_DTYPES or any(t.dtype != res_dtype for t in resident_k):
        return None
    h, g, d = q.shape
    if rows.dim() != 3 or rows.shape[:2] != (h, g) or records.dim() != 2:
        return None
    if any(t.dim() != 3 or t.shape[0] != h or t.shape[2] != d or t.device.type != "cpu" for t in resident_k):
        return None
    segments = resident_segments(resident_k, resident_v)
    if segments is None:
        return None
    row_bytes = d * dtype.itemsize
    if records.shape[1] % (2 * block * row_bytes):
        return None
    kv_heads = records.shape[1] // (2 * block * row_bytes)
    qc = q.detach().contiguous()
    est_out, est_lse = _rest_buffers(rest)  # [H, G, D], [H, G] (empty without an estimate)
    positions = rows.to(torch.int64).contiguous()  # [H, G, n]
    slots = torch.empty(positions.numel(), dtype=torch.int64)
    out = torch.empty((h, g, d), dtype=torch.float32)  # [H, G, D]
    if _retrieval_attend_pool(qc.numpy(), segments, records.numpy(), table.numpy(), positions.numpy(), slots.numpy(),
                              est_out.numpy(), est_lse.numpy(), out.numpy(), h, g, int(segments[:, 2].sum()),
                              positions.shape[2], d, block, kv_heads, int(res_dtype == torch.bfloat16),
                              int(dtype == torch.bfloat16), float(scale),
                              threads if threads is not None else torch.get_num_threads()):
        return None
    return out, slots
