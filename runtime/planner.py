"""Placement plan and cost model: what stays resident in which tier, what streams, how fast.

From a model config (a checkpoint, or a ``config.json`` alone), the budgets and measured
bandwidths, :func:`make_plan` decides, "LLM in a flash" style, which weights stay resident:

1. small tensors (norms, routers, biases) and the attention projections,
2. the output head,
3. then whole FFN layers (dense) or experts (MoE), in layer order, while they fit;

everything else streams from storage each token through a bounded window. The embedding table is
never resident: the forward reads only the rows of the current tokens. With a device (GPU), the
device tier is filled first and the host tier holds what streams over the host link.

The cost model (batch-1 decode is bound by bytes moved): a token costs the slowest of
  storage bytes / disk bandwidth, host->device bytes / link bandwidth,
  and compute (resident bytes read per token / memory bandwidth of the tier that holds them),
plus, for long contexts, the KV bytes each tier reads per token.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from collections.abc import Mapping
from typing import Any, Literal

from flashtier.errors import BudgetError, ConfigError
from flashtier.checkpoint.folder import (
    EMBED,
    FINAL_NORM,
    LM_HEAD,
    expected_shapes,
    layer_names,
)
from flashtier.checkpoint.config import ModelConfig

Tier = Literal["device", "host", "storage"]
MiB = 1 << 20


@dataclass(frozen=True, slots=True)
class Bandwidths:
    """Bytes per second the cost model assumes (measured by ``flashtier bench-io`` or given)."""

    disk: float = 1.2e9
    """Storage -> host reads (O_DIRECT)."""
    host_memory: float = 20e9
    """Host DRAM bytes the CPU streams through a matrix-vector product."""
    host_to_device: float = 25e9
    """Host -> device copies (PCIe 4.0 x16 in practice)."""
    device_memory: float = 1.0e12
    """Device memory bandwidth (an RTX 4090 class GPU)."""
    decode: float = 1.8e9
    """Bytes of weights the IO threads restore per second from the compressed copy (split16: zstd +
    interleave). Conservative: on the 2-core work machine the codec alone does 3.0 GB/s on one
    thread and 5.4 on two (``benchmarks/bench_weight_codec.py``), and capped decode of dense-1.7g sustained 1.7-2.4 GB/s of weights (reads
    bound it, not decoding); see storage_backends/weight_codec.py."""
    source: str = "defaults"


StreamedUnit = Literal["tensor", "layer"]
"""How the planner sizes the window and residency (``PlanRequest.streamed_unit``)."""


@dataclass(frozen=True, slots=True)
class PlanRequest:
    """What to plan for."""

    device_budget: int = 0
    """Bytes of device memory (0 = no device: compute on the host)."""
    dram_budget: int | None = None
    """Bytes of host memory for weights and KV (None = unlimited)."""
    context: int = 4096
    """Tokens of context the KV cache must hold."""
    attention: Literal["full", "retrieval"] = "full"
    resident_kv_tokens: int = 4 + 512
    """Retrieval attention: sink + window tokens kept in the fastest tier."""
    retrieval_scan_fraction: float = 0.02
    """Retrieval attention: share of the offloaded keys scanned per step."""
    retrieval_scan_max_keys: int | None = 1024
    """Retrieval attention: at most this many offloaded keys scanned per search, as the runtime's
    default preset bounds it (``scan_max_keys``); None = the share alone."""
    retrieval_top_k: int = 2048
    retrieval_step_s: float | None = None
    """Retrieval attention: seconds of one decode step's attention over all layers as measured on
    this machine (:mod:`flashtier.runtime.kv.retrieval_cost`: a probe of the runtime's own step,
    scaled by the bytes the index reads at ``context``). Replaces the byte model above (scan
    share, top-k rows at host memory bandwidth) in the prediction. None: the byte model."""
    streamed_unit: StreamedUnit = "tensor"
    """What the forward holds at once and what residency is decided for: ``tensor`` (dense weights
    are released after their matmul; a layer that does not fit whole keeps the tensors that fit)
    or ``layer`` (whole layers; the sparse FFN, whose bundles replace a streamed layer's FFN and
    use its share of the window, plans this way)."""
    stream_window_bytes: int = 96 * MiB
    """Host bytes reserved for in-flight streamed weights (at least 2 of the largest streamed
    tensors). 64 MiB measured worse on the 1.7 GB model (23 MB tensors): the slab fragments,
    prefetched pages get evicted and are read twice (1.34 GB/token instead of the planned 1.04)."""
    weight_dtype_bytes: int = 2
    resident_sizes: Mapping[str, int] | None = None
    """Bytes a tensor takes when kept in memory, where that differs from its stored size (a bf16
    tensor computed in float32 takes twice its bytes); placement and the budget check use these,
    the streaming window and the bytes read per token the stored sizes."""
    expert_cache: bool = False
    """MoE experts are served by a per-layer expert cache: never placed resident; the host bytes
    left after the other weights, the KV and the streaming window form that cache."""
    expert_cache_min_bytes: int = 0
    """With ``expert_cache``: bytes the cache needs at least (reserved before anything else)."""
    kv_dtype_bytes: int = 2
    kv_host_fraction: float = 1.0
    """Retrieval attention: bytes of the offloaded (host-tier) KV per byte of raw KV (below 1 with
    KIVI-quantised host KV, ``--kv-quant-bits``: 0.375 at 4 bits)."""
    storage_fraction: float = 1.0
    """Bytes read from storage per byte of streamed weights: below 1 when the checkpoint has
    compressed side files (``flashtier compress``); each streamed byte is then also decoded."""

    def __post_init__(self) -> None:
        if not 0.0 < self.kv_host_fraction <= 1.0:
            raise ConfigError(f"kv_host_fraction must be in (0, 1], got {self.kv_host_fraction}")
        if not 0.0 < self.storage_fraction <= 1.5:
            raise ConfigError(f"storage_fraction must be in (0, 1.5], got {self.storage_fraction}")
        if self.context <= 0:
            raise ConfigError(f"context must be positive, got {self.context}")
        if self.attention not in ("full", "retrieval"):
            raise ConfigError(f"attention must be 'full' or 'retrieval', got {self.attention!r}")
        if self.retrieval_scan_max_keys is not None and self.retrieval_scan_max_keys <= 0:
            raise ConfigError(f"retrieval_scan_max_keys must be a positive number of keys (or None), "
                              f"got {self.retrieval_scan_max_keys}")


@dataclass
class Plan:
    """The answer: placements and predicted speed. ``as_json()`` is what ``plan --json`` prints."""

    fits: bool
    placement: dict[str, Tier]
    resident_bytes: dict[str, int]
    bytes_per_token: dict[str, int]
    kv_bytes: dict[str, int]
    predicted_decode_tok_s: float
    predicted_decode_s: float
    bound_by: str
    min_dram_budget: int
    """The least ``--dram-budget`` (to 64 KiB) that plans for this request (with a device: what
    the placement needs in host memory). ``plan`` prints it and ``generate`` refuses below it."""
    stream_window_bytes: int
    bandwidths: Bandwidths
    notes: list[str] = field(default_factory=list)
    expert_cache_bytes: int = 0
    """Host bytes of the expert cache (``PlanRequest.expert_cache``), 0 otherwise."""
    expert_reserve_bytes: int = 0
    """Host bytes reserved for the expert cache (``expert_cache_min_bytes``)."""
    need_bytes: int = 0
    """What this placement needs besides its resident weights: norms/routers, the streaming window,
    host KV and the expert reserve. ``min_dram_budget`` is the least budget whose own placement
    fits (it also holds the weights that keep the window that small)."""
    small_bytes: int = 0
    """Norms, routers and other small tensors, always resident."""
    predicted_retrieval_s: float | None = None
    """Retrieval attention's share of the step (``PlanRequest.retrieval_step_s``), None when not measured."""

    def as_json(self) -> dict[str, Any]:
        return {
            "fits": self.fits,
            "resident_bytes": self.resident_bytes,
            "bytes_per_token": self.bytes_per_token,
            "kv_bytes": self.kv_bytes,
            "predicted_decode_tok_s": round(self.predicted_decode_tok_s, 4),
            "predicted_decode_s_per_token": round(self.predicted_decode_s, 6),
            "bound_by": self.bound_by,
            "predicted_retrieval_s_per_token": None if self.predicted_retrieval_s is None else round(self.predicted_retrieval_s, 6),
            "min_dram_budget": self.min_dram_budget,
            "stream_window_bytes": self.stream_window_bytes,
            "expert_cache_bytes": self.expert_cache_bytes,
            "streamed_tensors": sum(1 for t in self.placement.values() if t == "storage"),
            "bandwidths": asdict(self.bandwidths),
            "notes": self.notes,
        }


def tensor_groups(cfg: ModelConfig, sizes: dict[str, int]) -> list[tuple[str, list[str]]]:
    """Tensors grouped into residency units, in priority order: (kind, names)."""
    groups: list[tuple[str, list[str]]] = []
    small, attn, ffn = [], [], []
    for i in range(cfg.num_layers):
        n = layer_names(cfg, i)
        small += [x for x in (n.input_norm, n.post_attn_norm, n.q_bias, n.k_bias, n.v_bias, n.router, n.shared_expert_gate) if x]
        attn.append(("attention", [n.q, n.k, n.v, n.o]))
        if n.gate:
            ffn.append(("ffn", [n.gate, n.up, n.down]))
        if n.shared_gate:
            ffn.append(("shared_expert", [n.shared_gate, n.shared_up, n.shared_down]))
        for e in range(cfg.num_experts if n.router else 0):
            ffn.append(("expert", list(n.expert(e))))
    small.append(FINAL_NORM)
    groups.append(("small", small))
    groups += attn
    head = output_head(cfg, sizes)
    if head:
        groups.append(("lm_head", [head]))
    # Experts interleaved across layers would be fairer, but whole layers keep reads sequential.
    groups += ffn
    return groups


def output_head(cfg: ModelConfig, sizes: dict[str, int]) -> str:
    """The tensor the output projection reads: ``lm_head.weight``, or with tied embeddings (and no
    separate head) the embedding table, which then is a whole-table read per token like any other
    weight; "" when neither is known."""
    if LM_HEAD in sizes:
        return LM_HEAD
    return EMBED if cfg.tie_word_embeddings and EMBED in sizes else ""


def sizes_from_config(cfg: ModelConfig, dtype_bytes: int = 2) -> dict[str, int]:
    """Tensor byte sizes implied by a config alone (no checkpoint)."""
    out = {}
    for name, shape in expected_shapes(cfg).items():
        n = 1
        for s in shape:
            n *= s
        out[name] = n * dtype_bytes
    return out


def kv_bytes_per_token(cfg: ModelConfig, dtype_bytes: int = 2) -> int:
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * dtype_bytes


class _BelowMinimum(Exception):
    """``_make_plan``'s refusal: the budget is below what its own placement needs (``need`` bytes)."""

    def __init__(self, need: int) -> None:
        super().__init__(need)
        self.need = need


def make_plan(cfg: ModelConfig, sizes: dict[str, int], req: PlanRequest, bw: Bandwidths = Bandwidths()) -> Plan:
    """Place every tensor and predict decode speed. Raises BudgetError below the minimum, naming
    the least budget that plans (and what it holds). The minimum is searched, not read off the
    refused placement: a smaller budget streams more tensors and so needs a larger window than a
    budget slightly above the true minimum does."""
    try:
        plan = _make_plan(cfg, sizes, req, bw)
        if req.dram_budget is not None and req.device_budget <= 0:
            plan = replace(plan, min_dram_budget=_least_budget(cfg, sizes, replace(req, dram_budget=0), bw,
                                                               req.dram_budget))
        return plan
    except _BelowMinimum as e:
        least = _least_budget(cfg, sizes, req, bw, e.need)
        for _ in range(8):  # the least budget plans; guard against a placement that needs more there
            try:
                plan = _make_plan(cfg, sizes, replace(req, dram_budget=least), bw)
                break
            except _BelowMinimum as again:
                least = max(again.need, least + 1)
        else:
            raise BudgetError(f"--dram-budget {_human(req.dram_budget or 0)} is below the minimum this model needs; "
                              f"raise it to at least {_ceil_size(least)}") from None
        kv_host = plan.kv_bytes["host"]
        rest = least - plan.need_bytes
        raise BudgetError(
            f"--dram-budget {_human(req.dram_budget or 0)} is below the minimum this model needs "
            f"({_human(least)}: {_human(plan.small_bytes)} of norms/routers, a {_human(plan.stream_window_bytes)} "
            f"streaming window and {_human(kv_host)} of KV"
            + (f", an expert cache of {_human(plan.expert_reserve_bytes)}" if plan.expert_reserve_bytes else "")
            + (f", {_human(rest)} of resident weights (with less, more weights stream and the window grows)"
               if rest >= 64 << 10 else "")
            + f"); raise the budget to at least {_ceil_size(least)}"
        ) from None


def _least_budget(cfg: ModelConfig, sizes: dict[str, int], req: PlanRequest, bw: Bandwidths, high: int) -> int:
    """The least budget (a multiple of 64 KiB, or ``high``) in ``(req.dram_budget, high]`` that
    plans, by bisection (a larger budget never needs more: it keeps more resident, which only
    shrinks the streaming window). ``high``: a budget that plans, or what a refused placement needs."""
    step = 64 << 10
    lo, hi = (req.dram_budget or 0) // step, -(-high // step)  # lo fails; try hi last
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            _make_plan(cfg, sizes, replace(req, dram_budget=mid * step), bw)
            hi = mid
        except _BelowMinimum:
            lo = mid
    return min(hi * step, high)


def _make_plan(cfg: ModelConfig, sizes: dict[str, int], req: PlanRequest, bw: Bandwidths) -> Plan:
    groups = tensor_groups(cfg, sizes)
    expert_mode = req.expert_cache and cfg.is_moe
    if expert_mode:
        groups = [g for g in groups if g[0] != "expert"]
    has_device = req.device_budget > 0
    notes: list[str] = []
    placement: dict[str, Tier] = {EMBED: "storage"}
    notes.append("embedding rows are read per token; the table is never resident"
                 + (" (but with tied embeddings it is the output head, placed like one)" if output_head(cfg, sizes) == EMBED else ""))

    # ---- KV cache placement
    kv_tok = kv_bytes_per_token(cfg, req.kv_dtype_bytes)
    kv_total = kv_tok * req.context
    if req.attention == "retrieval":
        kv_fast = kv_tok * min(req.context, req.resident_kv_tokens)
        kv_slow_raw = kv_total - kv_fast
        kv_slow = int(kv_slow_raw * req.kv_host_fraction)
        if req.kv_host_fraction < 1.0:
            notes.append(f"offloaded KV quantised: {req.kv_host_fraction:.3f}x its raw bytes in the host tier")
    else:
        kv_fast, kv_slow = kv_total, 0
        kv_slow_raw = 0
    fast_tier: Tier = "device" if has_device else "host"
    kv_bytes = {"device": 0, "host": 0, "storage": 0}
    kv_bytes[fast_tier] += kv_fast
    kv_bytes["host"] += kv_slow
    if has_device and req.attention == "full" and kv_fast > req.device_budget // 2:
        # The KV does not fit beside the weights: it lives in host memory and every decode step
        # reads all of it over the host link (one layer at a time in flight on the device).
        kv_bytes["device"], kv_bytes["host"] = kv_total // cfg.num_layers, kv_bytes["host"] + kv_fast
        notes.append("full attention: the KV cache does not fit on the device; it is read over the host link every step")

    # ---- weights: fill the fast tier, then (with a device) the host tier, then stream.
    # The streaming window must hold two of the largest streamed tensors; which tensors stream
    # depends on the window, so iterate until the window is consistent with the placement.
    small_bytes = sum((req.resident_sizes or {}).get(n, sizes[n]) for n in groups[0][1])
    base_window = min(req.stream_window_bytes, sum(sizes.values()) // 8)
    window = base_window
    windowed: tuple[Tier, ...] = ("storage", "host") if has_device else ("storage",)  # copied through the window
    for _ in range(4):
        placed, used = _place(groups, sizes, req, has_device, kv_bytes, window)
        need_window = max(base_window, 2 * _largest_pass_group(cfg, sizes, placed, req.streamed_unit, windowed))
        if need_window <= window:
            break
        window = need_window
    expert_min = req.expert_cache_min_bytes if expert_mode else 0
    if expert_mode:
        # only experts stream (no other weight is read from storage or, with a device, copied from
        # the host): the expert cache is their window
        if not any(t in windowed for t in placed.values()):
            window = 0
        for kind, names in tensor_groups(cfg, sizes):
            if kind == "expert":
                placed.update((n, "storage") for n in names)
    placement.update(placed)
    min_dram = small_bytes + window + (0 if has_device else kv_bytes["host"]) + expert_min
    if has_device:
        # The device holds the small tensors; the host stages what streams from storage (one
        # window) and keeps the host-placed weights and KV, and whatever it holds must fit.
        min_dram = window + kv_bytes["host"] + sum(
            (req.resident_sizes or {}).get(n, sizes[n]) for n, t in placed.items() if t == "host" and n in groups[0][1])
    if req.dram_budget is not None and req.dram_budget < min_dram:
        raise _BelowMinimum(min_dram)

    resident = {"device": used["device"], "host": used["host"], "storage": sum(sizes.values())}
    per_token = _bytes_per_token(cfg, sizes, placement, has_device)
    expert_cache = 0
    if expert_mode:
        expert_cache, cached_share = _expert_cache_share(cfg, sizes, req, used["host"] + kv_bytes["host"] + window)
        routed = sum(s for n, s in sizes.items() if ".experts." in n) * cfg.num_experts_per_tok // cfg.num_experts
        per_token["storage"] -= int(routed * cached_share)
        per_token["host"] += 0 if has_device else int(routed * cached_share)
        notes.append(f"experts: a {_human(expert_cache)} per-layer cache holds {cached_share:.0%} of them; "
                     "the routed experts it misses are read from storage")

    # ---- KV bytes read per decode step, by who reads them
    kv_on_link = has_device and req.attention == "full" and kv_bytes["host"] > 0
    # the key index holds exact keys (half the raw offloaded KV); the top-k rows are read as stored
    scanned_tokens = kv_slow_raw / kv_tok * req.retrieval_scan_fraction if kv_tok else 0.0
    if req.retrieval_scan_max_keys is not None:
        scanned_tokens = min(scanned_tokens, req.retrieval_scan_max_keys)
    scan = (int(scanned_tokens * kv_tok / 2)
            + int(min(req.retrieval_top_k, req.context) * kv_tok * req.kv_host_fraction)) if kv_slow else 0
    if has_device:
        kv_device_read = kv_total if req.attention == "full" else kv_fast
        kv_host_read = scan
    else:
        kv_device_read = 0
        kv_host_read = (kv_total if req.attention == "full" else kv_fast) + scan
    per_token["kv_device_read"] = kv_device_read
    per_token["kv_host_read"] = kv_host_read
    per_token["host_to_device"] += kv_total if kv_on_link else 0

    decoded = 0
    if req.storage_fraction != 1.0:
        decoded = per_token["storage"]
        per_token["storage_decoded"] = decoded
        per_token["storage"] = int(per_token["storage"] * req.storage_fraction)
    times = {
        "disk": per_token["storage"] / bw.disk,
        "decode": decoded / bw.decode,
        "host_to_device": per_token["host_to_device"] / bw.host_to_device,
        "compute_device": (per_token["device"] + kv_device_read) / bw.device_memory,
        "compute_host": (per_token["host"] + kv_host_read) / bw.host_memory,
    }
    retrieval_s = req.retrieval_step_s if req.attention == "retrieval" else None
    if retrieval_s is not None:
        if has_device:  # the host-side search overlaps the device's compute
            times["retrieval_host"] = retrieval_s
        else:  # the CPU runs the attention between the products
            times["compute_host"] = per_token["host"] / bw.host_memory + retrieval_s
        notes.append(f"retrieval step {retrieval_s * 1e3:.1f} ms/token from the probe of this machine's step "
                     "(flashtier.runtime.kv.retrieval_cost), not from the byte model")
    bound_by = max(times, key=times.__getitem__)
    # Streaming overlaps compute; device compute and host-side retrieval overlap too.
    step = max(times.values())
    fits = (req.dram_budget is None or used["host"] + kv_bytes["host"] + window + expert_min <= req.dram_budget + 1) and (
        not has_device or used["device"] + kv_bytes["device"] + window <= req.device_budget)
    return Plan(
        fits=fits,
        placement=placement,
        resident_bytes={k: int(v) for k, v in resident.items()},
        bytes_per_token={k: int(v) for k, v in per_token.items()},
        kv_bytes={k: int(v) for k, v in kv_bytes.items()},
        predicted_decode_tok_s=1.0 / step if step > 0 else float("inf"),
        predicted_decode_s=step,
        bound_by=bound_by,
        min_dram_budget=int(min_dram),
        stream_window_bytes=int(window),
        expert_reserve_bytes=int(expert_min),
        need_bytes=int(min_dram),
        small_bytes=int(small_bytes),
        expert_cache_bytes=int(expert_cache),
        predicted_retrieval_s=retrieval_s,
        bandwidths=bw,
        notes=notes,
    )


PAGE_SLACK = 8192
"""Alignment padding a streamed page may cost in the store's slab."""


def _largest_pass_group(cfg: ModelConfig, sizes: dict[str, int], placed: dict[str, Tier],
                        unit: StreamedUnit = "tensor", windowed: tuple[Tier, ...] = ("storage",)) -> int:
    """Most streamed bytes a forward holds at once: with ``unit == "tensor"`` one dense tensor (the
    forward releases each right after its matmul, ``Transformer._linear``), with ``"layer"`` one
    layer's dense tensors; plus two experts (an expert's three tensors are released together), or
    the output head. ``windowed``: the placements that pass through the window (with a device, the
    host-placed weights too: they are copied into the device window at each use)."""
    def streamed(names: list[str]) -> int:
        return sum(sizes[n] + PAGE_SLACK for n in names if n and placed.get(n) in windowed)

    head = output_head(cfg, sizes)
    largest = streamed([head]) if head else 0
    for i in range(cfg.num_layers):
        n = layer_names(cfg, i)
        dense = [n.q, n.k, n.v, n.o, n.gate, n.up, n.down, n.shared_gate, n.shared_up, n.shared_down]
        held = max(streamed([t]) for t in dense) if unit == "tensor" else streamed(dense)
        if n.router:
            held += 2 * max((streamed(list(n.expert(e))) for e in range(cfg.num_experts)), default=0)
        largest = max(largest, held)
    return largest


def expert_cache_min_bytes(cfg: ModelConfig, sizes: dict[str, int], slots: int = 1) -> int:
    """Bytes an expert cache of ``slots`` experts per MoE layer needs at least: per layer, its
    largest expert with each tensor's alignment slack (>= what ``ExpertWeights`` reserves, so a
    plan made with it never fits a budget that the engine then refuses)."""
    total = 0
    for i in range(cfg.num_layers):
        if not cfg.moe_layers[i]:
            continue
        n = layer_names(cfg, i)
        total += slots * max(sum(sizes.get(t, 0) + PAGE_SLACK for t in n.expert(e)) for e in range(cfg.num_experts))
    return total


def _expert_cache_share(cfg: ModelConfig, sizes: dict[str, int], req: PlanRequest, taken: int) -> tuple[int, float]:
    """Expert-cache bytes (what the host budget leaves after ``taken``, at least the reserved
    minimum, at most all experts) and the share of the experts it holds."""
    experts = [s for n, s in sizes.items() if ".experts." in n]
    total = sum(experts)
    slack = PAGE_SLACK * len(experts)  # each expert tensor's extent may be alignment-rounded in its slot
    left = total + slack if req.dram_budget is None else max(req.dram_budget - taken, req.expert_cache_min_bytes)
    cache = min(left, total + slack)
    return cache, (min(cache / (total + slack), 1.0) if total else 0.0)


def _ceil_size(n: int) -> str:
    """A size string (as --dram-budget accepts) of at least ``n`` bytes."""
    return f"{-(-n // MiB)}M" if n >= MiB else f"{-(-n // 1024)}K"


def _human(n: int) -> str:
    return f"{n / MiB:.1f} MiB" if n >= MiB else f"{n / 1024:.1f} KiB"


def _place(groups: list[tuple[str, list[str]]], sizes: dict[str, int], req: PlanRequest, has_device: bool,
           kv_bytes: dict[str, int], window: int) -> tuple[dict[str, Tier], dict[Tier, int]]:
    """Greedy placement of the groups in priority order into device, then host, else storage."""
    caps: dict[Tier, float] = {}
    if has_device:
        caps["device"] = req.device_budget - kv_bytes["device"] - window
    caps["host"] = float("inf") if req.dram_budget is None else req.dram_budget - kv_bytes["host"] - window
    if req.expert_cache:
        caps["host"] -= req.expert_cache_min_bytes
    used: dict[Tier, int] = {"device": 0, "host": 0}
    order: list[Tier] = ["device", "host"] if has_device else ["host"]
    placement: dict[str, Tier] = {}
    held = req.resident_sizes or {}
    rsize = lambda n: held.get(n, sizes[n])  # noqa: E731
    for kind, names in groups:
        need = sum(rsize(n) for n in names)
        tier: Tier = "storage"
        for t in order:
            # Small tensors (norms, routers) are always resident: the budget check reports them.
            if used[t] + need <= caps[t] or (kind == "small" and t == order[-1]):
                tier = t
                break
        for n in names:
            placement[n] = tier
        if tier != "storage":
            used[tier] += need
        elif req.streamed_unit == "tensor" and kind in ("attention", "ffn", "shared_expert"):
            # The whole group does not fit: keep what does of it, tensor by tensor, so the budget
            # left over from whole groups (up to a group's size) still saves reads.
            for n in names:
                for t in order:
                    if used[t] + rsize(n) <= caps[t]:
                        placement[n] = t
                        used[t] += rsize(n)
                        break
    return placement, used


def _bytes_per_token(cfg: ModelConfig, sizes: dict[str, int], placement: dict[str, Tier], has_device: bool) -> dict[str, int]:
    """Bytes each tier supplies per decoded token. MoE: only the routed experts are touched
    (k of E per layer; the expected share of them that is not resident comes from storage)."""
    frac_expert = (cfg.num_experts_per_tok / cfg.num_experts) if cfg.num_experts else 1.0
    out = {"device": 0, "host": 0, "storage": 0, "host_to_device": 0}
    row_bytes = sizes[EMBED] // cfg.vocab_size
    out["storage"] += row_bytes
    head = output_head(cfg, sizes)
    for name, size in sizes.items():
        if name == EMBED and head != EMBED:
            continue
        tier = placement.get(name, "storage")
        share = frac_expert if ".experts." in name else 1.0
        touched = int(size * share)
        if tier == "storage":
            out["storage"] += touched
            if has_device:
                out["host_to_device"] += touched
        elif tier == "host":
            if has_device:
                out["host_to_device"] += touched
            else:
                out["host"] += touched
        else:
            out["device"] += touched
    return out
