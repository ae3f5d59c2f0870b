"""What a retrieval-attention decode step costs: bytes from the index config, time from a probe.

The step of one layer (:meth:`~flashtier.retrieval.attention.RetrievalAttention.decode_step`)
reads, per kv head: the super-centroids, the centroids of the clusters in the opened
super-clusters (and their mean values for the estimate of the rest), the keys of the clusters
scanned, the retrieved K/V rows and the resident window. :func:`step_bytes` counts them from the
index configuration and the context, the way the search takes them.

How fast those bytes go through this machine's CPU (one native call per layer, a few torch calls
around it) is measured, not assumed: :func:`probe` times the real decode step on synthetic keys of
the model's head shape (up to 8 layers, at most 64 (layer, kv head) pairs) at two context lengths and fits
``seconds per layer = fixed + bytes / rate``; :class:`RetrievalCost` then predicts the step at any
context. ``flashtier plan --attention retrieval`` runs the probe once per (head shape, preset,
threads, CPU) and caches it (``~/.cache/flashtier/retrieval_probe.json``).
"""

from __future__ import annotations

import functools
import json
import math
import platform
import statistics
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from flashtier.checkpoint.config import ModelConfig
from flashtier.errors import ConfigError, StorageError
from flashtier.retrieval.attention import GroupSearch, RetrievalConfig
from flashtier.retrieval.index_cluster import STORE_DTYPES, ClusterIndexConfig
from flashtier.storage_backends.atomic import crc32, json_crc32, write_atomic
from flashtier.runtime.kv.layout import KVBlockLayout
from flashtier.runtime.kv.retrieval import RetrievalKVCache
from flashtier.runtime.kv.retrieval_config import RetrievalCacheConfig


@dataclass(frozen=True, slots=True)
class HeadShape:
    """The attention shape a retrieval step depends on."""

    num_kv_heads: int
    queries_per_kv: int
    """Query heads per kv head (GQA group size)."""
    head_dim: int
    kv_dtype_bytes: int = 2
    """Bytes per element of the K/V read back (bf16: 2)."""

    def __post_init__(self) -> None:
        if min(self.num_kv_heads, self.queries_per_kv, self.head_dim, self.kv_dtype_bytes) <= 0:
            raise ConfigError(f"head shape needs positive sizes, got {self}")


def step_bytes(config: RetrievalConfig, shape: HeadShape, context: int) -> int:
    """Bytes one layer's decode step reads at ``context`` tokens (offloaded = context - sinks - window)."""
    d, h, g = shape.head_dim, shape.num_kv_heads, shape.queries_per_kv
    resident = min(context, config.sink_tokens + config.window)
    offloaded = max(0, context - resident)
    kv_row = 2 * d * shape.kv_dtype_bytes  # one position's K and V
    per_head = resident * kv_row
    if offloaded:
        rows = g if config.group_search is not GroupSearch.MEAN else 1
        k = min(config.top_k, offloaded)
        per_head += rows * k * kv_row  # retrieved rows
        idx = config.index_config()
        if isinstance(idx, ClusterIndexConfig):
            es = STORE_DTYPES[idx.store_dtype].itemsize
            row = idx.summary_row_bytes(d)  # a centroid or mean-value row (int8: codes + scale)
            budget = min(offloaded, idx.scan_budget(offloaded, k))
            if idx.super_size:
                supers = math.ceil(offloaded / idx.super_size)
                opened = min(offloaded, math.ceil(idx.oversample * budget))
                clusters = math.ceil(opened / idx.cluster_size)
                per_head += supers * (row + 40) * (2 if config.estimate_rest else 1)
            else:
                clusters = math.ceil(offloaded / idx.cluster_size)
            per_head += clusters * (row + 20) * (2 if config.estimate_rest else 1)
            per_head += budget * (d * es + 8)  # keys scanned and their positions
        else:  # flat / ivf: the share scanned, exact keys
            scanned = offloaded if config.index == "flat" else math.ceil(config.scan_budget_fraction * offloaded)
            per_head += scanned * d * 4
    return h * per_head


@dataclass(frozen=True, slots=True)
class RetrievalCost:
    """Seconds per layer of a decode step = ``fixed_s + bytes / bytes_per_s`` (fitted by :func:`probe`)."""

    fixed_s: float
    bytes_per_s: float
    threads: int
    source: str = "probe"

    def layer_seconds(self, config: RetrievalConfig, shape: HeadShape, context: int) -> float:
        return self.fixed_s + step_bytes(config, shape, context) / self.bytes_per_s

    def step_seconds(self, config: RetrievalConfig, shape: HeadShape, context: int, num_layers: int) -> float:
        """Predicted attention time of one decode step (all layers)."""
        return num_layers * self.layer_seconds(config, shape, context)


PROBE_METHOD = 4
"""Bumped when the probe measures differently (2: decode threading; 3: caches flushed between
layers; 4: the flush sized by the model's layer), so a cached probe of an older method is measured
again rather than reused."""
PROBE_FLUSH_BYTES = 32 << 20
"""Most bytes written between two layers' steps (untimed): in a forward the weights of the layer's
matrices stream through the CPU caches between attention calls, so a step finds its window, its
queries and the index metadata in DRAM; back-to-back probe steps found them cached and predicted
too small a fixed cost (kv-long at 4K: 0.59x the measured step). A model whose layers are smaller
streams less between its attention calls: the probe writes one layer's weight bytes
(:func:`flush_bytes`), at most this many (past the last-level cache more changes nothing)."""


def flush_bytes(layer_weight_bytes: int | None) -> int:
    """Bytes the probe writes between layers for a model of ``layer_weight_bytes`` per layer (None:
    unknown, :data:`PROBE_FLUSH_BYTES`). Rounded up to 1 MiB so nearby sizes share a cached probe."""
    if layer_weight_bytes is None:
        return PROBE_FLUSH_BYTES
    return min(PROBE_FLUSH_BYTES, max(1 << 20, -(-int(layer_weight_bytes) // (1 << 20)) * (1 << 20)))


def layer_weight_bytes(sizes: Mapping[str, int], num_layers: int, active_experts: float = 1.0) -> int | None:
    """Mean bytes of one decoder layer's weights a decode step reads, from tensor sizes by
    (Hugging Face) name: every ``...layers.N...`` tensor, the routed experts' (``.experts.``) scaled
    by ``active_experts`` (top-k / experts); None when no name matches."""
    total, found = 0.0, False
    for name, n in sizes.items():
        if ".layers." in f".{name}":
            found = True
            total += n * (active_experts if ".experts." in name else 1.0)
    return int(total) // max(1, num_layers) if found else None


def model_flush_bytes(config: ModelConfig, sizes: Mapping[str, int]) -> int:
    """:func:`flush_bytes` for the model of ``config`` whose tensors have ``sizes`` by name: one
    layer's weights as a decode step reads them (routed experts at top-k / experts)."""
    active = config.num_experts_per_tok / config.num_experts if config.num_experts else 1.0
    return flush_bytes(layer_weight_bytes(sizes, config.num_layers, active))
PROBE_CONTEXTS = (4096, 12288)
"""Context lengths of the two probe runs (the bytes a step reads differ ~2.5x between them for the
default preset)."""
PROBE_RUN = 6
"""Timed steps of one context before the other takes its turn."""
PROBE_MAX_LAYERS = 8
"""Layers the probe builds (the model's, up to this many): a step that cycles through several
layers' indexes finds them in DRAM, as the real step does, not in the last-level cache."""
PROBE_MAX_PAIRS = 64
"""At most this many (layer, kv head) pairs are built (8 layers of 8 kv heads: the setting the
predictions were checked with; with 16 pairs the fits scattered more, 0.76-1.46x). With 128-dim
heads the probe holds ~1.5 GB at its 12K context; it bounds memory and time for models with many
kv heads."""


def probe_layers(num_layers: int, num_kv_heads: int) -> int:
    """Layers the probe builds for a model of ``num_layers`` x ``num_kv_heads``."""
    return max(1, min(num_layers, PROBE_MAX_LAYERS, PROBE_MAX_PAIRS // max(1, num_kv_heads)))


def synthetic_cache(config: RetrievalCacheConfig, shape: HeadShape, context: int, steps: int, gen: torch.Generator,
                    dtype: torch.dtype, layers: int, offset: torch.Tensor,
                    threads: int | None = None) -> RetrievalKVCache:
    """A retrieval cache of ``layers`` layers holding ``context`` positions of synthetic K/V (keys:
    a common ``offset [H, 1, D]`` plus noise, as trained models' keys have), room for ``steps``
    more; ``threads``: of its native search and attention (None: torch's count at each call)."""
    h, d = shape.num_kv_heads, shape.head_dim
    cache = RetrievalKVCache(KVBlockLayout(layers, h, d, config.block_size, dtype), config, threads=threads)
    cache.reserve(context + 2 * steps + 8)
    for start in range(0, context, 4096):
        n = min(4096, context - start)
        for layer in range(layers):
            keys = (offset + torch.randn(h, n, d, generator=gen)).to(dtype)  # [H, n, D]
            cache.write(layer, keys, torch.randn(h, n, d, generator=gen).to(dtype), start)
    return cache


@torch.inference_mode()
def _time_layers(config: RetrievalCacheConfig, shape: HeadShape, contexts: tuple[int, ...], steps: int, seed: int,
                 dtype: torch.dtype, layers: int, flush_bytes: int = PROBE_FLUSH_BYTES) -> list[float]:
    """Per context, the median seconds per layer of the decode-step attention through the
    runtime's own cache (:class:`RetrievalKVCache`: device ring, host pool, indexes) over ``layers``
    layers, threaded as a decode step (torch at one thread, the native search at torch's count).
    Each timed step attends every layer in turn, as a forward pass does; the contexts take turns in
    short runs of steps, so load swings on a shared machine hit them alike (the first step of a
    run, which finds the other context's data in the CPU caches, is not timed). ``flush_bytes`` are
    written between layers, untimed, as a forward streams a layer's weights."""
    gen = torch.Generator().manual_seed(seed)
    h, d, g = shape.num_kv_heads, shape.head_dim, shape.queries_per_kv
    offset = torch.randn(h, 1, d, generator=gen) * 2
    threads = torch.get_num_threads()
    caches = [synthetic_cache(config, shape, c, steps, gen, dtype, layers, offset, threads) for c in contexts]
    torch.set_num_threads(1)  # as generate's decode steps: torch at one thread, the native search at `threads`
    flush = torch.zeros(max(1, flush_bytes // 4), dtype=torch.int32)  # written between layers, not timed
    try:
        times: list[list[float]] = [[] for _ in contexts]
        done = [0 for _ in contexts]
        for _ in range(-(-steps // PROBE_RUN)):
            for j, (cache, context) in enumerate(zip(caches, contexts)):
                for i in range(PROBE_RUN + 1):  # the first step of a run warms the caches up: not timed
                    args = [(torch.randn(h * g, 1, d, generator=gen).to(dtype),  # q [H_q, 1, D]
                             (offset + torch.randn(h, 1, d, generator=gen)).to(dtype),  # k, v [H, 1, D]
                             torch.randn(h, 1, d, generator=gen).to(dtype)) for _ in range(layers)]
                    spent = 0.0
                    for layer, (q, k, v) in enumerate(args):
                        flush.add_(1)  # between layers a forward streams weights through the CPU caches
                        t0 = time.perf_counter()
                        cache.attend(layer, q, k, v, context + done[j])
                        spent += time.perf_counter() - t0
                    done[j] += 1
                    if i:
                        times[j].append(spent / layers)
        return [statistics.median(t) for t in times]
    finally:
        torch.set_num_threads(threads)
        for cache in caches:
            cache.close()


def probe(config: RetrievalCacheConfig, shape: HeadShape, num_layers: int = PROBE_MAX_LAYERS,
          contexts: tuple[int, int] = PROBE_CONTEXTS, steps: int = 24, seed: int = 0,
          dtype: torch.dtype = torch.bfloat16, flush: int = PROBE_FLUSH_BYTES) -> RetrievalCost:
    """Fit :class:`RetrievalCost` from the runtime's decode-step attention at two context lengths
    over :func:`probe_layers` layers (seconds to tens of seconds: the indexes of those layers are
    built at both lengths); ``flush``: bytes written between layers (:func:`flush_bytes`)."""
    small, large = contexts
    r = config.retrieval
    layers = probe_layers(num_layers, shape.num_kv_heads)
    t = _time_layers(config, shape, (small, large), steps, seed, dtype, layers, flush)
    b = [step_bytes(r, shape, c) for c in (small, large)]
    if b[1] <= b[0]:
        raise ConfigError(f"probe contexts {contexts} read the same bytes; give two that differ")
    if t[1] <= t[0]:  # noise larger than the difference: all of it as bytes, no fixed part
        rate, fixed = b[1] / t[1], 0.0
    else:
        rate = (b[1] - b[0]) / (t[1] - t[0])
        fixed = max(0.0, t[0] - b[0] / rate)
    return RetrievalCost(fixed, rate, torch.get_num_threads())


@functools.lru_cache(maxsize=1)
def native_fingerprint() -> str:
    """A crc32 of the native extension's file ("none" without one): a probe measured with other
    kernels (an upgrade or a rebuild: session 15's search is 0.7-0.8x of session 14's) is stale."""
    try:
        from flashtier import _native
        with open(_native.__file__, "rb") as f:
            return format(crc32(f.read()), "08x")
    except (ImportError, OSError, AttributeError):
        return "none"


def probe_key(cache_config: RetrievalCacheConfig, shape: HeadShape, num_layers: int,
              flush: int = PROBE_FLUSH_BYTES) -> str:
    """What a cached probe is valid for: the head shape, the retrieval settings, the bytes flushed
    between layers, the thread count, the CPU and the build of the native kernels."""
    config = cache_config.retrieval
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    settings = {"shape": asdict(shape), "top_k": config.top_k, "window": config.window, "sinks": config.sink_tokens,
                "index": config.index, "scan": config.scan_budget_fraction, "group": config.group_search.value,
                "estimate": config.estimate_rest, "options": dict(config.index_options),
                "threads": torch.get_num_threads(), "cpu": cpu,
                "block": cache_config.block_size, "kv_quant_bits": cache_config.kv_quant_bits,
                "layers": probe_layers(num_layers, shape.num_kv_heads), "method": PROBE_METHOD, "flush": flush,
                "native": native_fingerprint()}
    return json.dumps(settings, sort_keys=True)


def _read_cache(cache: Path) -> dict[str, dict]:
    """The entries of a probe cache file; empty when missing, unreadable or failing its crc32."""
    try:
        stored = json.loads(cache.read_text())
        if isinstance(stored, dict) and stored.get("crc32") == json_crc32(stored["entries"]):
            return dict(stored["entries"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return {}


def is_cached(config: RetrievalCacheConfig, shape: HeadShape, num_layers: int, cache: Path | None,
              flush: int = PROBE_FLUSH_BYTES) -> bool:
    """Whether ``cache`` holds a valid probe for these settings on this machine."""
    return cache is not None and probe_key(config, shape, num_layers, flush) in _read_cache(cache)


def cached_probe(config: RetrievalCacheConfig, shape: HeadShape, num_layers: int, cache: Path | None,
                 flush: int = PROBE_FLUSH_BYTES) -> RetrievalCost:
    """:func:`probe`, read from / written to the JSON file ``cache`` (None: no cache). The file
    carries a crc32 of its entries; a file that does not match (cut, edited, another format) is
    ignored and rewritten. ``flush``: see :func:`flush_bytes`."""
    key = probe_key(config, shape, num_layers, flush)
    entries = _read_cache(cache) if cache is not None else {}
    hit = entries.get(key)
    if hit is not None:
        try:
            return RetrievalCost(float(hit["fixed_s"]), float(hit["bytes_per_s"]), int(hit["threads"]),
                                 f"probe cached in {cache}")
        except (KeyError, TypeError, ValueError):
            pass  # a malformed entry under a good crc (written by another version): probe again
    cost = probe(config, shape, num_layers, flush=flush)
    if cache is not None:
        entries[key] = asdict(cost)
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(str(cache), [json.dumps({"crc32": json_crc32(entries), "entries": entries}, indent=1).encode()])
        except (OSError, StorageError):
            pass  # a cache we cannot write only costs the probe next time
    return cost
