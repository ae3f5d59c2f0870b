"""Typed option sections of :class:`~flashtier.runtime.engine.EngineConfig`, and the one table
that maps the flat option names (CLI flags, ``open_model(**options)``) onto them.

Each section is a frozen dataclass whose field docstrings are the documentation: the CLI builds
its help from them (:func:`field_docs`), so there is one source of truth. Flat names are the
field names with the section's prefix (``expert_slots`` -> ``experts.slots``,
``sparse_ffn_window_k`` -> ``sparse_ffn.window_k``; paging and retrieval fields have no prefix).
An unknown flat name is a :class:`ConfigError` naming the valid ones.
"""

from __future__ import annotations

import ast
import difflib
import functools
import inspect
import textwrap
from dataclasses import MISSING, dataclass, fields
from typing import Any, Mapping

from flashtier.errors import ConfigError

VERIFY_MODES = ("first-read", "always", "off")
DIRECT_IO_MODES = ("auto", "require", "off")
COMPRESSED_MODES = ("auto", "on", "off")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` of a dataclass whose fields carry a string literal right after them
    (the style of this code base), read from its source; whitespace collapsed to one line."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def as_bool(value: Any, name: str) -> bool:
    """``value`` as a bool (on/off, true/false, yes/no, 1/0); ConfigError naming option ``name``."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"option {name}: expected on/off (true/false), got {value!r}")


def _coerce(value: Any, annotation: str, name: str) -> Any:
    """``value`` as the field type ``annotation`` (a string: annotations are postponed)."""
    if value is None:
        if "None" in annotation:
            return None
        raise ConfigError(f"option {name} needs a value")
    base = annotation.replace(" | None", "").strip()
    try:
        if base == "bool":
            return as_bool(value, name)
        if base == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base == "str":
            if not isinstance(value, str):
                raise ValueError
            return value
    except (TypeError, ValueError):
        kind = {"int": "a whole number", "float": "a number", "str": "a string"}.get(base, base)
        raise ConfigError(f"option {name}: expected {kind}, got {value!r}") from None
    return value  # composite types (dicts, sizes) are checked where they are used


@dataclass(frozen=True, slots=True)
class PagingConfig:
    """How weights are read from storage when a budget makes them stream."""

    direct_io: str = "auto"
    """O_DIRECT reads of streamed weights: 'auto' (where the filesystem takes them), 'require', 'off'."""
    compressed: str = "auto"
    """With a budget, stream weights from the lossless compressed copy written by `flashtier
    compress` (~0.67x the bytes from storage, same outputs): 'auto' (default: when it exists), 'on', 'off'."""
    huge_pages: bool = True
    """Keep weights, expert caches, the host KV pool and the retrieval indexes on transparent huge
    pages where the kernel grants them (fewer TLB misses; measured here with the 8-row bf16 tile:
    its stream +12-21%, dense-1.7g decode +10%; the one-row tile since gains less; README). Off: 4 KiB
    pages only."""

    def __post_init__(self) -> None:
        if self.direct_io not in DIRECT_IO_MODES:
            raise ConfigError(f"direct_io {self.direct_io!r} is unknown; choose one of {', '.join(DIRECT_IO_MODES)}")
        if self.compressed not in COMPRESSED_MODES:
            raise ConfigError(f"--compressed {self.compressed!r} is unknown; choose one of {', '.join(COMPRESSED_MODES)}")


@dataclass(frozen=True, slots=True)
class ExpertCacheConfig:
    """How MoE experts are cached and prefetched (flat names ``expert_<field>``)."""

    policy: str = "least-stale"
    """Eviction policy of the per-layer expert caches: least-stale, lru, lfu, lrfu, cost or mru."""
    predictor: str = "auto"
    """Next-layer expert prediction: 'auto' (router or inter-layer affinity, the better per layer),
    'router', 'affinity' or 'off'."""
    widen: int = 0
    """Prefetch top-(k + widen) experts, where the layer's cache has room."""
    slots: int | None = None
    """Experts cached per MoE layer (None: as many as the budget leaves, at least one)."""
    device_slots: int = 0
    """Experts per MoE layer cached on the device. With --device-budget, 0 means as many as the
    device budget leaves after the plan (attention, routers, shared experts, KV, the window); without
    one, 0 keeps experts in the host tier."""
    placement: str = "auto"
    """With --device-budget, where an expert that is not on the device runs: 'auto' (per miss,
    copied to the device or computed on the CPU where its host copy is, whichever the measured link
    and CPU speeds say is faster for the pass's rows), 'gpu' (always copied), 'cpu' (always on the
    CPU: no expert is cached on the device)."""
    state: str = "post-attention"
    """Hidden state the router predictor reads: 'post-attention' or 'layer-input' (see prefetch/experts.py)."""
    verify: str = "first-read"
    """crc32 of converted expert extents: on each extent's 'first-read', on 'always', or 'off'."""
    gate: bool = True
    """Issue a predicted expert only when the measured cost model says it pays (``PrefetchGate``);
    False: issue every prediction the cache has room for."""
    pin: bool = True
    """When every layer's cache has a slot for each of its experts: read them all when the model
    opens and keep them (no prediction, routing bookkeeping or eviction per token: the decode costs
    what a resident model costs). False: run the caching machinery anyway."""

    def __post_init__(self) -> None:
        from flashtier.prefetch.experts import PredictorConfig
        from flashtier.tiers.policies import available_policies

        if self.policy not in available_policies():
            raise ConfigError(f"expert cache policy {self.policy!r} is unknown; choose one of "
                              f"{', '.join(available_policies())}")
        PredictorConfig(self.predictor, self.widen, state=self.state)  # validates them
        if self.slots is not None and self.slots < 1:
            raise ConfigError(f"expert cache slots must be >= 1 per layer, got {self.slots}")
        if self.device_slots < 0:
            raise ConfigError(f"expert device slots must be >= 0, got {self.device_slots}")
        from flashtier.prefetch.placement import PLACEMENTS

        if self.placement not in PLACEMENTS:
            raise ConfigError(f"expert placement {self.placement!r} is unknown; choose one of {', '.join(PLACEMENTS)}")
        if self.verify not in VERIFY_MODES:
            raise ConfigError(f"expert verify mode {self.verify!r} is unknown; choose one of {', '.join(VERIFY_MODES)}")


@dataclass(frozen=True, slots=True)
class SparseFFNConfig:
    """Options of the sparse FFN path (flat names ``sparse_ffn_<field>``; ``sparse_ffn=True`` turns it on)."""

    window_k: int = 4
    """Tokens a used neuron stays in DRAM (the window length, default 4; 0: no reuse across tokens)."""
    threshold_offset: float = 0.0
    """Logits added to every layer's calibrated predictor threshold (default 0): negative reads
    more neurons and misses fewer, positive reads fewer."""
    queue_depth: int = 8
    """Bundle reads in flight at once (IO threads), measured on the work disk."""
    prefill_chunk_neurons: int = 64
    """Neurons per read when a prompt computes a sparse layer exactly; also the rows of the buffer
    a decode step reads the neurons its windows have no room for into (a chunk at a time)."""
    max_capacity_fraction: float = 1.0
    """Cap on window rows per layer, as a share of its neurons (the budget may cap it lower)."""
    speculate: bool = False
    """At the start of a sparse layer, apply its predictor to the residual stream normed as the
    FFN will norm it (attention's contribution not yet known) and start reading the guessed
    neurons while attention computes; the real selection then only tops up. Off by default:
    on tiny-dense the guess covers ~70% of the selection, costs ~16% more bytes and, with 2 busy
    cores, the background reads slow attention more than they hide (bench_sparse_ffn.py)."""
    audit: bool = False
    """Also compute every neuron's true activation (reads the gate matrices of the sparse layers
    once, outside the budget) to report predictor_recall. For measurement only."""
    verify: bool = True
    """crc32 every bundle file when opening (one sequential read of the bundles)."""
    native: bool = True
    """Decode rows with the native kernel where the extension is built (bf16 / fp32 bundles): each
    neuron's contribution straight from the window's rows. False: gather each row's neurons and
    multiply with torch (the path without the extension; tests and ablations)."""

    def __post_init__(self) -> None:
        if self.window_k < 0:
            raise ConfigError(f"sparse FFN window must be >= 0 tokens, got {self.window_k}")
        if not 1 <= self.queue_depth <= 256:
            raise ConfigError(f"sparse FFN queue depth must be in 1..256, got {self.queue_depth}")
        if self.prefill_chunk_neurons < 1:
            raise ConfigError(f"prefill_chunk_neurons must be >= 1, got {self.prefill_chunk_neurons}")
        if not 0.0 < self.max_capacity_fraction <= 1.0:
            raise ConfigError(f"max_capacity_fraction must be in (0, 1], got {self.max_capacity_fraction}")


@dataclass(frozen=True, slots=True)
class RetrievalOptions:
    """Options of the long-context KV cache (``attention='retrieval'``); None keeps the preset's or
    the default value. Validated and combined with the preset by ``runtime/kv/retrieval_config.py``."""

    retrieval_preset: str | None = None
    """Starting point for the other retrieval options (default balanced): fast = clusters of 16
    keys under super-clusters, 1% of keys scanned, no estimate; balanced = clusters of 4 keys
    under super-clusters, 4.5% scanned up to 1024 keys, unretrieved attention estimated; quality =
    clusters of 2 keys, every centroid scored (closest to full attention; the step cost grows with
    the context)."""
    sink_tokens: int | None = None
    """First positions always attended exactly (default 4)."""
    window: int | None = None
    """Most recent positions always attended exactly (default 256)."""
    top_k_keys: int | None = None
    """Offloaded keys retrieved per query head at each decode step (default 100)."""
    kv_index: str | None = None
    """Key index: cluster (attention-aware, default), ivf (faiss) or flat (exact, scans all keys)."""
    scan_budget: float | None = None
    """Share of the offloaded keys an index may score per search (default: the preset's, 0.045)."""
    scan_max_keys: int | None = None
    """But at most this many keys per search, so a decode step's work stops growing with the
    context (cluster index; default: the preset's, 1024 for balanced)."""
    group_search: str | None = None
    """GQA: 'rows' (each query head searches), 'union' or 'mean' (one search per KV head)."""
    index_options: dict[str, Any] | None = None
    """Options of the chosen index (preset: its cluster settings)."""
    estimate_rest: bool | None = None
    """Estimate the attention on offloaded keys not retrieved, from the index's clusters (centroid
    + mean value; cluster index only; default: the preset's)."""
    check_attention: int | None = None
    """Every N-th decode step (1 when the flag has no value), compare the attended keys with exact
    attention and report attention_mass_recall / attention_mass_covered (costs a full attention
    pass; default 0: off)."""
    kv_dram_budget: str | int | None = None
    """Host memory for KV blocks that left the window plus their key indexes, e.g. 8G; blocks over
    it spill to storage (default: unlimited; dram_budget is for weights)."""
    kv_device_budget: str | int | None = None
    """Bytes the device tier (sinks + ring) may use (None: unchecked)."""
    kv_spill_dir: str | None = None
    """Folder for KV spill files (None: the system temp folder)."""
    kv_quant_bits: int | None = None
    """Keep KV that left the window (host tier, spill files) KIVI-quantised to 2, 4 or 8 bits: keys
    per channel, values per token (2.7x fewer bytes at 4 bits, 4x at 2; default: exact)."""
    kv_quant_group: int | None = None
    """KIVI group: tokens per key group, channels per value group; divides the KV block size and
    the head dim (default 32, or the smaller of those)."""
    prefill_key_block: int | None = None
    """Keys per partial-attention block in prefill (default 4096)."""

    def as_mapping(self) -> dict[str, Any]:
        """The options that were set, by flat name (what ``kv_retrieval_config`` reads)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


SECTIONS: Mapping[str, tuple[type, str]] = {
    "paging": (PagingConfig, ""),
    "experts": (ExpertCacheConfig, "expert_"),
    "sparse_ffn": (SparseFFNConfig, "sparse_ffn_"),
    "retrieval": (RetrievalOptions, ""),
}
"""EngineConfig section -> (its dataclass, the prefix of its flat option names)."""


@functools.cache
def flat_names() -> dict[str, tuple[str, str, str]]:
    """Flat option name -> (section, field, annotation) for every section field."""
    out: dict[str, tuple[str, str, str]] = {}
    for section, (cls, prefix) in SECTIONS.items():
        for f in fields(cls):
            name = prefix + f.name
            if name in out:
                raise AssertionError(f"flat option {name} is defined twice")
            out[name] = (section, f.name, str(f.type))
    return out


def section_kwargs(flat: Mapping[str, Any], top_level: frozenset[str]) -> dict[str, Any]:
    """EngineConfig keyword arguments from flat options: top-level fields pass through, section
    fields are gathered into their section objects (``sparse_ffn=True`` or any ``sparse_ffn_*``
    option turns the sparse FFN on; ``sparse_ffn=False`` leaves it off). None means "not set".
    Unknown names are one ConfigError naming the closest valid ones."""
    names = flat_names()
    out: dict[str, Any] = {}
    parts: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    sparse_on: bool | None = None
    for key, value in flat.items():
        if key in top_level:
            if value is not None:
                out[key] = value
        elif key == "sparse_ffn":
            sparse_on = None if value is None else as_bool(value, "sparse_ffn")
        elif key in names:
            section, name, annotation = names[key]
            if value is not None:
                parts[section][name] = _coerce(value, annotation, key)
        else:
            valid = sorted(top_level | set(names) | {"sparse_ffn"})
            close = difflib.get_close_matches(key, valid, n=3)
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            raise ConfigError(f"unknown option {key!r}; {hint}valid options: {', '.join(valid)}")
    for section, (cls, _) in SECTIONS.items():
        if section == "sparse_ffn":
            if sparse_on or (sparse_on is None and parts[section]):
                out[section] = cls(**parts[section])
            elif parts[section]:
                raise ConfigError(f"{', '.join('sparse_ffn_' + k for k in parts[section])} need sparse_ffn on")
        elif parts[section]:
            out[section] = cls(**parts[section])
    return out


def defaults_of(cls: type) -> dict[str, Any]:
    """``{field: default}`` of a dataclass (fields without a default are left out)."""
    return {f.name: f.default for f in fields(cls) if f.default is not MISSING}
