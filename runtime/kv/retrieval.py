"""Long-context KV cache: paged KV across tiers, exact chunked prefill, retrieval attention at decode.

:class:`RetrievalKVCache` implements the :class:`~flashtier.runtime.kv.cache.KVCache` protocol;
the engine builds it with :func:`retrieval_cache` when ``EngineConfig.attention == "retrieval"``.

Where the KV of one layer lives (positions ``0 .. length-1``; B = block size)::

    [0, sink)            device tier: attention sinks, kept for good           (DeviceKVWindow)
    [sink, ring_start)   host tier, blocks in a budgeted slot pool, the least  (HostKVPool)
                         recently used spilled to storage with a crc32          (KVSpillStore)
                         -- and indexed per kv head when they left the window   (OffloadedLayerKV)
    [ring_start, length) device tier: ring of the recent blocks                 (DeviceKVWindow)

``ring_start`` is a multiple of B and ``length - ring_start < window + B`` after every pass: whole
blocks are demoted (copied to the host pool, their keys added to the index) as soon as they are
entirely older than the window. The device tier is allocated once (sinks + a ring of
``window + B + prefill_chunk`` positions), so its bytes do not grow with the context.

Attention, with ``q`` and ``k`` already rotated (RoPE):

- A pass of several tokens (prefill) is **exact**: it is cut into chunks of at most
  ``prefill_chunk`` queries; each chunk attends to the demoted blocks read in batches of
  ``prefill_key_block`` keys (spilled blocks read through storage, verified) and to the device
  tier under a causal mask, and the partial results are merged by their log-sum-exp
  (:mod:`flashtier.retrieval.blockwise`). Peak extra memory is one chunk against one key batch,
  whatever the context.
- A pass of one token (decode) attends exactly to sinks + window and to the top-k offloaded keys
  the layer's index finds for the query (one search per GQA group, union of the group's top-k),
  merged by log-sum-exp (:class:`~flashtier.retrieval.attention.RetrievalAttention`). With
  ``top_k`` at least the context it equals full attention.

Invariant: every position is in exactly one of sinks / host-or-storage / ring, except that block 0
also keeps its sink positions in the host pool (blocks are whole); indexes hold exactly the
demoted positions ``[sink, ring_start)``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence

import torch

from flashtier.errors import BudgetError, ConfigError, InputError
from flashtier.retrieval.attention import RetrievalAttention
from flashtier.retrieval.cluster_batch import HeadsSearch
from flashtier.retrieval.blockwise import KeyBlock, blockwise_attention
from flashtier.retrieval.merge import partial_attention
from flashtier.runtime.kv.device import DeviceKVWindow
from flashtier.runtime.kv.host import HostKVPool
from flashtier.runtime.kv.host_views import PagedLayerKV
from flashtier.runtime.kv.layout import KVBlockLayout
from flashtier.runtime.kv.retrieval_config import RetrievalCacheConfig
from flashtier.runtime.kv.retrieval_stats import AttentionCheck, RetrievalCounters
from flashtier.runtime.kv.codec import kv_codec
from flashtier.runtime.kv.spill import KVSpillStore
from flashtier.storage_backends.base import StorageBackend
from flashtier.tiers.store import TieredStore


class RetrievalKVCache:
    """KV of one sequence across device / host / storage tiers (see the module docstring)."""

    def __init__(self, layout: KVBlockLayout, config: RetrievalCacheConfig = RetrievalCacheConfig(),
                 backend: StorageBackend | None = None, device: torch.device | str = "cpu",
                 store: TieredStore | None = None, threads: int | None = None) -> None:
        """``store``: the tiered store whose arena holds the host blocks (the model's); None = a
        store of the cache's own. ``threads``: of the native search and attention (the model's
        kernel threads; None = torch's count at each call)."""
        if config.block_size != layout.block_size:
            raise ConfigError(f"cache config block size {config.block_size} != layout block size {layout.block_size}")
        self.layout, self.config = layout, config
        self.length = 0
        """Positions cached (all layers agree after a full forward pass)."""
        r = config.retrieval
        self.device_tier = DeviceKVWindow(layout, r.sink_tokens, config.ring_tokens, device, config.huge_pages)
        if config.device_budget is not None and self.device_tier.nbytes() > config.device_budget:
            raise BudgetError(
                f"the device KV tier needs {self.device_tier.nbytes()} B (sinks {r.sink_tokens} + ring "
                f"{config.ring_tokens} positions x {layout.token_bytes} B) but kv_device_budget is "
                f"{config.device_budget} B; lower --window or the prefill chunk, or raise the budget"
            )
        codec = kv_codec(layout, config.kv_quant_bits, config.kv_quant_group)
        self.spill = KVSpillStore(layout, config.spill_dir, backend, record_bytes=codec.record_bytes)
        self.host = HostKVPool(layout, config.host_budget, self.spill, codec, store, huge_pages=config.huge_pages)
        self._attention = RetrievalAttention(r, threads)
        self._scale = layout.head_dim ** -0.5
        self._layer_len = [0] * layout.num_layers  # positions written per layer
        self._ring_start = [0] * layout.num_layers  # first position in the ring (multiple of B)
        self._offloaded = [self._new_offloaded(i) for i in range(layout.num_layers)]
        self._build_s_dropped = 0.0  # index build time of indexes replaced by truncate
        self.counters = RetrievalCounters()
        self.check = AttentionCheck()

    # ------------------------------------------------------------------ KVCache protocol
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int,
               presearched: tuple[HeadsSearch, float] | None = None) -> torch.Tensor:
        """Store ``k, v [H_kv, T, D]`` at ``start ..`` and return attention of ``q [H_q, T, D]``
        over positions ``0 .. start+T-1``: ``[H_q, T, D]`` (exact for T > 1, retrieval for T = 1).
        ``presearched``: this token's search, already run with other sequences' (:func:`attend_batch`)."""
        self._check_pass(layer, q, k, v, start)
        t0 = time.perf_counter()
        t = q.shape[1]
        if t == 1:
            if layer == 0:
                self.counters.decode_steps += 1
            check_before = self.counters.check_s
            out = self._decode(layer, q, k, v, start, presearched)
            self.counters.decode_attention_s += time.perf_counter() - t0 - (self.counters.check_s - check_before) + \
                (presearched[1] if presearched is not None else 0.0)
        else:
            chunk = self.config.prefill_chunk
            out = torch.cat([self._exact(layer, q[:, s : s + chunk], k[:, s : s + chunk], v[:, s : s + chunk], start + s)
                             for s in range(0, t, chunk)], dim=1)
            self.counters.exact_passes += 1
            self.counters.exact_attention_s += time.perf_counter() - t0
        if layer == self.layout.num_layers - 1:
            self.length = self._layer_len[layer]
        return out

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        """Store ``k, v [H_kv, T, D]`` at ``start ..`` without attending (e.g. to fill a cache with
        precomputed KV); blocks are demoted and indexed as in :meth:`attend`."""
        if start != self._layer_len[layer]:
            raise InputError(f"layer {layer} holds {self._layer_len[layer]} positions; cannot write at {start}")
        step = self.config.prefill_chunk
        for s in range(0, k.shape[1], step):
            n = min(step, k.shape[1] - s)
            self.device_tier.write(layer, k[:, s : s + n], v[:, s : s + n], start + s)
            self._layer_len[layer] = start + s + n
            self._demote(layer)
        if layer == self.layout.num_layers - 1:
            self.length = self._layer_len[layer]

    def reserve(self, num_tokens: int) -> None:
        """Plan the host pool for ``num_tokens`` positions (leaving budget for their indexes)."""
        lay = self.layout
        index = self.config.retrieval.index_config()
        per_key = index.bytes_per_key(lay.head_dim) + 8  # + the store's position
        heads = lay.num_layers * lay.num_kv_heads
        index_bytes = int(heads * (num_tokens * per_key + index.fixed_bytes(lay.head_dim)))
        self.host.plan(-(-num_tokens // lay.block_size) * lay.num_layers, index_bytes)

    def truncate(self, length: int) -> None:
        """Forget positions ``length ..``; layers whose demoted part is cut get their index rebuilt
        from the blocks kept (and their recent blocks moved back into the device ring)."""
        length = max(0, length)
        for layer in range(self.layout.num_layers):
            if self._layer_len[layer] <= length:
                continue
            if length >= self._ring_start[layer]:
                self._layer_len[layer] = length
            else:
                self._rebuild(layer, length)
        self.length = min(self.length, length)

    def nbytes(self) -> int:
        """KV bytes held in memory: device tier + host blocks + key indexes."""
        return self.device_tier.nbytes() + self.host.host_block_bytes() + self.index_bytes()

    # ------------------------------------------------------------------ reporting
    def index_bytes(self) -> int:
        """Bytes of the key indexes (and their position lists), all layers."""
        return sum(off.nbytes() for off in self._offloaded)

    def index_build_s(self) -> float:
        """Seconds spent building the key indexes."""
        return self._build_s_dropped + sum(off.build_time_s for off in self._offloaded)

    def kv_bytes_per_tier(self) -> dict[str, int]:
        """Bytes per tier: device (sinks + ring, constant), host (blocks + indexes), storage."""
        return {"device": self.device_tier.nbytes(), "host": self.host.host_block_bytes() + self.index_bytes(),
                "storage": self.spill.nbytes()}

    def stats(self) -> dict[str, object]:
        """Entries merged into ``flashtier generate --json`` statistics."""
        r = self.config.retrieval
        d: dict[str, object] = {
            "attention": "retrieval",
            "kv_index": r.index,
            "attention_sink_tokens": r.sink_tokens,
            "attention_window": r.window,
            "attention_top_k_keys": r.top_k,
            "attention_scan_budget": r.scan_budget_fraction,
            "attention_group_search": r.group_search.value,
            "attention_estimate_rest": r.estimate_rest,
            "kv_index_options": dict(r.index_options),
            "kv_bytes_per_tier": self.kv_bytes_per_tier(),
            "kv_index_bytes": self.index_bytes(),
            "kv_host_block_bytes": self.host.host_block_bytes(),
            "kv_host_codec": self.host.codec.name,
            "kv_host_allocated_bytes": self.host.allocated_bytes() + self.index_bytes(),
            "kv_blocks_spilled": self.spill.counters.blocks_written,
            "kv_blocks_read_from_storage": self.spill.counters.blocks_read,
            "index_build_s": round(self.index_build_s(), 4),
        }
        d.update(self.counters.as_dict())
        if self.check.samples:
            d.update(self.check.as_dict())
        return d

    def close(self) -> None:
        """Forget the host blocks and delete the spill files. The cache must not be used afterwards."""
        self.host.close()
        self.spill.close()

    # ------------------------------------------------------------------ passes
    def _check_pass(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        lay = self.layout
        if k.dim() != 3 or k.shape[0] != lay.num_kv_heads or k.shape[2] != lay.head_dim or v.shape != k.shape:
            raise InputError(f"attend expects k, v [{lay.num_kv_heads}, T, {lay.head_dim}], got {tuple(k.shape)}, {tuple(v.shape)}")
        if q.dim() != 3 or q.shape[1:] != k.shape[1:] or q.shape[0] % lay.num_kv_heads:
            raise InputError(f"attend expects q [H_q, T, D] with H_q a multiple of {lay.num_kv_heads}, got {tuple(q.shape)}")
        if start != self._layer_len[layer]:
            raise InputError(f"layer {layer} holds {self._layer_len[layer]} positions, asked to attend at {start}; "
                             "truncate the cache first")

    def _exact(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        """Exact causal attention of one chunk ``q [H_q, T, D]`` (T <= prefill_chunk)."""
        h_q, t, d = q.shape
        h_kv = self.layout.num_kv_heads
        g = h_q // h_kv
        end = start + t
        self.device_tier.write(layer, k, v, start)
        self._layer_len[layer] = end
        qf = q.float().reshape(h_kv, g * t, d)  # [H_kv, G*T, D]: row gi*T + ti is query head h*G+gi at start+ti
        q_pos = torch.arange(start, end).repeat(g)  # [G*T]
        out = blockwise_attention(qf, self._exact_blocks(layer, end, q_pos), self._scale).out  # [H_kv, G*T, D]
        self._demote(layer)
        return out.reshape(h_q, t, d).to(q.dtype)

    def _exact_blocks(self, layer: int, end: int, q_pos: torch.Tensor) -> Iterator[KeyBlock]:
        """Key blocks of positions ``0 .. end-1``: demoted batches (all older than the queries,
        no mask), then the device tier under a causal mask ``[G*T, n]``."""
        b, sink = self.layout.block_size, self.config.retrieval.sink_tokens
        n_blocks = self._ring_start[layer] // b
        per = self.config.prefill_key_block // b
        device = self.device_tier.device
        for b0 in range(0, n_blocks, per):
            keys, values = _split_blocks(self.host.read_blocks(layer, b0, min(n_blocks, b0 + per)))  # [H, n, D]
            cut = max(0, sink - b0 * b)  # sink positions are attended from the device tier
            yield keys[:, cut:].to(device), values[:, cut:].to(device), None  # (host batches copied up: prefill)
        k_dev, v_dev, pos = self._resident(layer, end)
        yield k_dev, v_dev, (pos.unsqueeze(0) <= q_pos.unsqueeze(1)).to(device)  # [G*T, n], the same for every kv head

    def _decode(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int,
                presearched: tuple[HeadsSearch, float] | None = None) -> torch.Tensor:
        """Retrieval attention of one token: exact on sinks + window, top-k from the index."""
        h_q, _, d = q.shape
        h_kv = self.layout.num_kv_heads
        self.device_tier.write(layer, k, v, start)
        self._layer_len[layer] = start + 1
        q1 = q[:, 0].float()  # [H_q, D]
        offloaded = self._offloaded[layer]
        if len(offloaded) == 0:
            res_k, res_v, _ = self._resident(layer, start + 1)  # [H_kv, S, D]
            out = partial_attention(q1.view(h_kv, h_q // h_kv, d), res_k, res_v, self._scale).out.reshape(h_q, d)
        else:
            parts_k, parts_v = self._resident_parts(layer, start + 1)  # [H_kv, S_i, D] each, in position order
            result = self._attention.decode_step(q1, parts_k, parts_v, offloaded, self._scale, presearched)
            self.counters.add_step(result.stats, h_kv)
            out = result.output
            every = self.config.check_attention
            if every and self.counters.decode_steps % every == 0:
                t0 = time.perf_counter()
                self._compare_with_exact(layer, q1, self._resident(layer, start + 1)[2], result.retrieved)
                self.counters.check_s += time.perf_counter() - t0
        self._demote(layer)
        return out.to(q.dtype).unsqueeze(1)

    def _resident_parts(self, layer: int, end: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """:meth:`_resident`'s keys and values as views in position order (the sinks, then the ring's
        one or two spans), without concatenating them."""
        sink = min(self.config.retrieval.sink_tokens, end)
        lo = max(self.config.retrieval.sink_tokens, self._ring_start[layer])
        ks, vs = self.device_tier.sinks(layer, sink)
        if lo >= end:
            return [ks], [vs]
        kr, vr = self.device_tier.read_parts(layer, lo, end)
        return [ks, *kr], [vs, *vr]

    def _resident(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Device-tier keys, values ``[H_kv, S, D]`` and their positions ``[S]``: the sinks, then
        the ring from ``max(sink, ring_start)`` to ``end``."""
        sink = min(self.config.retrieval.sink_tokens, end)
        lo = max(self.config.retrieval.sink_tokens, self._ring_start[layer])
        pos = torch.cat([torch.arange(sink), torch.arange(lo, max(lo, end))])
        ks, vs = self._resident_parts(layer, end)
        if len(ks) == 1:
            return ks[0], vs[0], pos
        return torch.cat(ks, dim=1), torch.cat(vs, dim=1), pos

    # ------------------------------------------------------------------ tier moves
    def _demote(self, layer: int) -> None:
        """Move whole blocks older than the window from the ring to the host pool and the index."""
        b, r = self.layout.block_size, self.config.retrieval
        rs = self._ring_start[layer]
        target = max(0, self._layer_len[layer] - r.window) // b * b
        if target <= rs:
            return
        t0 = time.perf_counter()
        k, v = self.device_tier.read(layer, rs, target)  # [H_kv, n, D]
        k, v = k.cpu(), v.cpu()  # demoted blocks and their index live in host memory
        h, n, d = k.shape
        blocks = torch.stack([k, v]).reshape(2, h, n // b, b, d).permute(2, 0, 1, 3, 4)  # [n/B, 2, H, B, D]
        self.host.put(layer, rs // b, blocks)
        lo = max(rs, r.sink_tokens)
        if lo < target:
            self._offloaded[layer].append(k[:, lo - rs :], v[:, lo - rs :], torch.arange(lo, target))
        self._ring_start[layer] = target
        self.host.enforce(self.index_bytes())
        self.counters.demote_s += time.perf_counter() - t0

    def _rebuild(self, layer: int, length: int) -> None:
        """Cut ``layer`` to ``length < ring_start``: re-index the blocks kept, move the recent ones
        back into the ring, forget the rest (memory stays bounded by one key batch)."""
        b, r = self.layout.block_size, self.config.retrieval
        new_rs = max(0, length - r.window) // b * b
        recent = self.host.read_blocks(layer, new_rs // b, -(-length // b))  # [n, 2, H, B, D]
        self._build_s_dropped += self._offloaded[layer].build_time_s
        self._offloaded[layer] = self._new_offloaded(layer)
        self.host.truncate(layer, new_rs // b)
        per = self.config.prefill_key_block // b
        for b0 in range(0, new_rs // b, per):
            keys, values = _split_blocks(self.host.read_blocks(layer, b0, min(new_rs // b, b0 + per)))
            lo = max(b0 * b, r.sink_tokens)
            if lo < b0 * b + keys.shape[1]:
                cut = lo - b0 * b
                self._offloaded[layer].append(keys[:, cut:], values[:, cut:], torch.arange(lo, b0 * b + keys.shape[1]))
        self._ring_start[layer] = self._layer_len[layer] = new_rs
        if length > new_rs:
            keys, values = _split_blocks(recent)
            dev = self.device_tier.device
            self.device_tier.write(layer, keys[:, : length - new_rs].to(dev), values[:, : length - new_rs].to(dev), new_rs)
        self._layer_len[layer] = length

    def _compare_with_exact(self, layer: int, q1: torch.Tensor, res_pos: torch.Tensor,
                            retrieved: tuple[torch.Tensor, ...]) -> None:
        """Sample the attention-quality measures of this layer's step against exact attention."""
        end, rs = self._layer_len[layer], self._ring_start[layer]
        host_k, _ = _split_blocks(self.host.read_blocks(layer, 0, rs // self.layout.block_size))  # [H, rs, D]
        ring_k, _ = self.device_tier.read(layer, rs, end)
        keys = torch.cat([host_k, ring_k.cpu()], dim=1)  # [H_kv, end, D], row = position
        q1 = q1.cpu()
        g = q1.shape[0] // self.layout.num_kv_heads
        offloaded = range(self.config.retrieval.sink_tokens, rs)
        for h, found in enumerate(retrieved):  # found [n] shared by the group, or [G, k] per query head
            attended = torch.cat([res_pos.expand(*found.shape[:-1], -1), found], dim=-1)
            self.check.add(q1[h * g : (h + 1) * g], keys[h], attended, offloaded, found, self._scale)

    def _new_offloaded(self, layer: int) -> PagedLayerKV:
        return PagedLayerKV(self.host, layer, self.config.retrieval)


def _split_blocks(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n, 2, H, B, D]`` blocks -> keys, values ``[H, n*B, D]`` in position order."""
    n, _, h, b, d = blocks.shape
    kv = blocks.permute(1, 2, 0, 3, 4).reshape(2, h, n * b, d)
    return kv[0], kv[1]



def attend_batch(caches: Sequence[object], layer: int, qs: Sequence[torch.Tensor], ks: Sequence[torch.Tensor],
                 vs: Sequence[torch.Tensor], starts: Sequence[int]) -> list[torch.Tensor]:
    """``caches[b].attend(layer, qs[b], ks[b], vs[b], starts[b])`` for every sequence of a batched
    pass (any KV caches), except that retrieval caches decoding one token each search their indexes
    in one native call (:meth:`RetrievalAttention.search_many`: every sequence's kv heads of the
    layer over the thread pool together, one call instead of one per sequence). Each head is
    searched by the same operations as alone, so every output equals its cache's own ``attend``."""
    joint: dict[int, tuple[HeadsSearch, float]] = {}
    ready = [b for b, (c, q) in enumerate(zip(caches, qs))
             if isinstance(c, RetrievalKVCache) and q.dim() == 3 and q.shape[1] == 1 and 0 <= layer < c.layout.num_layers
             and len(c._offloaded[layer]) > 0]
    if len(ready) > 1:
        first: RetrievalKVCache = caches[ready[0]]  # type: ignore[assignment]
        same = all(caches[b].config.retrieval == first.config.retrieval and caches[b]._scale == first._scale  # type: ignore[attr-defined]
                   for b in ready)
        found = first._attention.search_many([qs[b][:, 0].float() for b in ready],
                                             [caches[b]._offloaded[layer] for b in ready],  # type: ignore[attr-defined]
                                             first._scale) if same else None
        if found is not None:
            joint = dict(zip(ready, found))
    return [c.attend(layer, q, k, v, s, joint[b]) if b in joint else c.attend(layer, q, k, v, s)  # type: ignore[attr-defined]
            for b, (c, q, k, v, s) in enumerate(zip(caches, qs, ks, vs, starts))]


def retrieval_cache(transformer: "Transformer", engine_config: "EngineConfig",  # noqa: F821
                    store: TieredStore | None = None, share: int = 1) -> RetrievalKVCache:
    """The long-context cache for ``transformer`` with the options of ``engine_config`` (the
    engine's factory for ``attention == "retrieval"``); its host blocks are an arena of ``store``
    (the weights' store) when given. ``share``: the cache gets 1/share of ``--kv-dram-budget`` and
    ``--kv-device-budget`` (each of ``kv_sequences`` batched sequences its part)."""
    c = transformer.config
    if c.sliding_window is not None:
        raise ConfigError(f"retrieval attention does not support sliding-window attention (this model attends to "
                          f"the last {c.sliding_window} positions only); use --attention full")
    config = RetrievalCacheConfig.from_engine(engine_config.kv_block_size, engine_config.prefill_chunk,
                                              engine_config.retrieval.as_mapping())
    if not engine_config.paging.huge_pages:
        config = config.with_huge_pages(False)
    if share > 1:
        config = dataclasses.replace(
            config, host_budget=None if config.host_budget is None else config.host_budget // share,
            device_budget=None if config.device_budget is None else config.device_budget // share)
    layout = KVBlockLayout(c.num_layers, c.num_kv_heads, c.head_dim, engine_config.kv_block_size, transformer.dtype)
    return RetrievalKVCache(layout, config, store=store, threads=transformer.linear.kernel_threads,
                            device=transformer.device)
