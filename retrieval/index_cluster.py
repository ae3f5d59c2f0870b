"""``cluster``: attention-aware index, RetroInfer-style segment clusters with a score bound.

Build: keys are clustered per *segment* (``segment_size`` consecutive positions) by a few k-means
steps into clusters of about ``cluster_size`` keys. Each cluster keeps its centroid ``c`` and
radius ``r = max ||key - c||`` over its members; keys are stored sorted by cluster so a cluster is
one contiguous row range. New keys wait in a small tail (scanned exactly by every search) until a
*chunk* of ``flush_keys`` has arrived. Whole chunks join the last, still open segment, each
clustered on its own; when the open segment fills it is re-clustered as a whole and closed for
good. So a flush during decode costs what its own keys cost (not the whole open segment), one
bulk add after prefill clusters full segments once, and block-by-block adds during decode still
end in full segments clustered as a whole. Chunk and segment boundaries fall at fixed counts of
keys and each k-means is seeded by its first position, so the index depends on the keys alone,
not on how they were added (a conversation resumed from a truncated cache finds the same index).

Search (queries and keys come from different distributions, so "nearest" keys are not the
highest-scoring ones): each cluster is ranked by the bound
``q . c + bound_weight * |q| * r`` (with ``bound_weight = 1`` an upper bound of ``q . key`` over
its members). For a GQA group the bound is turned into a per-row log-softmax-like score
(``scale * bound - max``) and the group takes the max over rows, so one scan serves every row.
Clusters are taken best first until ``scan_budget_fraction`` of the keys (at most
``scan_max_keys``, at least ``k``) are scanned; the scanned keys are scored exactly and each row
keeps its top ``k``.

``store_dtype="bfloat16"`` keeps the clustered keys and the centroids in bf16 (half the memory and
half the bytes read per search). Scores are always fp32: the fp32 queries times the stored rows
widened exactly to fp32, summed in fp32 (a bf16 product would round the scores themselves to 8
bits and turn near-ties into ties). Keys of a trained model share a large common offset, so before rounding every key and
centroid is centred on a fixed vector (the mean of the first keys clustered): ``q . (k - m)``
ranks keys exactly like ``q . k`` (``q . m`` is the same for every key of a row), and the bf16
rounding error is then relative to the small centred vectors, not to the offset. Tail keys are
scored in fp32 on the same centred scale.

``summary_dtype="int8"`` (``"auto"`` in every preset: where it is smaller) keeps the centroids,
super-centroids and mean values -- the tables a long-context search reads most of -- as int8 rows
with one fp32 scale each (:class:`~flashtier.retrieval.buffer.Int8Rows`, centred like bf16); the
keys keep ``store_dtype``. The reference scores the dequantized rows; the native search scales each
row's dot product instead, the same to fp32 rounding.

Two levels (``super_size > 0``): each segment's clusters are themselves clustered into
super-clusters of about ``super_size`` keys (k-means on the centroids; a super-cluster's centroid is
the mean of its keys, its radius bounds its clusters' balls). A search first ranks the
super-clusters by the same bound, keeps the best ones until they hold ``oversample`` times the scan
budget, and only then scores the clusters inside them. At long contexts the centroid pass dominates
a search and is read from DRAM for every (layer, head); the first level cuts the bytes read per
search several times while the leaves stay small.

Estimation of the rest (``track_values=True``, RetroInfer's "estimation zone"): when ``add``
receives the values too, every cluster also keeps the mean value of its members.
:meth:`ClusterIndex.estimate_rest` then approximates the attention of a query on all indexed keys
it did *not* attend exactly: each cluster stands for its unattended members by its centroid and
mean value, weighted by their count (score ``scale * q . c + log(count)``); tail keys stand for
themselves. The centroid scores of the last search are reused; with two levels, clusters outside
the searched super-clusters are estimated by their super-cluster (its centroid, mean value and key
count), so the estimate reads no more centroids than the search did. Long contexts of models that spread
attention thinly over many far keys (length extrapolation) lose that mass with top-k alone; the
estimate puts it back at the cost of one pass over the centroids.

This module's ``search`` / ``estimate_rest`` are the reference; a decode step runs the same steps
for every kv head of a layer in one native call (:mod:`flashtier.retrieval.cluster_batch`, which
reads the tables through :meth:`ClusterIndex.native_tables`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from flashtier.errors import ConfigError, InputError
from flashtier.retrieval.buffer import GrowableRows, Int8Rows
from flashtier.retrieval.index import KeyIndex, SearchResult
from flashtier.retrieval.index_config import IndexConfig
from flashtier.retrieval.kmeans import kmeans
from flashtier.retrieval.merge import (
    PartialAttention,
    merge_partials,
    partial_from_scores,
)

STORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SUMMARY_DTYPES = ("store", "int8", "auto")


def _scores(queries: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``queries [R, D]`` (fp32) times the rows of ``table [M, D]`` (fp32, or bf16 widened exactly):
    fp32 products and sums ``[R, M]``, as the native search computes them."""
    return queries @ (table if table.dtype == torch.float32 else table.float()).T


@dataclass(frozen=True)
class _LastSearch:
    """What a search scored, kept so ``estimate_rest`` with the same queries reuses it."""

    queries: torch.Tensor
    """``[R, D]`` the searched queries."""
    raw: torch.Tensor
    """``[R, M]`` ``q . (c - m)`` of the clusters scored (all of them, or ``clusters``)."""
    clusters: torch.Tensor | None
    """``[M]`` clusters scored (None = all): those of the chosen super-clusters."""
    super_mask: torch.Tensor | None
    """``[S]`` chosen super-clusters."""
    super_raw: torch.Tensor | None
    """``[R, S]`` ``q . (s - m)`` of every super-cluster."""


@dataclass(frozen=True)
class ClusterIndexConfig(IndexConfig):
    """Knobs of the attention-aware cluster index."""

    cluster_size: int = 8
    """Average keys per cluster (RetroInfer uses about 16; 8 measured better here at the same scan budget)."""
    segment_size: int = 1024
    """Most keys clustered together; build cost per key grows with ``segment_size / cluster_size``."""
    flush_keys: int = 128
    """Tail keys that trigger cutting a new segment (the tail is scanned exactly until then)."""
    kmeans_iters: int = 4
    """Lloyd iterations per segment (recall measured flat from 3 to 10 on shifted synthetic keys)."""
    bound_weight: float = 0.1
    """Weight of ``|q| * radius`` in the cluster score (1 = true upper bound, 0 = centroid only)."""
    softmax_scale: float | None = None
    """Scale used to compare rows of a group (``None`` = ``1/sqrt(D)``)."""
    store_dtype: str = "float32"
    """Precision of the clustered keys and centroids: ``float32`` or ``bfloat16`` (centred, see the module docstring)."""
    summary_dtype: str = "store"
    """Precision of the per-search summaries -- centroids, super-centroids and mean values, the tables
    whose bytes grow with the context: ``store`` (as ``store_dtype``), ``int8`` (per-row symmetric
    codes and an fp32 scale, :class:`~flashtier.retrieval.buffer.Int8Rows`; centred like bf16; rows
    padded to a multiple of 64 codes) or ``auto`` (int8 where that reads fewer bytes than
    ``store_dtype``: head dims of 64 and more). The clustered keys keep ``store_dtype``, so the
    keys scanned are still scored exactly; int8 moves only which clusters are opened and the
    estimate of the rest (measured in the README)."""
    track_values: bool = False
    """Keep each cluster's mean value (from ``add(..., values)``) so :meth:`ClusterIndex.estimate_rest` works."""
    super_size: int = 0
    """Keys per super-cluster of the first level (0 = one level: every centroid scored per search)."""
    oversample: float = 8.0
    """With two levels: super-clusters searched hold this many times the scan budget in keys."""
    variance_correction: bool = False
    """``estimate_rest`` adds ``scale/2 * sum_d q_d^2 var_d`` to each cluster's centroid score (the
    log-normal correction ``E[exp(q.k)] = exp(q.c + q^T S q / 2)`` with the members' per-dimension
    key variance ``var [D]`` as ``S``): a centroid alone underestimates the cluster's softmax mass
    (``exp`` is convex). Keeps a ``[C, D]`` variance table next to the centroids."""
    scan_max_keys: int | None = None
    """At most this many keys scored per search (and at least ``k``), whatever the share
    ``scan_budget_fraction`` gives: bounds the work of a decode step as the context grows, the way
    an ANN index's search effort (``nprobe``, ``ef``) is bounded. ``None``: the share alone."""
    attend_scanned: bool = False
    """Return every scanned key, not only each row's top ``k`` (``k`` then only sets the least number
    scanned). Their exact scores were computed anyway, so attending to all of them costs only the
    value reads, and for models that spread attention thinly it recovers mass top-k drops."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cluster_size <= 0:
            raise ConfigError(f"cluster index cluster_size must be positive, got {self.cluster_size}")
        if self.segment_size < self.cluster_size:
            raise ConfigError(
                f"cluster index segment_size ({self.segment_size}) must be >= cluster_size ({self.cluster_size})"
            )
        if not 0 < self.flush_keys <= self.segment_size:
            raise ConfigError(
                f"cluster index flush_keys must be in 1..segment_size={self.segment_size}, got {self.flush_keys}"
            )
        if self.kmeans_iters < 0:
            raise ConfigError(f"cluster index kmeans_iters must be >= 0, got {self.kmeans_iters}")
        if self.bound_weight < 0:
            raise ConfigError(f"cluster index bound_weight must be >= 0, got {self.bound_weight}")
        if self.softmax_scale is not None and self.softmax_scale <= 0:
            raise ConfigError(f"cluster index softmax_scale must be positive, got {self.softmax_scale}")
        if self.super_size and self.super_size < 2 * self.cluster_size:
            raise ConfigError(f"cluster index super_size ({self.super_size}) must be 0 (one level) or at least "
                              f"2 * cluster_size ({2 * self.cluster_size})")
        if self.scan_max_keys is not None and self.scan_max_keys <= 0:
            raise ConfigError(f"cluster index scan_max_keys must be a positive number of keys (or None: no cap), "
                              f"got {self.scan_max_keys}")
        if self.oversample < 1:
            raise ConfigError(f"cluster index oversample must be >= 1, got {self.oversample}")
        if self.summary_dtype not in SUMMARY_DTYPES:
            raise ConfigError(f"cluster index summary_dtype must be one of {list(SUMMARY_DTYPES)}, got {self.summary_dtype!r}")
        if self.store_dtype not in STORE_DTYPES:
            raise ConfigError(f"cluster index store_dtype must be one of {sorted(STORE_DTYPES)}, got {self.store_dtype!r}")

    def scan_budget(self, ntotal: int, k: int) -> int:
        """Keys a search of ``ntotal`` indexed keys for the top ``k`` scores exactly (tail included):
        the ``scan_budget_fraction`` share, capped by ``scan_max_keys``, at least ``k``."""
        budget = math.ceil(self.scan_budget_fraction * ntotal)
        if self.scan_max_keys is not None:
            budget = min(budget, self.scan_max_keys)
        return max(k, budget)

    def bytes_per_key(self, dim: int) -> float:
        """Key copy + positions, plus each cluster's centroid, radius, start and size shared by
        ``cluster_size`` keys."""
        size = STORE_DTYPES[self.store_dtype].itemsize
        row = self.summary_row_bytes(dim)
        per_cluster = row + 20 + (row if self.track_values else 0)
        return dim * size + (24 if self.track_values else 16) + per_cluster / self.cluster_size

    def int8_summaries(self, dim: int) -> bool:
        """Whether an index of ``dim``-value keys keeps its summaries as int8 rows."""
        if self.summary_dtype == "auto":
            return Int8Rows.row_bytes(dim) < dim * STORE_DTYPES[self.store_dtype].itemsize
        return self.summary_dtype == "int8"

    def summary_row_bytes(self, dim: int) -> int:
        """Bytes of one centroid (or mean-value) row: ``dim`` values (int8: padded codes + the row scale)."""
        return Int8Rows.row_bytes(dim) if self.int8_summaries(dim) else dim * STORE_DTYPES[self.store_dtype].itemsize

    def fixed_bytes(self, dim: int) -> int:
        """The open segment and the tail (and their values when tracked), kept in fp32 until they
        are clustered for good."""
        return (self.segment_size + self.flush_keys) * (dim * (8 if self.track_values else 4) + 8)


class ClusterIndex(KeyIndex):
    """Segment-wise k-means clusters ranked by a centroid + radius bound (see module docstring)."""

    name: ClassVar[str] = "cluster"

    def __init__(self, dim: int, config: ClusterIndexConfig = ClusterIndexConfig()) -> None:
        super().__init__(dim)
        self.config = config
        self._scale = config.softmax_scale if config.softmax_scale is not None else 1.0 / math.sqrt(dim)
        self._dtype = STORE_DTYPES[config.store_dtype]
        self._center = torch.zeros(dim)  # [D] m: stored keys and centroids are k - m (0 in fp32)
        int8 = config.int8_summaries(dim)
        self._centered = self._dtype == torch.float32 and not int8  # m is fixed once chosen
        rows = functools.partial(GrowableRows, huge_pages=config.huge_pages)
        summary = (lambda: Int8Rows(dim, huge_pages=config.huge_pages)) if int8 else (lambda: rows((dim,), self._dtype))
        self._keys = rows((dim,), self._dtype)  # [N_c, D] clustered keys - m, grouped by cluster
        self._key_pos = rows((), torch.int64)  # [N_c] their positions
        self._centroids = summary()  # [C, D] centroid - m (D columns: the fast bf16 kernels)
        self._radius = rows((), torch.float32)  # [C] max distance of a member from its centroid
        self._start = rows((), torch.int64)  # [C] first row of each cluster in _keys
        self._size = rows((), torch.int64)  # [C] rows of each cluster
        self._tail = rows((dim,), torch.float32)  # [P, D] keys not yet clustered
        self._tail_pos = rows((), torch.int64)  # [P]
        self._open = rows((dim,), torch.float32)  # [O, D] keys of the open (last) segment
        self._open_pos = rows((), torch.int64)  # [O]
        self._open_first_cluster = 0  # its clusters are _size[_open_first_cluster:]
        self._open_first_row = 0  # its keys are _keys[_open_first_row:]
        self._cluster_of = rows((), torch.int64)  # [N] cluster of each key in add order, -1 = tail
        self._vmean = summary()  # [C, D] mean value per cluster (track_values)
        self._kvar = rows((dim,), self._dtype)  # [C, D] key variance per cluster (variance_correction)
        self._tail_val = rows((dim,), torch.float32)  # [P, D]
        self._open_val = rows((dim,), torch.float32)  # [O, D]
        self._super = summary()  # [S, D] super centroid - m
        self._super_radius = rows((), torch.float32)  # [S] bound on a member key's distance
        self._super_first = rows((), torch.int64)  # [S] first cluster of each super-cluster
        self._super_clusters = rows((), torch.int64)  # [S] its clusters (contiguous)
        self._super_keys = rows((), torch.int64)  # [S] its keys
        self._super_vmean = summary()  # [S, D] mean value of its keys (track_values)
        self._open_first_super = 0
        self._last: _LastSearch | None = None  # what the last search scored, for estimate_rest
        self._tables: tuple[int, tuple[int, ...], tuple[int, ...]] | None = None  # (ntotal, addresses, counts)

    @property
    def n_clusters(self) -> int:
        return len(self._size)

    @property
    def int8_summaries(self) -> bool:
        """Whether the centroids, super-centroids and mean values are int8 rows (``summary_dtype``)."""
        return isinstance(self._centroids, Int8Rows)

    @property
    def group_scale(self) -> float:
        """The scale rows of a group are compared on (``softmax_scale``, else ``1/sqrt(D)``)."""
        return self._scale

    def native_tables(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The addresses of the tables a search reads, in the order of ``native/cluster_search.c``
        (keys, key positions, centroids, radii, starts, sizes, tail keys, tail positions, tail
        values, centre, super centroids, radii, first clusters, cluster counts, key counts, mean
        values, super mean values, then the row scales of the centroids, super centroids, mean values
        and super mean values when the summaries are int8, else the summaries' own addresses, never
        read) and the counts (clustered keys, clusters, tail keys,
        super-clusters). Valid until the next ``add`` (buffers may move when they grow): cached
        per number of keys added."""
        if self._tables is None or self._tables[0] != self.ntotal:
            self._center = self._center.contiguous()
            parts = (self._keys, self._key_pos, self._centroids, self._radius, self._start, self._size, self._tail,
                     self._tail_pos, self._tail_val, self._center, self._super, self._super_radius, self._super_first,
                     self._super_clusters, self._super_keys, self._vmean, self._super_vmean)
            addresses = tuple(p.data_ptr() if isinstance(p, torch.Tensor) else p.address() for p in parts)
            addresses += tuple(p.scale_address() if isinstance(p, Int8Rows) else p.address()
                               for p in (self._centroids, self._super, self._vmean, self._super_vmean))
            counts = (len(self._keys), self.n_clusters, len(self._tail), len(self._super_first))
            self._tables = (self.ntotal, addresses, counts)
        return self._tables[1], self._tables[2]

    def _add(self, keys: torch.Tensor, positions: torch.Tensor, values: torch.Tensor | None) -> None:
        track = self.config.track_values
        if track and (values is None or values.shape[1] != self.dim):
            raise InputError(f"cluster index with track_values needs values [n, {self.dim}] with every add")
        n_new = keys.shape[0]
        self._tail.append(keys)
        self._tail_pos.append(positions)
        if track:
            self._cluster_of.append(torch.full((n_new,), -1, dtype=torch.int64))
            self._tail_val.append(values)
        chunk, seg = self.config.flush_keys, self.config.segment_size
        if len(self._tail) < chunk:
            return
        self._last = None  # cluster ids change
        first_row = self.ntotal + n_new - len(self._tail)  # the tail holds the last keys added
        if not self._centered:  # fixed by the first keys clustered
            self._center, self._centered = self._tail.view()[:chunk].mean(dim=0), True
        tail, tail_pos = self._tail.view(), self._tail_pos.view()
        tail_val = self._tail_val.view() if track else None
        done = 0  # tail keys clustered
        if len(self._open) + len(tail) >= seg:
            # The open segment fills: re-clustered as a whole with the tail's keys that complete it
            # (and any further full segments); it is closed for good.
            n_open = len(self._open)
            done = (n_open + len(tail)) // seg * seg - n_open
            keys = torch.cat([self._open.view(), tail[:done]])  # [n, D] in position order
            positions = torch.cat([self._open_pos.view(), tail_pos[:done]])
            vals = torch.cat([self._open_val.view(), tail_val[:done]]) if tail_val is not None else None
            seg_row = first_row - n_open
            self._drop_open_segment()
            for start in range(0, keys.shape[0], seg):
                self._cluster_segment(keys[start : start + seg], positions[start : start + seg],
                                      None if vals is None else vals[start : start + seg], seg_row + start)
            self._open_first_cluster, self._open_first_row = self.n_clusters, len(self._keys)
            self._open_first_super = len(self._super_first)
        # Whole chunks of the rest join the open segment, each clustered on its own (the segment is
        # re-clustered once, when it fills): a flush during decode costs what its own keys cost.
        # Chunk and segment boundaries fall at fixed counts of keys, so the clusters depend on the
        # keys only, not on how they were added.
        end = done + (len(tail) - done) // chunk * chunk
        for start in range(done, end, chunk):
            vals = None if tail_val is None else tail_val[start : start + chunk]
            self._cluster_segment(tail[start : start + chunk], tail_pos[start : start + chunk], vals, first_row + start)
            self._open.append(tail[start : start + chunk])
            self._open_pos.append(tail_pos[start : start + chunk])
            if vals is not None:
                self._open_val.append(vals)
        for buf in (self._tail, self._tail_pos, self._tail_val):  # the partial chunk stays in the tail
            rest = buf.view()[end:].clone()
            buf.truncate(0)
            buf.append(rest)

    def _drop_open_segment(self) -> None:
        """Forget the open segment's clusters (its keys are re-clustered by the caller)."""
        for rows in (self._centroids, self._radius, self._start, self._size, self._vmean, self._kvar):
            rows.truncate(self._open_first_cluster)
        for rows in (self._super, self._super_radius, self._super_first, self._super_clusters, self._super_keys,
                     self._super_vmean):
            rows.truncate(self._open_first_super)
        self._keys.truncate(self._open_first_row)
        self._key_pos.truncate(self._open_first_row)
        self._open.truncate(0)
        self._open_pos.truncate(0)
        self._open_val.truncate(0)

    def _cluster_segment(self, keys: torch.Tensor, positions: torch.Tensor, values: torch.Tensor | None,
                         first_row: int) -> None:
        """Cluster one segment ``keys [n, D]`` (added as rows ``first_row ..`` in add order) and
        append its clusters (with their mean ``values [n, D]`` when tracked)."""
        n_clusters = max(1, round(keys.shape[0] / self.config.cluster_size))
        gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + int(positions[0]))  # the keys' own
        cl = kmeans(keys, n_clusters, self.config.kmeans_iters, gen)
        centroids, assign, sizes = cl.centroids, cl.assign, cl.sizes
        if self.config.super_size:  # order the clusters by super-cluster, so each super is a cluster range
            n_super = max(1, round(keys.shape[0] / self.config.super_size))
            sup = kmeans(centroids, n_super, self.config.kmeans_iters, gen)
            corder = torch.argsort(sup.assign, stable=True)  # new cluster order
            remap = torch.empty_like(corder)
            remap[corder] = torch.arange(corder.shape[0])
            centroids, sizes, assign, sup_of = centroids[corder], sizes[corder], remap[assign], sup.assign[corder]
        order = torch.argsort(assign, stable=True)  # rows grouped by cluster
        dist = (keys - centroids[assign]).norm(dim=1)  # [n]
        radius = torch.zeros(sizes.shape[0], dtype=torch.float32).scatter_reduce_(
            0, assign, dist, reduce="amax", include_self=True
        )  # [C_seg]
        vmean = None
        if values is not None:
            self._cluster_of.view()[first_row : first_row + keys.shape[0]] = assign + self.n_clusters
            vmean = torch.zeros((sizes.shape[0], values.shape[1])).index_add_(0, assign, values) / sizes.unsqueeze(1)
            self._vmean.append(vmean)  # cast to the store dtype
            if self.config.variance_correction:
                dev = (keys - centroids[assign]).pow(2)  # [n, D]
                self._kvar.append(torch.zeros_like(centroids).index_add_(0, assign, dev) / sizes.unsqueeze(1))
        if self.config.super_size:
            self._add_supers(centroids, radius, sizes, sup_of, vmean)
        starts = len(self._keys) + torch.cumsum(sizes, 0) - sizes  # [C_seg]
        self._keys.append(keys[order] - self._center)
        self._key_pos.append(positions[order])
        self._centroids.append(centroids - self._center)
        self._radius.append(radius)
        self._start.append(starts)
        self._size.append(sizes)

    def _add_supers(self, centroids: torch.Tensor, radius: torch.Tensor, sizes: torch.Tensor,
                    sup_of: torch.Tensor, vmean: torch.Tensor | None) -> None:
        """Append the super-clusters of one segment: clusters ``[C_seg]`` (already ordered by
        super-cluster ``sup_of [C_seg]``) with their centroids, radii, sizes and mean values."""
        n_super = int(sup_of.max()) + 1
        w = sizes.float()
        keys_in = torch.zeros(n_super).index_add_(0, sup_of, w)  # [S_seg] keys per super (all > 0)
        mean = torch.zeros((n_super, centroids.shape[1])).index_add_(0, sup_of, centroids * w.unsqueeze(1)) / keys_in.unsqueeze(1)
        reach = (centroids - mean[sup_of]).norm(dim=1) + radius  # [C_seg] a member key is at most this far
        sup_radius = torch.zeros(n_super).scatter_reduce_(0, sup_of, reach, reduce="amax", include_self=True)
        counts = torch.bincount(sup_of, minlength=n_super)
        self._super.append(mean - self._center)
        self._super_radius.append(sup_radius)
        self._super_first.append(self.n_clusters + torch.cumsum(counts, 0) - counts)
        self._super_clusters.append(counts)
        self._super_keys.append(keys_in.round().to(torch.int64))
        if vmean is not None:
            self._super_vmean.append(torch.zeros((n_super, vmean.shape[1])).index_add_(0, sup_of, vmean * w.unsqueeze(1))
                                     / keys_in.unsqueeze(1))

    def _search(self, queries: torch.Tensor, k: int) -> SearchResult:
        budget = self.config.scan_budget(self.ntotal, k)
        tail_n = len(self._tail)
        scores, pos = [], []  # scores q . (key - m): the same ranking as q . key
        if tail_n:
            scores.append(queries @ (self._tail.view() - self._center).T)  # [R, P]
            pos.append(self._tail_pos.view())
        scored = 0
        self._last = None
        if self.n_clusters and budget > tail_n:
            rows = self._select_rows(queries, budget - tail_n)  # [n_sel]
            scores.append(_scores(queries, self._keys.view().index_select(0, rows)))  # [R, n_sel]
            pos.append(self._key_pos.view().index_select(0, rows))
            scored = self.n_clusters
        all_scores = scores[0] if len(scores) == 1 else torch.cat(scores, dim=1)  # [R, n]
        all_pos = pos[0] if len(pos) == 1 else torch.cat(pos)  # [n]
        if self.config.attend_scanned:
            every = all_pos.unsqueeze(0).expand(queries.shape[0], -1).clone()  # [R, n]
            return SearchResult(every, all_pos.shape[0], clusters_scored=scored, shared=True)
        top = torch.topk(all_scores, min(k, all_pos.shape[0]), dim=1).indices  # [R, k]
        return SearchResult(all_pos[top], all_pos.shape[0], clusters_scored=scored)

    def _group_bound(self, queries: torch.Tensor, table: torch.Tensor,
                     radius: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For centroids ``table [M, D]`` (centroid - m) with ``radius [M]``: the raw scores
        ``q . (c - m)`` ``[R, M]`` and the group's score per centroid ``[M]`` (the bound
        ``q . c + w |q| r``; rows compared on a shared log-softmax-like scale)."""
        raw = _scores(queries, table)  # [R, M]
        bound = raw
        if self.config.bound_weight:
            bound = torch.addr(raw, self.config.bound_weight * queries.norm(dim=1), radius)  # raw + w |q| r
        if queries.shape[0] > 1:
            z = self._scale * bound
            return raw, (z - z.amax(dim=1, keepdim=True)).amax(dim=0)
        return raw, bound[0]

    def _candidates(self, queries: torch.Tensor, budget: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """First level: the best super-clusters holding ``oversample * budget`` keys. Returns their
        clusters ``[M]`` (increasing), a mask of the chosen super-clusters ``[S]`` and the raw
        super scores ``[R, S]``."""
        raw, score = self._group_bound(queries, self._super.view(), self._super_radius.view())
        order = torch.sort(score, descending=True, stable=True).indices  # [S] ties in index order
        keys_in = self._super_keys.view().index_select(0, order)
        n_sel = min(order.shape[0], int(torch.searchsorted(torch.cumsum(keys_in, 0), math.ceil(self.config.oversample * budget))) + 1)
        chosen = torch.sort(order[:n_sel]).values
        mask = torch.zeros(order.shape[0], dtype=torch.bool)
        mask[chosen] = True
        first, count = self._super_first.view().index_select(0, chosen), self._super_clusters.view().index_select(0, chosen)
        offsets = torch.cumsum(count, 0) - count
        clusters = torch.repeat_interleave(first - offsets, count) + torch.arange(int(count.sum()))
        return clusters, mask, raw

    def _select_rows(self, queries: torch.Tensor, budget: int) -> torch.Tensor:
        """Rows of ``_keys`` in the best clusters for the group, at least ``budget`` of them."""
        if self.config.super_size and len(self._super_first):
            cand, sup_mask, sup_raw = self._candidates(queries, budget)
            raw, group_score = self._group_bound(queries, self._centroids.view().index_select(0, cand),
                                                 self._radius.view().index_select(0, cand))
        else:
            cand, sup_mask, sup_raw = None, None, None
            raw, group_score = self._group_bound(queries, self._centroids.view(), self._radius.view())
        self._last = _LastSearch(queries, raw, cand, sup_mask, sup_raw)
        sizes_all = self._size.view() if cand is None else self._size.view().index_select(0, cand)
        # best clusters first; equal scores (every row's best cluster scores exactly 0 for a group)
        # in index order, the native search's tie rule
        order = torch.sort(group_score, descending=True, stable=True).indices  # [C]
        sizes = sizes_all.index_select(0, order)
        n_sel = int(torch.searchsorted(torch.cumsum(sizes, 0), budget)) + 1
        sel, lens = order[:n_sel], sizes[:n_sel]
        if cand is not None:
            sel = cand.index_select(0, sel)
        offsets = torch.cumsum(lens, 0) - lens  # [n_sel] row offset of each cluster in the output
        return torch.repeat_interleave(self._start.view().index_select(0, sel) - offsets, lens) + torch.arange(int(lens.sum()))

    def estimate_rest(self, queries: torch.Tensor, attended: torch.Tensor, scale: float) -> PartialAttention:
        """Approximate attention of ``queries [R, D]`` over the indexed keys *not* in ``attended``
        (``[R, n]`` positions per row or ``[n]`` shared, each indexed and distinct in its row):
        ``out [R, D]``, ``lse [R]`` to merge with the exact parts (see the module docstring)."""
        if not self.config.track_values:
            raise ConfigError("estimate_rest needs a cluster index built with track_values=True")
        r = queries.shape[0]
        attended = attended.unsqueeze(0).expand(r, -1) if attended.dim() == 1 else attended
        queries = queries.detach().float()
        n_c, n_t = self.n_clusters, len(self._tail)
        if self.ntotal == 0:
            return partial_from_scores(queries.new_full((r, 0), float("-inf")), queries.new_zeros((0, self.dim)))
        rows = torch.searchsorted(self.positions(), attended.contiguous())  # [R, n] add-order rows
        cluster = self._cluster_of.view()[rows]  # [R, n], -1 = tail
        last = self._last
        fresh = last is not None and last.queries.shape == queries.shape and torch.equal(last.queries, queries)
        if not (fresh and last.raw.shape[1] == (n_c if last.clusters is None else last.clusters.shape[0])):
            last = _LastSearch(queries, _scores(queries, self._centroids.view()),
                               None, None, None)
        q_center = (queries @ self._center).unsqueeze(1)  # [R, 1]: q . m
        if last.clusters is None:  # every cluster is a unit
            local = cluster
            sizes, vmean, scores = self._size.view().float(), self._vmean.view(), last.raw
            if self.config.variance_correction:
                scores = scores + self._variance_term(queries, scale, None)
        else:  # clusters of the searched super-clusters, then the other super-clusters whole
            local = torch.full((n_c,), -1, dtype=torch.int64)
            local[last.clusters] = torch.arange(last.clusters.shape[0])
            clustered = cluster >= 0
            local = torch.where(clustered, local[cluster.clamp(min=0)], -1)
            if bool((clustered & (local < 0)).any()):
                raise InputError("estimate_rest: an attended key lies outside the last search's super-clusters; "
                                 "estimate with the queries that were searched")
            other = torch.nonzero(~last.super_mask).squeeze(1)  # [S'] super-clusters not opened
            sizes = torch.cat([self._size.view().index_select(0, last.clusters),
                               self._super_keys.view().index_select(0, other)]).float()
            vmean = torch.cat([self._vmean.view().index_select(0, last.clusters),
                               self._super_vmean.view().index_select(0, other)])
            raw = last.raw
            if self.config.variance_correction:
                raw = raw + self._variance_term(queries, scale, last.clusters)
            scores = torch.cat([raw, last.super_raw.index_select(1, other)], dim=1)
        n_u = sizes.shape[0]
        unit = torch.where(local >= 0, local, n_u + rows - (self.ntotal - n_t))  # tail keys are their own unit
        taken = torch.zeros((r, n_u + n_t)).scatter_add_(1, unit, torch.ones(unit.shape))  # [R, U + P]
        left = torch.log((torch.cat([sizes, torch.ones(n_t)]).unsqueeze(0) - taken).clamp(min=0))  # -inf: all attended
        tail = partial_from_scores((queries @ self._tail.view().T) * scale + left[:, n_u:], self._tail_val.view()) if n_t else None
        if n_u == 0:  # only tail keys so far
            return tail
        clusters = partial_from_scores((scores + q_center) * scale + left[:, :n_u], vmean.float())
        return clusters if tail is None else merge_partials([clusters, tail])  # no copy of the (large) mean-value table

    def _variance_term(self, queries: torch.Tensor, scale: float, clusters: torch.Tensor | None) -> torch.Tensor:
        """``scale/2 * sum_d q_d^2 var_d`` ``[R, M]`` for the clusters ``clusters [M]`` (None = all),
        in raw score units (``estimate_rest`` multiplies scores by ``scale``)."""
        var = self._kvar.view() if clusters is None else self._kvar.view().index_select(0, clusters)
        return 0.5 * scale * _scores(queries.pow(2), var)

    def nbytes(self) -> int:
        parts = (self._keys, self._key_pos, self._centroids, self._radius, self._start, self._size,
                 self._tail, self._tail_pos, self._open, self._open_pos, self._positions,
                 self._cluster_of, self._vmean, self._kvar, self._tail_val, self._open_val,
                 self._super, self._super_radius, self._super_first, self._super_clusters, self._super_keys,
                 self._super_vmean)
        return sum(p.nbytes() for p in parts)
