"""Retrieval attention for one decode step of one layer: exact on the resident part, top-k on the rest.

The resident part (attention sinks + recent window) is given as K/V ``[H_kv, S, D]``. Every other
token of the layer lives in an :class:`OffloadedLayerKV`: per kv head, a :class:`KeyIndex` over its
keys and a host :class:`KVStore` of its keys and values. For each kv head, one index search serves
the ``G = H_q / H_kv`` query heads of its GQA group (query head ``j`` uses kv head ``j // G``);
the union of the positions found is gathered from the store, attended exactly, and merged with the
resident part by log-sum-exp.

Invariant: the resident part and the offloaded tokens are disjoint; with ``top_k`` at least the
number of offloaded tokens the step equals full attention over both (up to rounding).

One layer of a decode step (``k_cache/v_cache [H_kv, T, D]`` hold positions ``0 .. T-1``)::

    config = RetrievalConfig(sink_tokens=4, window=256, top_k=100, index="cluster")
    offloaded = OffloadedLayerKV(num_kv_heads, head_dim, config)        # once per layer
    leaving = config.offload_range(T, offloaded.offloaded_end, block=64)
    if leaving:                                                         # whole blocks left the window
        pos = torch.arange(leaving.start, leaving.stop)
        offloaded.append(k_cache[:, pos], v_cache[:, pos], pos)
    resident = config.resident_positions(T, offloaded.offloaded_end)   # [S]: sinks + the rest
    out = RetrievalAttention(config).decode_step(
        q, k_cache[:, resident], v_cache[:, resident], offloaded, scale=head_dim ** -0.5)
    out.output  # [H_q, D];  out.stats (keys scanned / retrieved, timings), out.retrieved
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Sequence

import torch

from flashtier.errors import ConfigError, InputError
from flashtier.retrieval.cluster_batch import HeadsSearch, attend_rows, search_heads
from flashtier.retrieval.index import KeyIndex
from flashtier.retrieval.index_config import IndexConfig
from flashtier.retrieval.index_registry import INDEXES, index_config, make_index
from flashtier.retrieval.merge import PartialAttention, merge_partials, partial_attention
from flashtier.retrieval.metrics import keys_scanned_fraction
from flashtier.retrieval.store import KVStore, QuantizedKVStore, TensorKVStore


class GroupSearch(enum.Enum):
    """How one index search serves the query heads of a GQA group."""

    UNION = "union"
    """Search with every query of the group; attend the union of their top-k (up to G*k keys)."""
    MEAN = "mean"
    """Search once with the group's mean query; attend its top-k."""
    ROWS = "rows"
    """Search once with every query of the group (one shared scan); each query head attends its own top-k."""


@dataclass(frozen=True)
class RetrievalConfig:
    """Retrieval attention settings (one per model; the same for every layer and head)."""

    sink_tokens: int = 4
    """First positions always kept resident (attention sinks)."""
    window: int = 256
    """Most recent positions kept resident."""
    top_k: int = 100
    """Offloaded keys retrieved per query (per search row) and attended exactly."""
    index: str = "cluster"
    """Key index by registered name: ``flat`` (exact), ``ivf`` (faiss), ``cluster`` (attention-aware)."""
    scan_budget_fraction: float = 0.02
    """Share of offloaded keys an approximate index may score per search."""
    group_search: GroupSearch = GroupSearch.UNION
    """How one search serves a GQA group (a :class:`GroupSearch` or its value ``union`` / ``mean``)."""
    store_bits: int | None = None
    """Host K/V precision: ``None`` keeps K/V as given, 2 or 4 quantises them KIVI-style."""
    store_group_size: int = 32
    """KIVI group size (tokens for keys, channels for values) when ``store_bits`` is set."""
    index_options: Mapping[str, int | float | None] = field(default_factory=dict, hash=False)
    """Extra options of the chosen index (e.g. ``{"nlist": 256}`` for ``ivf``)."""
    estimate_rest: bool = False
    """Also approximate the attention on the offloaded keys that were not retrieved, by the index's
    cluster centroids and mean values (RetroInfer's estimation zone; needs an index with
    ``estimate_rest``, i.e. ``cluster``)."""

    def __post_init__(self) -> None:
        if self.sink_tokens < 0:
            raise ConfigError(f"sink_tokens must be >= 0, got {self.sink_tokens}")
        if self.window < 0:
            raise ConfigError(f"window must be >= 0 (recent tokens kept resident), got {self.window}")
        if self.top_k <= 0:
            raise ConfigError(
                f"top_k must be positive (offloaded keys attended per query), got {self.top_k}; "
                "to attend only sinks + window use the streaming selection policy instead"
            )
        if isinstance(self.group_search, str):
            try:
                object.__setattr__(self, "group_search", GroupSearch(self.group_search))
            except ValueError:
                raise ConfigError(
                    f"group_search must be one of {[g.value for g in GroupSearch]}, got {self.group_search!r}"
                ) from None
        if self.store_bits is not None and self.store_bits not in (2, 4, 8):
            raise ConfigError(f"store_bits must be None (full precision), 2, 4 or 8, got {self.store_bits}")
        if self.store_group_size <= 0:
            raise ConfigError(f"store_group_size must be positive, got {self.store_group_size}")
        if "scan_budget_fraction" in self.index_options:
            raise ConfigError("set scan_budget_fraction on RetrievalConfig, not in index_options")
        object.__setattr__(self, "index_options", MappingProxyType(dict(self.index_options)))
        if self.estimate_rest and self.index in INDEXES and not hasattr(INDEXES[self.index].cls, "estimate_rest"):
            raise ConfigError(f"estimate_rest needs an index that summarises unretrieved keys (cluster), not {self.index!r}")
        self.index_config()  # unknown index name or options -> ConfigError now, not at first use

    def _index_options(self) -> dict[str, int | float | None]:
        options = {"scan_budget_fraction": self.scan_budget_fraction, **self.index_options}
        if self.estimate_rest:
            options["track_values"] = True
        return options

    def index_config(self) -> IndexConfig:
        """The validated config of the chosen index."""
        return index_config(self.index, **self._index_options())

    def make_index(self, dim: int) -> KeyIndex:
        """A new, empty index of the chosen kind for keys of dimension ``dim``."""
        return make_index(self.index, dim, **self._index_options())

    def make_store(self, dim: int, dtype: torch.dtype = torch.float32) -> KVStore:
        """A new, empty host K/V store of the chosen precision."""
        if self.store_bits is None:
            return TensorKVStore(dim, dtype)
        return QuantizedKVStore(dim, self.store_bits, self.store_group_size)

    def resident_positions(self, length: int, offloaded_end: int | None = None) -> torch.Tensor:
        """Positions ``[S]`` (increasing) that stay resident in a context of ``length`` tokens: the
        sinks, plus every position from ``offloaded_end`` on (``None``: exactly the last ``window``,
        as if everything older were offloaded)."""
        sinks = min(self.sink_tokens, length)
        first_recent = length - self.window if offloaded_end is None else offloaded_end
        return torch.cat([torch.arange(sinks), torch.arange(max(sinks, first_recent), length)])

    def offload_range(self, length: int, offloaded_end: int, block: int = 1) -> range:
        """Positions to offload now: from ``offloaded_end`` (never a sink) up to the last multiple
        of ``block`` that keeps at least ``window`` recent positions resident (whole KV blocks)."""
        start = max(offloaded_end, self.sink_tokens)
        end = max(0, length - self.window) // block * block
        return range(start, max(start, end))


@dataclass(frozen=True)
class OffloadedHead:
    """The offloaded tokens of one kv head: an index over their keys and a store of their K/V."""

    index: KeyIndex
    store: KVStore


class OffloadedLayerKV:
    """Per kv head index + store for the tokens of one layer that left the resident set.

    ``append`` adds blocks as they leave the window (positions increasing, each added once).
    ``stores`` replaces the host stores of ``config`` (one per kv head), e.g. views of a paged KV
    pool whose blocks may sit in host memory or in storage.
    """

    def __init__(self, num_kv_heads: int, head_dim: int, config: RetrievalConfig, dtype: torch.dtype = torch.float32,
                 stores: Sequence[KVStore] | None = None) -> None:
        if num_kv_heads <= 0 or head_dim <= 0:
            raise ConfigError(f"num_kv_heads and head_dim must be positive, got {num_kv_heads} and {head_dim}")
        if stores is not None and len(stores) != num_kv_heads:
            raise ConfigError(f"OffloadedLayerKV needs one store per kv head ({num_kv_heads}), got {len(stores)}")
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        if stores is None:
            stores = [config.make_store(head_dim, dtype) for _ in range(num_kv_heads)]
        self.heads = tuple(OffloadedHead(config.make_index(head_dim), store) for store in stores)

    def __len__(self) -> int:
        """Offloaded tokens (the same for every kv head)."""
        return len(self.heads[0].store)

    @property
    def offloaded_end(self) -> int:
        """One past the last offloaded position (0 when nothing is offloaded)."""
        positions = self.heads[0].index.positions()
        return int(positions[-1]) + 1 if positions.numel() else 0

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Offload ``keys, values [H_kv, n, D]`` at ``positions [n]``: index the keys, store both."""
        if keys.dim() != 3 or keys.shape[0] != self.num_kv_heads or keys.shape[2] != self.head_dim or values.shape != keys.shape:
            raise InputError(
                f"offload expects keys and values [H_kv={self.num_kv_heads}, n, D={self.head_dim}], "
                f"got {tuple(keys.shape)} and {tuple(values.shape)}"
            )
        positions = torch.as_tensor(positions, dtype=torch.int64)
        for head, k, v in zip(self.heads, keys, values):
            head.index.add(k, positions, v)
            head.store.append(k, v, positions)

    @property
    def build_time_s(self) -> float:
        """Seconds spent indexing, summed over kv heads."""
        return sum(h.index.build_time_s for h in self.heads)

    def gather(self, positions: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys and values ``[H_kv, n, D]`` of ``positions[h] [n_h]`` per kv head (``n = max n_h``;
        rows past ``n_h`` are padding) and the mask ``[H_kv, n]`` of the real rows."""
        if len(positions) != self.num_kv_heads:
            raise InputError(f"gather needs positions for each of the {self.num_kv_heads} kv heads, got {len(positions)}")
        lengths = torch.tensor([p.numel() for p in positions])  # [H_kv]
        n = int(lengths.max()) if lengths.numel() else 0
        parts = [head.store.gather(p) for head, p in zip(self.heads, positions)]
        dtype = parts[0][0].dtype
        k = torch.zeros((self.num_kv_heads, n, self.head_dim), dtype=dtype)
        v = torch.zeros_like(k)
        for h, (kh, vh) in enumerate(parts):
            k[h, : kh.shape[0]], v[h, : vh.shape[0]] = kh, vh
        return k, v, torch.arange(n).unsqueeze(0) < lengths.unsqueeze(1)

    def gather_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[H_kv, n, D]`` at positions ``rows [H_kv, n]`` (the same count for
        every kv head: the per-row search's ``G * k`` each); :meth:`gather` without padding."""
        k, v, _ = self.gather(list(rows.unbind(0)))
        return k, v

    def attend_rows(self, q: torch.Tensor, resident_k: Sequence[torch.Tensor], resident_v: Sequence[torch.Tensor],
                    rows: torch.Tensor, rest: PartialAttention | None, scale: float,
                    threads: int | None = None) -> torch.Tensor | None:
        """The per-row decode attention reading the retrieved rows where they are stored: query row
        ``q[h, g]`` (``q [H_kv, G, D]`` fp32) over the resident K/V of its kv head (parts
        ``[H_kv, S_i, D]`` in position order) and the offloaded positions ``rows [H_kv, G, k]``,
        with ``rest`` in the same softmax, as :func:`~flashtier.retrieval.cluster_batch.attend_rows`
        over the concatenated resident and the gathered rows computes it (the same result to the
        bit). None where the stores cannot be read in place (then the caller gathers): this base
        class never can."""
        return None

    def nbytes(self) -> int:
        """Bytes of indexes and stores, all kv heads."""
        return sum(h.index.nbytes() + h.store.nbytes() for h in self.heads)


@dataclass(frozen=True)
class StepStats:
    """What one decode step of one layer cost, summed over kv heads."""

    keys_offloaded: int
    """Offloaded keys, summed over kv heads."""
    keys_scanned: int
    """Keys the indexes scored exactly."""
    keys_retrieved: int
    """Keys gathered from the stores and attended."""
    search_s: float
    gather_s: float
    attend_s: float

    @property
    def keys_scanned_fraction(self) -> float:
        return keys_scanned_fraction(self.keys_scanned, self.keys_offloaded)


@dataclass(frozen=True)
class RetrievalOutput:
    """Result of one decode step of one layer."""

    output: torch.Tensor
    """``[H_q, D]`` attention output."""
    retrieved: tuple[torch.Tensor, ...]
    """Per kv head, the offloaded positions attended: ``[n_h]`` shared by the group (increasing), or
    ``[G, k]`` one row per query head with ``GroupSearch.ROWS``."""
    stats: StepStats


class RetrievalAttention:
    """Runs :meth:`decode_step`; holds only the config (state lives in :class:`OffloadedLayerKV`)."""

    def __init__(self, config: RetrievalConfig = RetrievalConfig(), threads: int | None = None) -> None:
        """``threads``: of the native search and attention (each kv head on one thread, so the
        results do not depend on it); None = torch's thread count at each call (which decode
        steps set to 1 around the one-row kernels: pass the model's count)."""
        self.config = config
        self.threads = threads

    def search_many(self, queries: Sequence[torch.Tensor], offloaded: Sequence[OffloadedLayerKV],
                    scale: float) -> list[tuple[HeadsSearch, float]] | None:
        """The searches of several sequences' layers (a batched decode step: ``queries[b] [H_q, D]``
        over ``offloaded[b]``) in one native call, every sequence's kv heads spread over the thread
        pool together. Each head is searched by the same operations as alone, so each sequence's
        :meth:`decode_step` given its part (``presearched``) returns what it returns alone. Per
        sequence (its search, its share of the call's seconds); None where the joint call does not
        apply (group search other than ``rows``, tensors off the host, an index the native search
        does not take): the sequences then search one by one."""
        if self.config.group_search is not GroupSearch.ROWS or len(queries) != len(offloaded) or not queries:
            return None
        qs = []
        for query, off in zip(queries, offloaded):
            if query.dim() != 2 or query.device.type != "cpu" or query.shape[1] != off.head_dim \
                    or query.shape[0] % off.num_kv_heads:
                return None
            qs.append(query.reshape(off.num_kv_heads, -1, off.head_dim).float())  # [H_kv, G, D]
        if len({q.shape[1:] for q in qs}) != 1:
            return None
        t0 = time.perf_counter()
        joint = search_heads([head.index for off in offloaded for head in off.heads], torch.cat(qs), self.config.top_k,
                             estimate_scale=scale if self.config.estimate_rest else None, threads=self.threads)
        if joint is None:
            return None
        share = (time.perf_counter() - t0) / len(qs)
        parts, h0 = [], 0
        for q in qs:
            part = slice(h0, h0 + q.shape[0])
            rest = None if joint.rest is None else PartialAttention(joint.rest.out[part], joint.rest.lse[part])
            parts.append((HeadsSearch(joint.positions[part], joint.keys_scanned[part], rest), share))
            h0 += q.shape[0]
        return parts

    def decode_step(
        self,
        query: torch.Tensor,
        resident_k: torch.Tensor | Sequence[torch.Tensor],
        resident_v: torch.Tensor | Sequence[torch.Tensor],
        offloaded: OffloadedLayerKV,
        scale: float,
        presearched: tuple[HeadsSearch, float] | None = None,
    ) -> RetrievalOutput:
        """Attention of ``query [H_q, D]`` over the resident ``K/V [H_kv, S, D]`` plus the top-k of
        ``offloaded``, merged exactly (``scale`` multiplies ``q . k`` before the softmax). The
        resident K/V may come in parts ``[H_kv, S_i, D]`` in position order (the sinks and the
        window's spans: concatenated only where a path needs one tensor). ``presearched``: this
        step's part of :meth:`search_many` and its seconds (the search is not run again)."""
        parts_k = [resident_k] if isinstance(resident_k, torch.Tensor) else list(resident_k)
        parts_v = [resident_v] if isinstance(resident_v, torch.Tensor) else list(resident_v)
        if not parts_k or len(parts_k) != len(parts_v):
            raise InputError(f"resident K/V must come in as many key parts as value parts (at least one), got "
                             f"{len(parts_k)} and {len(parts_v)}")
        h_kv, d = offloaded.num_kv_heads, offloaded.head_dim
        if query.dim() != 2 or query.shape[1] != d or query.shape[0] % h_kv:
            raise InputError(f"query must be [H_q, {d}] with H_q a multiple of H_kv={h_kv}, got {tuple(query.shape)}")
        for pk, pv in zip(parts_k, parts_v):
            if pk.dim() != 3 or pk.shape[0] != h_kv or pk.shape[2] != d or pv.shape != pk.shape:
                raise InputError(
                    f"resident K/V must be [H_kv={h_kv}, S, D={d}], got {tuple(pk.shape)} and {tuple(pv.shape)}"
                )
        q_dev = query.reshape(h_kv, -1, d)  # [H_kv, G, D] where the resident K/V are (a GPU's, or the CPU)
        # The search, the gather and the attention over retrieved keys run on the host, where the
        # index and the offloaded blocks are; the resident part where its K/V are; merged there.
        device = parts_k[0].device
        on_host = device.type == "cpu"
        q = q_dev if on_host else q_dev.cpu()
        t0 = time.perf_counter()
        per_row = self.config.group_search is GroupSearch.ROWS
        batch = None
        if presearched is not None:  # searched with other sequences' heads (search_many)
            batch, searched_s = presearched
            t0 -= searched_s
        elif per_row:  # every kv head's search (and estimate) in one native call where it applies
            batch = search_heads([head.index for head in offloaded.heads], q.float(), self.config.top_k,
                                 estimate_scale=scale if self.config.estimate_rest else None, threads=self.threads)
        if batch is not None:
            scanned = sum(batch.keys_scanned)
            retrieved = list(batch.positions.unbind(0))  # [G, k] per kv head
        else:
            scanned = 0
            results = []
            for head, q_group in zip(offloaded.heads, q):  # q_group [G, D]: one search per GQA group
                rows = q_group.mean(dim=0, keepdim=True) if self.config.group_search is GroupSearch.MEAN else q_group
                results.append(head.index.search(rows.float(), self.config.top_k))
                scanned += results[-1].keys_scanned
            # an index that returns one shared set per group (all it scanned) is attended as a union
            per_row = per_row and not all(f.shared for f in results)
            # per row: [G, k'] each query head's own top-k; else [n_h] sorted union over rows
            retrieved = [f.positions if per_row else torch.unique(f.positions) for f in results]
        t1 = time.perf_counter()
        g = q.shape[1]
        if batch is not None and on_host:  # the retrieved rows read where they are, the merge in the same call
            fused = offloaded.attend_rows(q, parts_k, parts_v, batch.positions, batch.rest, scale,
                                          threads=self.threads)  # [H_kv, G, D]
            if fused is not None:
                t3 = time.perf_counter()
                stats = StepStats(len(offloaded) * h_kv, scanned, sum(p.numel() for p in retrieved), t1 - t0, 0.0,
                                  t3 - t1)
                return RetrievalOutput(fused.to(query.dtype).reshape(query.shape), tuple(retrieved), stats)
        resident_k = parts_k[0] if len(parts_k) == 1 else torch.cat(parts_k, dim=1)  # [H_kv, S, D]
        resident_v = parts_v[0] if len(parts_v) == 1 else torch.cat(parts_v, dim=1)
        if batch is not None:  # every head G * k rows: no padding
            k, v = offloaded.gather_rows(batch.positions.reshape(h_kv, -1))  # [H_kv, n, D] x2
            valid = None
        else:
            k, v, valid = offloaded.gather([p.reshape(-1) for p in retrieved])  # [H_kv, n, D] x2, [H_kv, n]
        t2 = time.perf_counter()
        attended = sum(p.numel() for p in retrieved)
        if batch is not None and on_host:  # exact parts and the merge in one native call where it applies
            fused = attend_rows(q, resident_k, resident_v, k.view(h_kv, g, -1, d), v.view(h_kv, g, -1, d),
                                batch.rest, scale, threads=self.threads)  # [H_kv, G, D]
            if fused is not None:
                t3 = time.perf_counter()
                stats = StepStats(len(offloaded) * h_kv, scanned, attended, t1 - t0, t2 - t1, t3 - t2)
                return RetrievalOutput(fused.to(query.dtype).reshape(query.shape), tuple(retrieved), stats)
        resident = partial_attention(q_dev, resident_k, resident_v, scale)  # out [H_kv, G, D], lse [H_kv, G]
        if per_row:  # n = G * k' for every head: attend row by row
            rk, rv = k.view(h_kv, g, -1, d), v.view(h_kv, g, -1, d)  # [H_kv, G, k', D]
            row = partial_attention(q.unsqueeze(2), rk.to(q.dtype), rv.to(q.dtype), scale)  # out [H_kv, G, 1, D]
            far = PartialAttention(row.out.squeeze(2), row.lse.squeeze(2))
        else:
            assert valid is not None  # (gathered with padding: the per-head searches)
            far = partial_attention(q, k.to(q.dtype), v.to(q.dtype), scale, mask=valid.unsqueeze(1))  # [H_kv, G, D]
        parts = [resident, far]
        t3 = time.perf_counter()
        if batch is not None and batch.rest is not None:  # estimated by the native search
            parts.append(PartialAttention(batch.rest.out.to(q.dtype), batch.rest.lse))
        elif self.config.estimate_rest:  # the offloaded keys not retrieved, approximately
            rest = [head.index.estimate_rest(q_group.float(), found, scale)  # type: ignore[attr-defined]
                    for head, q_group, found in zip(offloaded.heads, q, retrieved)]
            parts.append(PartialAttention(torch.stack([r.out for r in rest]).to(q.dtype), torch.stack([r.lse for r in rest])))
        t4 = time.perf_counter()
        if not on_host:  # the host parts go up to be merged with the resident part (a few KB)
            parts = [parts[0]] + [PartialAttention(p.out.to(device), p.lse.to(device)) for p in parts[1:]]
        merged = merge_partials(parts)  # out [H_kv, G, D]
        t5 = time.perf_counter()
        stats = StepStats(len(offloaded) * h_kv, scanned, attended, (t1 - t0) + (t4 - t3), t2 - t1, (t3 - t2) + (t5 - t4))
        return RetrievalOutput(merged.out.reshape(query.shape), tuple(retrieved), stats)
