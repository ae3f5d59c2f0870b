"""MoE experts paged through per-layer expert caches, prefetched by next-layer prediction.

:class:`ExpertWeights` is the weight accessor the engine picks for MoE models under a budget. It
is a :class:`~flashtier.runtime.weights.paged.PagedWeights` for everything but the routed experts
(attention, norms, routers, the output head and shared experts are resident or streamed as there)
plus, per MoE layer, an **expert cache**: its own :class:`~flashtier.tiers.store.TieredStore`
whose host tier holds ``slots`` experts, evicting by a pluggable policy (``least-stale`` by
default, chosen by measurement; ``lru``, ``lfu``, ... by name). One page is one expert extent
(:mod:`~flashtier.checkpoint.expert_layout`): a converted folder reads each expert in one
aligned read, checksummed on its first read; an original folder reads each expert's tensors where
they lie (one read when they are neighbours, else three).

Reading, each pass: when MoE layer i routes (``route``), the reads of its experts that are not
resident all start at once, in the order the forward will use them (computing one expert overlaps
reading the next). Earlier, when layer i-1 begins, the predictor (:mod:`~flashtier.prefetch.experts`)
guesses layer i's experts -- layer i's router applied to layer i-1's input, or the experts that
followed layer i-1's choice before (inter-layer affinity), whichever has predicted that layer
better -- and the guesses the cost gate (``PrefetchGate``) finds worth it start reading at once,
behind the reads the current layer waits for. A wrong guess costs a whole read when the disk is
the bottleneck, so the gate issues rank r only when its running precision pays for it. Once a
layer has routed, its guessed-but-unused experts are withdrawn (``cancel_prefetch``) and the
predictor and the gate learn from the outcome. Tokens are exact whatever the cache size: a missing
expert is read on demand, and a cache of one expert per layer works (slowly).

Budget contract: resident non-expert bytes + KV + the non-expert streaming window + the expert
caches (``plan.expert_cache_bytes``, at least one expert per MoE layer) <= ``dram_budget``.

Statistics (decode steps only; ``stats()`` is merged into ``generate --json``):
  * ``expert_hit_rate``: used experts that were already resident when the layer asked for them;
  * ``expert_prefetch_precision``: predicted experts the gate issued that the layer then used;
  * ``expert_prefetch_recall``: used experts that were named and resident in time;
  * ``expert_prediction_precision`` / ``_recall``: the next-layer predictor's guesses against what
    each layer used, whether or not the gate issued them (the predictor's quality); the first MoE
    layer, guessed from its own input, apart (``expert_first_layer_prediction_recall``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from flashtier.errors import BudgetError, ConfigError
from flashtier.prefetch.experts import (
    ExpertPredictor,
    MoeLayerSpec,
    PredictorConfig,
    PrefetchGate,
)
from flashtier.checkpoint.folder import Checkpoint, layer_names
from flashtier.prefetch.placement import PlacementCosts, measure_cpu, measure_link
from flashtier.runtime.options import ExpertCacheConfig
from flashtier.runtime.weights.paged import PagedWeights, budget_options
from flashtier.runtime.quantized import as_weight, page_format
from flashtier.storage_backends.safetensors_format import TensorInfo
from flashtier.runtime.planner import Bandwidths
from flashtier.storage_backends.aligned import align_up
from flashtier.storage_backends.base import StorageBackend
from flashtier.storage_backends.checksummed import ChecksummedBackend
from flashtier.checkpoint.expert_layout import ExpertLayout, expert_layout
from flashtier.tiers.config import ArenaConfig
from flashtier.tiers.host import HOST_ALIGNMENT
from flashtier.tiers.page import PageDesc, PageSource
from flashtier.tiers.store import TieredStore

@dataclass(frozen=True, slots=True)
class _Part:
    """Where one expert tensor lies in its cached pages."""

    layer: int
    expert: int
    page: int
    """Index into the expert's pages."""
    offset: int
    nbytes: int
    info: TensorInfo
    """The tensor (its dtype, shape and quantized format)."""


@dataclass
class _LayerCache:
    """One MoE layer's expert cache: ``slots`` experts and each expert's page ids.

    One arena of the weights' store per extent index (an expert's gate, up and down extents when
    they are separate, as in unconverted folders and GGUF files), each budgeted ``slots`` times that
    extent's largest block in the layer: within one arena every page has the same size, so a freed
    block always fits the next page (a single pool fragments when the extents differ in size, e.g.
    Q4_K gate and up with a Q6_K down in a Q4_K_M file, and then cannot take an expert its budget
    holds)."""

    arenas: list[str]
    slots: int
    pages: dict[int, list[tuple[int, int, int]]]
    """expert -> page ids ``(layer, expert, extent index)``."""
    page_bytes: dict[int, int]
    """expert -> bytes read to bring it in."""



@dataclass
class _LayerStep:
    """What one MoE layer did in the current forward pass (dropped when the pass ends)."""

    guesses: dict[str, list[int]] = field(default_factory=dict)
    """Each predictor's guess for this layer ('router', 'affinity')."""
    cached_at_guess: list[int] | None = None
    """Experts the cache held when the first guess was issued (the gate's reuse estimate)."""
    named: list[int] = field(default_factory=list)
    """Guessed experts the gate issued (read, or protected when already cached)."""
    reading: set[int] = field(default_factory=set)
    """Named experts whose read the guess started."""
    ready_at_route: set[int] | None = None
    """Routed experts resident when the layer routed (the hits)."""
    pending: list[int] = field(default_factory=list)
    """Routed experts not resident whose read has not started yet (no room), in order of use."""
    started: set[int] = field(default_factory=set)
    """Routed experts whose read ``route`` started (protected until acquired)."""
    used: list[int] = field(default_factory=list)
    """Experts acquired, in order."""


@dataclass
class _Counters:
    """Decode-step counters behind the expert statistics."""

    uses: int = 0
    hits: int = 0
    named: int = 0
    named_used: int = 0
    guessed: list[int] = field(default_factory=lambda: [0, 0])
    """Experts guessed: [next-layer guesses, first-MoE-layer guesses (from its own input)]."""
    guessed_used: list[int] = field(default_factory=lambda: [0, 0])
    guessed_layer_uses: list[int] = field(default_factory=lambda: [0, 0])
    in_time: int = 0
    prefetch_reads: int = 0
    prefetch_bytes: int = 0
    wasted_reads: int = 0
    wasted_bytes: int = 0
    demand_reads: int = 0
    per_layer_hits: dict[int, list[int]] = field(default_factory=dict)
    placed: dict[str, int] = field(default_factory=lambda: {"device_hit": 0, "copied": 0, "cpu": 0})
    """With a device budget: experts used, by where they ran (every pass)."""


class ExpertWeights(PagedWeights):
    """A weight accessor with per-layer expert caches and next-layer prediction (module doc)."""

    def __init__(self, checkpoint: Checkpoint, dram_budget: int, compute_dtype: torch.dtype | None = None,
                 kv_tokens: int = 4096, bandwidths: Bandwidths | None = None, device_budget: int = 0,
                 direct_io: str = "auto", experts: ExpertCacheConfig | None = None, compressed: str = "auto",
                 progress: Callable[[int, int], None] | None = None, verified_record: str | None = None,
                 kv_block_size: int | None = None, kv_sequences: int = 1, device: str = "cpu",
                 placement_costs: PlacementCosts | None = None, attention: str = "full",
                 resident_kv_tokens: int = 4 + 512, huge_pages: bool = True) -> None:
        """``device_budget`` > 0: the model computes on ``device`` (see ``PagedWeights``); each
        layer's experts are cached in host memory and, ``experts.device_slots`` of them, on the
        device; a miss on the device runs per ``experts.placement``, with ``placement_costs``
        (None: measured now) deciding 'auto'."""
        cfg = checkpoint.config
        bandwidths = bandwidths or Bandwidths()
        experts = experts or ExpertCacheConfig()
        if not cfg.is_moe:
            raise ConfigError(f"{checkpoint.model_dir} is a dense model: expert caches need a MoE model")
        self.expert_config = experts
        self._pinned: dict[str, torch.Tensor] = {}  # every expert weight, when all are pinned
        self._pinned_pages: list[object] = []
        self.layout: ExpertLayout = expert_layout(checkpoint)  # IntegrityError for a bad converted folder
        moe_layers = sorted({layer for layer, _ in self.layout.experts})
        self.slot_bytes = _slot_bytes(self.layout)
        min_slots = experts.slots or 1
        names = frozenset(x.info.name for extents in self.layout.experts.values() for ext in extents for x in ext.parts)
        super().__init__(checkpoint, dram_budget, compute_dtype, kv_tokens, bandwidths, device_budget, direct_io,
                         progress=progress, compressed=compressed, external=names, verified_record=verified_record,
                         kv_block_size=kv_block_size, kv_sequences=kv_sequences,
                         expert_cache_min_bytes=len(moe_layers) * min_slots * self.slot_bytes, device=device,
                         attention=attention, resident_kv_tokens=resident_kv_tokens, huge_pages=huge_pages)
        layer_slot = {layer: sum(_extent_blocks(self.layout, layer)) for layer in moe_layers}
        self._on_device = device_budget > 0
        self._device_slots = self._plan_device_slots(device_budget, layer_slot, moe_layers)
        self.placement_costs: PlacementCosts | None = None
        if self._device_slots and experts.placement == "auto":
            self.placement_costs = placement_costs or self._measure_costs()
        slots = _slots_per_layer(self.plan.expert_cache_bytes, layer_slot, moe_layers, cfg.num_experts, experts.slots)
        self.expert_cache_bytes = sum(slots[layer] * layer_slot[layer] for layer in moe_layers)
        if self.expert_cache_bytes > max(self.plan.expert_cache_bytes, len(moe_layers) * self.slot_bytes):
            raise BudgetError(f"{experts.slots} experts per layer need {self.expert_cache_bytes} bytes of expert cache, "
                              f"the budget leaves {self.plan.expert_cache_bytes}; ask for fewer slots or raise --dram-budget")
        self._io: StorageBackend = self.backend
        if self.layout.checksums() and experts.verify != "off":
            self._io = ChecksummedBackend(self.backend, self.layout.checksums(), always=experts.verify == "always")
        self._caches: dict[int, _LayerCache] = {}
        self._parts: dict[str, _Part] = {}
        for layer in moe_layers:
            self._caches[layer] = self._layer_cache(layer, slots[layer], min(self._device_slots, slots[layer]))
        self.predictor = ExpertPredictor(
            {i: MoeLayerSpec(layer_names(cfg, i).router, layer_names(cfg, i).post_attn_norm) for i in moe_layers},
            cfg.num_experts, cfg.num_experts_per_tok, cfg.rms_norm_eps, self.get,
            PredictorConfig(experts.predictor, experts.widen, state=experts.state))
        self._first_moe = moe_layers[0]
        # per-pass state
        self._tokens = 0
        self._held: dict[tuple[int, int], list[torch.Tensor]] = {}
        self._at_host: set[tuple[int, int]] = set()  # held experts computed on the CPU (host copies)
        self._steps: dict[int, _LayerStep] = {}
        self._last_used: dict[int, list[int]] = {}
        self._blocked_s = 0.0
        self._step_start: float | None = None
        self._bytes_at_step = 0
        self.disk_bytes_per_s = bandwidths.disk
        self.gate = PrefetchGate(moe_layers, self.predictor.width, self.slot_bytes / bandwidths.disk)
        self._c = _Counters()
        on_device = device_budget > 0 and self._device_slots > 0
        self._host_complete = False
        """With a device: every expert held in host memory (no storage reads, so no prediction);
        each use is a device hit, a copy or a CPU product (``_where``)."""
        if on_device and experts.pin and self._device_slots < cfg.num_experts and \
                all(c.slots >= len(c.pages) for c in self._caches.values()):
            try:
                self.store.hold([pid for c in self._caches.values() for e in sorted(c.pages) for pid in c.pages[e]],
                                "host")
            except BaseException:
                self.close()
                raise
            self._host_complete = True
        elif experts.pin and all((self._device_slots if on_device else c.slots) >= len(c.pages)
                                 for c in self._caches.values()):
            try:
                self._pin_all()
            except BaseException:  # e.g. a checksum mismatch: nothing is left running
                self.close()
                raise

    def _plan_device_slots(self, device_budget: int, layer_slot: dict[int, int], layers: list[int]) -> int:
        """Experts per MoE layer cached on the device: none without a device budget (unless
        ``device_slots`` asks for the stand-in) or with placement 'cpu'; else ``device_slots`` or
        as many as the device budget leaves after the plan."""
        config = self.expert_config
        if not device_budget:
            return config.device_slots
        if config.placement == "cpu":
            return 0
        plan = self.plan
        left = device_budget - plan.resident_bytes["device"] - plan.kv_bytes["device"] - plan.stream_window_bytes
        fit = max(0, left) // max(1, sum(layer_slot[layer] for layer in layers))
        slots = min(config.device_slots or fit, self.config.num_experts)
        if slots > fit:
            raise BudgetError(f"{slots} experts per layer on the device need {slots * sum(layer_slot.values())} bytes; "
                              f"--device-budget leaves {max(0, left)} after the rest of the plan: ask for fewer "
                              "--expert-device-slots or raise --device-budget")
        if slots == 0 and config.placement == "gpu":
            raise BudgetError(f"--expert-placement gpu needs room for one expert per MoE layer on the device "
                              f"({sum(layer_slot.values())} bytes); --device-budget leaves {max(0, left)} after the rest "
                              "of the plan: raise it or use --expert-placement auto|cpu")
        return slots

    def _measure_costs(self) -> PlacementCosts:
        """The link's and the CPU product's speeds on this machine, measured now (~0.1 s)."""
        from flashtier.runtime.kernels import Linear

        linear = Linear(fast=True)
        return PlacementCosts(measure_link(self.device), measure_cpu(linear, self.compute_dtype))

    def _layer_cache(self, layer: int, slots: int, device_slots: int) -> _LayerCache:
        mine = {e: extents for (lay, e), extents in self.layout.experts.items() if lay == layer}
        block = _extent_blocks(self.layout, layer)
        arenas = [f"experts.{layer}.{k}" for k in range(len(block))]
        for k, name in enumerate(arenas):
            self.store.add_arena(ArenaConfig(name, host_budget=slots * block[k], device_budget=device_slots * block[k],
                                             host_policy=self.expert_config.policy,
                                             device_policy=self.expert_config.policy), self._io)
        pages: dict[int, list[tuple[int, int, int]]] = {}
        page_bytes: dict[int, int] = {}
        for e, extents in mine.items():
            pages[e] = []
            page_bytes[e] = sum(x.length for x in extents)
            for k, ext in enumerate(extents):
                pid = (layer, e, k)
                self.store.register(PageDesc(pid, PageSource(ext.path, ext.offset, ext.length)), arenas[k])
                pages[e].append(pid)
                for part in ext.parts:
                    info = part.info
                    self._parts[info.name] = _Part(layer, e, k, part.offset, info.nbytes, info)
        return _LayerCache(arenas, slots, pages, page_bytes)

    def _compressed_read_options(self) -> dict[str, int]:
        """A missed expert is read while its layer waits: one read per 4 MiB record, 8 at a time,
        so its first record is decoded while the rest arrive (grouping records into 8 MiB reads
        measured 12.3 vs 14.4 tok/s on moe-1.3g under 700 MiB)."""
        return {"read_bytes": 0, "max_in_flight": 8}

    def _pin_all(self) -> None:
        """Read every expert into its layer's cache (reads of a layer in flight together, each
        extent checksummed as on any read) and hold them until ``close``."""
        held: dict[object, torch.Tensor] = {}
        for cache in self._caches.values():
            pids = [pid for e in sorted(cache.pages) for pid in cache.pages[e]]
            for pid in pids:
                self.store.prefetch(pid)
            for pid in pids:
                held[pid] = self.store.acquire(pid)
                self._pinned_pages.append(pid)
        for name, part in self._parts.items():
            pages = [held[pid] for pid in self._caches[part.layer].pages[part.expert]]
            self._pinned[name] = self._weight(part, pages)

    def _weight(self, part: _Part, held: list[torch.Tensor]) -> torch.Tensor:
        """The weight ``part`` names, from its expert's held pages."""
        raw = held[part.page][part.offset: part.offset + part.nbytes]
        dtype, shape = page_format(part.info)
        try:
            t = raw.view(dtype).view(shape)
        except RuntimeError:  # the page's bytes are not aligned for the dtype: copy them
            t = raw.clone().view(dtype).view(shape)
        return as_weight(t, part.info, self.compute_dtype)

    # ---------------------------------------------------------------- accessor protocol
    def get(self, name: str) -> torch.Tensor:
        pinned = self._pinned.get(name)
        if pinned is not None:
            return pinned
        part = self._parts.get(name)
        if part is None:
            return super().get(name)
        held = self._held.get((part.layer, part.expert))
        if held is None:
            held = self._acquire_expert(part.layer, part.expert)
        return self._weight(part, held)

    def resident(self, name: str) -> bool:
        return name in self._pinned or super().resident(name)  # a pinned expert is held for the whole run

    def route(self, layer: int, experts: list[int], hidden: torch.Tensor) -> None:
        cache = self._caches.get(layer)
        if cache is None:
            return
        if self._host_complete:  # every expert is in host memory: nothing to read or predict
            if self._tokens == 1:
                self._c.uses += len(experts)
            return
        if self._pinned:  # every expert is held: each use is a hit
            if self._on_device:
                self._c.placed["device_hit" if self._device_slots else "cpu"] += len(experts)
            if self._tokens == 1:
                c = self._c
                c.uses += len(experts)
                c.hits += len(experts)
                hits = c.per_layer_hits.setdefault(layer, [0, 0])
                hits[0] += len(experts)
                hits[1] += len(experts)
            return
        st = self._step(layer)
        routed = set(experts)
        for e in st.named:
            if e not in routed:  # a wrong guess: withdraw it now, so the routed reads may evict it
                self._cancel(cache, e)
        st.ready_at_route = {e for e in experts if self._is_ready(cache, e)}
        st.pending = [e for e in experts if e not in st.ready_at_route]
        self._read_pending(layer)
        p = self.predictor
        target = p.target(layer)
        if not p.enabled or target is None:
            return
        if p.config.state == "post-attention":
            self._predict(target, "router", p.from_hidden(target, hidden, normed_by=layer))
        if self._tokens == 1 and p.previous(target) == layer:
            self._predict(target, "affinity", p.from_previous(target, experts))

    def done(self, names: tuple[str, ...]) -> None:
        part = self._parts.get(names[0]) if names else None
        if part is not None and self._pinned:
            return
        if part is None:
            super().done(names)
            return
        self._release_expert(part.layer, part.expert)
        self._read_pending(part.layer)

    def layer_begin(self, layer: int, hidden: torch.Tensor) -> None:
        super().layer_begin(layer, hidden)
        if layer <= self._first_moe:
            self._tokens = hidden.shape[0]
            self._step_start = time.perf_counter()
        p = self.predictor
        if not p.enabled or self._pinned or self._host_complete:
            return
        if layer == self._first_moe:
            # No earlier state exists in this pass: predict this layer from its own input.
            self._predict(layer, "router", p.from_hidden(layer, hidden))
        target = p.target(layer)
        if target is not None and p.config.state == "layer-input":
            self._predict(target, "router", p.from_hidden(target, hidden))

    def layer_end(self, layer: int) -> None:
        for key in [k for k in self._held if k[0] == layer]:
            self._release_expert(*key)
        super().layer_end(layer)
        cache = self._caches.get(layer)
        if cache is None or self._pinned or self._host_complete:
            return
        st = self._steps.pop(layer, _LayerStep())
        used = st.used
        for e in set(st.named) | st.started:
            if e not in used:
                self._cancel(cache, e)  # mispredicted: it competes for eviction again
        p = self.predictor
        previous = p.previous(layer)
        if self._tokens == 1:
            c = self._c
            c.named += len(st.named)
            c.named_used += len(set(st.named) & set(used))
            for e in st.reading - set(used):
                c.wasted_reads += 1
                c.wasted_bytes += cache.page_bytes[e]
            guess = st.guesses.get(p.source(layer))
            if guess is not None:  # the predictor in charge, whether or not the gate issued it
                first = previous is None  # guessed from its own input, not a layer ahead
                c.guessed[first] += len(guess)
                c.guessed_used[first] += len(set(guess) & set(used))
                c.guessed_layer_uses[first] += len(used)
                self.gate.score(layer, guess, used, st.cached_at_guess or [])
            p.observe(layer, used, self._last_used.get(previous, []) if previous is not None else [], st.guesses)
        self._last_used[layer] = used

    def step_end(self) -> None:
        for key in list(self._held):
            self._release_expert(*key)
        super().step_end()
        if self._pinned or self._host_complete:
            if self._host_complete:
                self.store.tick(self._expert_arenas())  # the device caches' policies age by steps
            self._end_pass()
            return
        self.store.tick(self._expert_arenas())
        if self._tokens == 1 and self._step_start is not None:
            wall = time.perf_counter() - self._step_start
            read = self.store.stats(self._expert_arenas()).tiers["storage"].bytes_read
            busy = (read - self._bytes_at_step) / self.disk_bytes_per_s
            self.gate.observe_step((wall - self._blocked_s) / len(self._caches), busy / wall if wall > 0 else 0.0)
            self._bytes_at_step = read
        self._end_pass()

    def abort(self) -> None:
        for key in list(self._held):
            self._release_expert(*key)
        for layer, st in self._steps.items():
            for e in set(st.named) | st.started:
                self._cancel(self._caches[layer], e)
        self._end_pass()
        super().abort()

    def _end_pass(self) -> None:
        self._steps.clear()
        self._last_used.clear()
        self._blocked_s = 0.0
        self._step_start = None

    # ---------------------------------------------------------------- experts
    def _step(self, layer: int) -> _LayerStep:
        st = self._steps.get(layer)
        if st is None:
            st = self._steps[layer] = _LayerStep()
        return st

    def _cancel(self, cache: _LayerCache, e: int) -> None:
        for pid in cache.pages[e]:
            self.store.cancel_prefetch(pid)

    def _is_ready(self, cache: _LayerCache, e: int) -> bool:
        """Whether expert ``e`` needs no read from storage: on the device, or (where misses may run
        on the CPU) in host memory."""
        return all(_ready(self.store, pid, self._staging()) for pid in cache.pages[e])

    def _staging(self) -> str | None:
        """The tier expert reads stop at when where a miss runs is decided at its use ('host',
        with placement 'auto' and a device cache), else None (the arena's compute tier)."""
        return "host" if self.placement_costs is not None else None

    def _where(self, cache: _LayerCache, e: int) -> str:
        """Where expert ``e`` runs this pass: 'device' (on the device now, or copied there) or
        'host' (computed on the CPU from its host copy); see ``prefetch/placement.py``."""
        costs = self.placement_costs
        if costs is None:
            return "device" if self._device_slots else "host"
        locations = [self.store.location(pid) for pid in cache.pages[e]]
        if all("device" in loc.copies for loc in locations):
            return "device"
        if any("host" not in loc.copies and loc.tier == "device" for loc in locations):
            return "device"  # part of it is only on the device: finish the copy
        return costs.choose(self.expert_config.placement, cache.page_bytes[e], max(1, self._tokens))

    def _acquire_expert(self, layer: int, e: int) -> list[torch.Tensor]:
        cache = self._caches[layer]
        st = self._step(layer)
        ready = (e in st.ready_at_route) if st.ready_at_route is not None else self._is_ready(cache, e)
        if self._tokens == 1:
            c = self._c
            c.uses += 1
            c.hits += ready
            c.in_time += ready and e in st.named
            c.demand_reads += not ready and e not in st.reading
            c.per_layer_hits.setdefault(layer, [0, 0])[0] += ready
            c.per_layer_hits[layer][1] += 1
        if e in st.pending:
            st.pending.remove(e)  # its read (if any) is now a demand
        held: list[torch.Tensor] = []
        start = time.perf_counter()
        at_host = self.placement_costs is not None and self._where(cache, e) == "host"
        if self._on_device:
            on_device = all("device" in self.store.location(pid).copies for pid in cache.pages[e])
            cpu = at_host or not self._device_slots
            self._c.placed["device_hit" if on_device else ("cpu" if cpu else "copied")] += 1
        try:
            for pid in cache.pages[e]:
                held.append(self.store.acquire_at(pid, "host") if at_host else self.store.acquire(pid))
        except BaseException:
            for pid in cache.pages[e][: len(held)]:
                self.store.release_at(pid, "host") if at_host else self.store.release(pid)
            raise
        self._blocked_s += time.perf_counter() - start
        self._held[(layer, e)] = held
        if at_host:
            self._at_host.add((layer, e))
        st.used.append(e)
        return held

    def _release_expert(self, layer: int, e: int) -> None:
        if self._held.pop((layer, e), None) is None:
            return
        cache = self._caches[layer]
        at_host = (layer, e) in self._at_host
        self._at_host.discard((layer, e))
        for pid in cache.pages[e]:
            self.store.release_at(pid, "host") if at_host else self.store.release(pid)

    def _read_pending(self, layer: int) -> None:
        """Start the reads of the experts ``layer`` routed to and does not hold yet, in the order
        they will be used, while its cache has room (the rest start as earlier ones are done)."""
        st = self._steps.get(layer)
        cache = self._caches.get(layer)
        while st is not None and cache is not None and st.pending:
            e = st.pending[0]
            if not self._start(cache, e, priority=0):
                return
            st.started.add(e)
            st.pending.pop(0)

    def _start(self, cache: _LayerCache, e: int, priority: int) -> bool:
        """Prefetch expert ``e``'s pages (IO ``priority``: lower first); False when the layer's
        cache has no room for them now."""
        tier = self._staging()
        return all(self.store.prefetch(pid, priority=priority, tier=tier) is not None for pid in cache.pages[e])

    def _predict(self, layer: int, source: str, guess: list[int]) -> None:
        """Record ``source``'s guess for ``layer`` and, if it is the predictor in charge of that
        layer and the gate says a rank pays, start reading those experts."""
        if not guess:
            return
        st = self._step(layer)
        st.guesses[source] = guess
        if self.predictor.source(layer) != source or self._tokens != 1:
            return  # prompts route to most experts: they are read as each layer routes (``route``)
        cache = self._caches[layer]
        cached = [e for e in cache.pages if self._is_ready(cache, e)]
        if st.cached_at_guess is None:
            st.cached_at_guess = cached
        free = cache.slots - len(cached)
        for rank, e in enumerate(guess[: cache.slots]):
            if e in st.named:
                continue
            was_ready = e in cached
            if not was_ready and self.expert_config.gate and not self.gate.pays(layer, rank, displaces=free <= 0):
                continue
            st.named.append(e)
            if not self._start(cache, e, priority=1 + rank):
                continue
            if not was_ready:
                free -= 1
                st.reading.add(e)
                self._c.prefetch_reads += 1
                self._c.prefetch_bytes += cache.page_bytes[e]

    # ---------------------------------------------------------------- reporting
    def stats(self) -> dict[str, Any]:
        s = super().stats()
        expert_bytes = 0
        wait = 0.0
        if self._caches:
            st = self.store.stats(self._expert_arenas())
            expert_bytes += st.tiers["storage"].bytes_read
            wait += st.wait_s
            s["host_hits"] += st.tiers["host"].hits  # the expert caches are host-tier arenas too
            s["host_misses"] += st.tiers["host"].misses
        c = self._c
        if self.compressed_index is None:  # else the backend's count (in ``s``) has the experts already
            s["bytes_read_storage"] += expert_bytes
        s["io_wait_s"] = round(s["io_wait_s"] + wait, 6)
        s["resident_bytes"]["expert_cache"] = self.expert_cache_bytes
        s["streamed_tensors"] += len(self._parts)
        ratio = lambda a, b: round(a / b, 4) if b else None
        s.update({
            "expert_hit_rate": ratio(c.hits, c.uses),
            "expert_prefetch_precision": ratio(c.named_used, c.named),
            "expert_prefetch_recall": ratio(c.in_time, c.uses),
            "expert_prediction_precision": ratio(c.guessed_used[0], c.guessed[0]),
            "expert_prediction_recall": ratio(c.guessed_used[0], c.guessed_layer_uses[0]),
            "expert_first_layer_prediction_recall": ratio(c.guessed_used[1], c.guessed_layer_uses[1]),
            "expert_uses": c.uses,
            "expert_bytes_read": expert_bytes,
            "expert_prefetch_reads": c.prefetch_reads,
            "expert_demand_reads": c.demand_reads,
            "expert_prefetch_wasted_bytes": c.wasted_bytes,
            "expert_hit_rate_per_layer": {str(k): ratio(h, n) for k, (h, n) in sorted(c.per_layer_hits.items())},
            "expert_cache": {
                "policy": self.expert_config.policy,
                "predictor": self.expert_config.predictor,
                "predictor_choice": {str(i): self.predictor.source(i) for i in self._caches},
                "gate": self.gate.report() if self.expert_config.gate else "off",
                "pinned": bool(self._pinned),
                "slots_per_layer": {str(i): c2.slots for i, c2 in self._caches.items()},
                "device_slots_per_layer": self._device_slots,
                "slot_bytes": self.slot_bytes,
                "layout": self.layout.kind,
                "reads_per_expert": round(self.layout.reads_per_expert(), 3),
            },
        })
        s["expert_cache"]["host_complete"] = self._host_complete
        if isinstance(self._io, ChecksummedBackend):
            s["expert_cache"]["verified_bytes"] = self._io.verified_bytes
        if self._on_device:
            costs = self.placement_costs
            s["expert_placement"] = {
                "mode": self.expert_config.placement, **c.placed,
                "link_gb_s": round(costs.link_bytes_per_s / 1e9, 2) if costs else None,
                "cpu_gb_s": round(costs.cpu_bytes_per_s / 1e9, 2) if costs else None}
        return s

    def close(self) -> None:
        for key in list(self._held):
            self._release_expert(*key)
        for pid in self._pinned_pages:
            self.store.release(pid)
        self._pinned_pages.clear()
        self._pinned.clear()
        super().close()

    def _expert_arenas(self) -> list[str]:
        """The store arenas of every layer's expert cache."""
        return [name for cache in self._caches.values() for name in cache.arenas]


def _ready(store: TieredStore, pid: object, tier: str | None = None) -> bool:
    """Whether the page is in its arena's compute tier (or has a copy in ``tier``) now, not in
    flight."""
    loc = store.location(pid)
    return (loc.tier == store.compute_tier_of(pid) or tier in loc.copies) and loc.in_flight_to is None


def _block_bytes(offset: int, length: int) -> int:
    """Host bytes one extent takes in a cache slot: its aligned read span, rounded to the slab's
    block alignment."""
    head = offset % HOST_ALIGNMENT
    return align_up(head + length, HOST_ALIGNMENT)


def _slot_bytes(layout: ExpertLayout) -> int:
    """Host bytes of the largest expert's slot (its extents' aligned spans)."""
    return max(sum(_block_bytes(x.offset, x.length) for x in extents) for extents in layout.experts.values())


def min_cache_bytes(checkpoint: Checkpoint, slots: int = 1) -> int:
    """The expert-cache bytes :class:`ExpertWeights` reserves before planning the rest (``slots``
    of the largest expert per MoE layer); ``plan`` reserves the same."""
    layout = expert_layout(checkpoint)
    return len({layer for layer, _ in layout.experts}) * slots * _slot_bytes(layout)


def _extent_blocks(layout: ExpertLayout, layer: int) -> list[int]:
    """Host bytes of one slot of each of ``layer``'s extent caches (gate, up, down...): the
    largest aligned span of that extent over the layer's experts. Layers may differ (a GGUF
    Q4_K_M file keeps some layers' down projections in Q6_K)."""
    mine = [x for (lay, _), x in layout.experts.items() if lay == layer]
    return [max(_block_bytes(x[k].offset, x[k].length) for x in mine if len(x) > k)
            for k in range(max(len(x) for x in mine))]


def _slots_per_layer(cache_bytes: int, slot_bytes: dict[int, int], layers: list[int], num_experts: int,
                     fixed: int | None) -> dict[int, int]:
    """Experts per layer: ``fixed``, or the cache bytes shared out evenly, one slot per layer per
    round (earlier layers get the remainder: the first MoE layer of a step cannot be predicted a
    layer ahead), at least one. ``slot_bytes``: one expert's bytes in each layer's cache."""
    if fixed is not None:
        return {layer: min(fixed, num_experts) for layer in layers}
    slots = {layer: 1 for layer in layers}
    left = cache_bytes - sum(slot_bytes[layer] for layer in layers)
    grew = True
    while grew:
        grew = False
        for layer in layers:
            if slots[layer] < num_experts and slot_bytes[layer] <= left:
                slots[layer] += 1
                left -= slot_bytes[layer]
                grew = True
    return slots


def expert_weights(checkpoint: Checkpoint, config: Any) -> ExpertWeights:
    """EngineConfig -> ExpertWeights (the factory the engine uses for MoE models under a budget)."""
    return ExpertWeights(checkpoint, **budget_options(checkpoint, config, "expert caches"),
                         experts=config.experts)
