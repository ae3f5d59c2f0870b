"""Configuration of the long-context KV cache (``EngineConfig.attention == "retrieval"``).

:class:`RetrievalCacheConfig` is built from the engine config: block size and prefill chunk come
from :class:`~flashtier.runtime.engine.EngineConfig`, everything else from ``EngineConfig.extra``
under the names of the CLI flags (``flashtier generate --attention retrieval --window 256 ...``):

=====================  =================================================  ===========
extra key              meaning                                            default
=====================  =================================================  ===========
``retrieval_preset``   ``fast`` / ``balanced`` / ``quality`` (PRESETS)     ``balanced``
``sink_tokens``        first positions always attended exactly            4
``window``             most recent positions always attended exactly      256
``top_k_keys``         offloaded keys retrieved per query head             100
``kv_index``           key index: ``cluster``, ``ivf`` or ``flat``         ``cluster``
``scan_budget``        share of offloaded keys an index may score          preset (0.045)
``scan_max_keys``      ... but at most this many keys per search (cluster) preset (1024)
``group_search``       ``rows`` / ``union`` / ``mean`` (GQA, one search)   ``rows``
``index_options``      dict of options of the chosen index                 preset
``estimate_rest``      estimate attention on unretrieved keys (cluster)    preset (on)
``check_attention``    sample exact attention every N decode steps (0=off) 0
``kv_dram_budget``     host bytes for demoted KV blocks + key indexes      unlimited
``kv_device_budget``   bytes the device tier (sinks + ring) may use        unchecked
``kv_spill_dir``       folder for KV spill files                           system temp
``kv_quant_bits``      host/storage KV as KIVI 2/4/8-bit codes             exact (off)
``kv_quant_group``     KIVI group (tokens for keys, channels for values)   32 or less
``prefill_key_block``  keys per partial-attention block in prefill         4096
=====================  =================================================  ===========

``kv_quant_group`` defaults to 32, or to the KV block size / head dim when one is smaller: key
groups run over a block's tokens and value groups over a token's channels, so it divides both.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from flashtier.errors import ConfigError
from flashtier.retrieval.attention import RetrievalConfig
from flashtier.retrieval.quant import SUPPORTED_BITS

DEFAULT_INDEX = "cluster"
"""Chosen by the index comparison on tiny-moe's real keys and queries (README, long context): at
the same recall@100 the cluster index scans about a third of the keys IVF does."""

PRESETS: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    # Speed first: coarse clusters under super-clusters of 256 keys, 1% scanned, no estimate.
    "fast": MappingProxyType({"scan_budget": 0.01, "group_search": "rows", "estimate_rest": False,
                              "index_options": {"cluster_size": 16, "super_size": 256, "store_dtype": "bfloat16",
                                                "summary_dtype": "auto"}}),
    # Default: clusters of 4 keys under super-clusters of 256 (the best super-clusters holding 12x
    # the scan budget are opened), 4.5% scanned but at most 1024 keys per search (4.5% up to ~23K
    # tokens of context), the unretrieved mass estimated from the searched clusters and the other
    # super-clusters. Two levels + the cap keep the step's work nearly flat in the context (one
    # level scores every centroid: its 128K step was 3.96x the 4K step). (Attending every scanned key, index option attend_scanned, measured +1.6 points of
    # top-1 agreement at 16K for a 48% slower step at 128K: off.)
    "balanced": MappingProxyType({"scan_budget": 0.045, "group_search": "rows", "estimate_rest": True,
                                  "index_options": {"cluster_size": 4, "super_size": 256, "oversample": 12,
                                                    "scan_max_keys": 1024, "bound_weight": 0.3,
                                                    "store_dtype": "bfloat16", "summary_dtype": "auto"}}),
    # Closest to full attention: clusters of 2 keys, one level (every centroid scored per search:
    # the centroid pass reads half the keys' size, so the step grows with the context).
    "quality": MappingProxyType({"scan_budget": 0.045, "group_search": "rows", "estimate_rest": True,
                                 "index_options": {"cluster_size": 2, "bound_weight": 0.3, "kmeans_iters": 8,
                                                   "store_dtype": "bfloat16", "summary_dtype": "auto"}}),
})
"""Named starting points for the retrieval options (``retrieval_preset``); explicit options
override them. Every preset keeps its centroids and mean values as int8 rows where that halves
their bytes (``summary_dtype="auto"``: head dims of 64 and more; session 18: the same top-1
agreement and mass recall on tiny-moe-16k with int8 forced, the 128K search 20% faster on kv-long). Measured trade-offs: README, long context."""
DEFAULT_PRESET = "balanced"

EXTRA_KEYS = frozenset({
    "retrieval_preset", "sink_tokens", "window", "top_k_keys", "kv_index", "scan_budget", "scan_max_keys", "group_search",
    "index_options", "estimate_rest", "check_attention", "kv_dram_budget", "kv_device_budget", "kv_spill_dir",
    "prefill_key_block", "kv_quant_bits", "kv_quant_group",
})
"""Keys of ``EngineConfig.extra`` this cache reads (other subsystems own the rest)."""


def retrieval_config(extra: Mapping[str, Any]) -> RetrievalConfig:
    """The :class:`RetrievalConfig` of ``extra``: its ``retrieval_preset`` (default ``balanced``)
    overridden by the explicit options. Index options of a preset apply to the cluster index only."""
    name = extra.get("retrieval_preset") or DEFAULT_PRESET
    if name not in PRESETS:
        raise ConfigError(f"unknown retrieval preset {name!r}; choose one of {sorted(PRESETS)}")
    options = {**PRESETS[name], **{k: v for k, v in extra.items() if v is not None}}
    index = str(options.get("kv_index", DEFAULT_INDEX))
    index_options = dict(extra.get("index_options") or (PRESETS[name]["index_options"] if index == "cluster" else {}))
    if extra.get("scan_max_keys") is not None:
        if index != "cluster":
            raise ConfigError(f"scan_max_keys (--scan-max-keys) bounds the cluster index's search; the {index!r} "
                              "index has no such bound (use --scan-budget, or --kv-index cluster)")
        index_options["scan_max_keys"] = _optional_int(extra["scan_max_keys"], "scan_max_keys (--scan-max-keys)",
                                                       "a whole number of keys")
    estimate = _flag(options.get("estimate_rest", False)) and (index == "cluster" or "estimate_rest" in extra)
    defaults = RetrievalConfig()
    try:
        return RetrievalConfig(
            sink_tokens=int(options.get("sink_tokens", defaults.sink_tokens)),
            window=int(options.get("window", defaults.window)),
            top_k=int(options.get("top_k_keys", defaults.top_k)),
            index=index,
            scan_budget_fraction=float(options.get("scan_budget", defaults.scan_budget_fraction)),
            group_search=options.get("group_search", defaults.group_search),
            index_options=index_options,
            estimate_rest=estimate,
        )
    except (TypeError, ValueError) as e:
        raise ConfigError(f"retrieval attention options: {e}") from e


@dataclass(frozen=True)
class RetrievalCacheConfig:
    """Long-context KV cache settings (validated; see the module docstring for the extra keys)."""

    retrieval: RetrievalConfig = field(default_factory=lambda: retrieval_config({}))
    """Sinks, window, top-k, index and scan budget of retrieval attention at decode (default: the
    ``balanced`` preset)."""
    block_size: int = 64
    """Tokens per KV block: the unit demoted from the device window to host and storage."""
    prefill_chunk: int = 512
    """Most queries attended in one exact pass; longer passes are split (bounds peak memory)."""
    prefill_key_block: int = 4096
    """Keys per partial-attention block in exact passes (scores ``[H_q * chunk, block]`` at most)."""
    host_budget: int | None = None
    """Bytes of host memory for demoted KV blocks plus the key indexes; None = unlimited."""
    device_budget: int | None = None
    """Bytes the device tier (sinks + recent ring) may use; None = not checked."""
    spill_dir: str | None = None
    """Folder under which KV spill files are written (None = the system temp folder)."""
    check_attention: int = 0
    """Every N-th decode step, compare the attended keys with exact attention (0 = never)."""
    kv_quant_bits: int | None = None
    """Store demoted KV (host tier and spill files) KIVI-quantised with 2, 4 or 8 bits (None =
    exact). Everything read back from the host tier is then dequantised, prefill included."""
    huge_pages: bool = True
    """The host KV pool of a cache that owns its store on transparent huge pages (a cache given the
    model's store follows that store's setting; the indexes follow ``retrieval.index_options``)."""
    kv_quant_group: int | None = None
    """KIVI group size: tokens per key group (divides ``block_size``), channels per value group
    (divides the head dim). None = 32, or the block size / head dim when smaller
    (:func:`~flashtier.runtime.kv.codec.default_group`)."""

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"KV block_size must be a positive power of two, got {self.block_size}")
        if self.prefill_chunk <= 0:
            raise ConfigError(f"prefill_chunk must be positive, got {self.prefill_chunk}")
        if self.prefill_key_block < self.block_size or self.prefill_key_block % self.block_size:
            raise ConfigError(f"prefill_key_block must be a positive multiple of the KV block size "
                              f"{self.block_size}, got {self.prefill_key_block}")
        for name in ("host_budget", "device_budget"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be a positive number of bytes, got {value}")
        if self.kv_quant_bits is not None and self.kv_quant_bits not in SUPPORTED_BITS:
            raise ConfigError(f"kv_quant_bits (--kv-quant-bits) must be one of {', '.join(map(str, SUPPORTED_BITS))}, "
                              f"or unset for exact KV; got {self.kv_quant_bits}")
        group = self.kv_quant_group
        if group is not None and (group <= 0 or self.block_size % group):
            raise ConfigError(f"kv_quant_group (--kv-quant-group) {group} must divide the KV block size "
                              f"{self.block_size} (key groups run over a block's tokens); use a power of two "
                              f"<= {self.block_size}, e.g. {min(32, self.block_size)}, or leave it unset")
        if self.check_attention < 0:
            raise ConfigError(f"check_attention must be >= 0 (0 = off, N = every N-th decode step), got {self.check_attention}")

    @property
    def ring_tokens(self) -> int:
        """Device ring size: window + the block being filled + one prefill chunk, in whole blocks."""
        need = self.retrieval.window + self.block_size + self.prefill_chunk
        return -(-need // self.block_size) * self.block_size

    def with_huge_pages(self, on: bool) -> RetrievalCacheConfig:
        """This config with its own host pool and its indexes' tables on (or off) transparent huge pages."""
        retrieval = dataclasses.replace(self.retrieval, index_options={**self.retrieval.index_options, "huge_pages": on})
        return dataclasses.replace(self, huge_pages=on, retrieval=retrieval)

    @classmethod
    def from_engine(cls, block_size: int, prefill_chunk: int, extra: Mapping[str, Any]) -> RetrievalCacheConfig:
        """The config for an engine with ``block_size`` / ``prefill_chunk`` and ``extra`` options."""
        from flashtier.runtime.units import parse_bytes

        get = extra.get
        retrieval = retrieval_config(extra)
        return cls(
            retrieval=retrieval,
            block_size=block_size,
            prefill_chunk=prefill_chunk,
            prefill_key_block=int(get("prefill_key_block", 4096)),
            host_budget=parse_bytes(get("kv_dram_budget")),
            device_budget=parse_bytes(get("kv_device_budget")),
            spill_dir=get("kv_spill_dir"),
            check_attention=int(get("check_attention", 0) or 0),
            kv_quant_bits=_optional_int(get("kv_quant_bits"), "kv_quant_bits"),
            kv_quant_group=_optional_int(get("kv_quant_group"), "kv_quant_group"),
        )


def _optional_int(value: Any, name: str, what: str = "a whole number") -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be {what}, got {value!r}") from None


def _flag(value: Any) -> bool:
    """A boolean option given as a bool or as text (``true`` / ``false`` / ``1`` / ``0``)."""
    if isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"expected true or false, got {value!r}")
        return value.lower() in ("true", "1", "yes")
    return bool(value)
