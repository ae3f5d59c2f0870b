"""Weights paged through the tiered store under a memory budget (the tiered-store issue).

The planner splits the checkpoint's tensors into a *resident* set (norms, routers, attention, the
output head, then whole FFN layers while they fit) and a *streamed* set. Resident tensors are read
once. Streamed tensors are pages of the :class:`~flashtier.tiers.store.TieredStore`, read with
O_DIRECT straight from the safetensors file (no conversion needed): in a dense forward they are
used in a fixed cyclic order, so the accessor keeps the store's window full with the next pages of
that cycle ("layer-ahead" prefetch whose depth is whatever the budget left holds) and releases
each page when its layer ends. MoE experts are streamed on demand (or named by an expert
predictor, see ``prefetch/``). The embedding table is never resident: rows are read per token.

Budget contract: resident bytes + the store's window (``plan.stream_window_bytes``) + KV <=
``dram_budget``; the process adds a fixed runtime overhead (Python, torch, activations) on top,
stated in the README.
"""

from __future__ import annotations

import math
import os
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
from flashtier.errors import BudgetError, CheckpointError, ConfigError, IntegrityError
from flashtier.checkpoint.folder import EMBED, Checkpoint, layer_names, read_tensor
from flashtier.checkpoint.ggml_types import GGMLType
from flashtier.runtime.quantized import QuantizedTensor, as_weight, page_format, to_compute
from flashtier.runtime.planner import (
    Bandwidths,
    Plan,
    PlanRequest,
    StreamedUnit,
    kv_bytes_per_token,
    make_plan,
)
from flashtier.storage_backends.atomic import crc32_of_range
from flashtier.storage_backends.base import StorageBackend
from flashtier.storage_backends.checksummed import ChecksummedBackend
from flashtier.storage_backends.compressed import CompressedBackend
from flashtier.storage_backends.compressed_layout import CompressedIndex, load_index
from flashtier.storage_backends.direct_file import DirectFileBackend, DirectFileConfig
from flashtier.storage_backends.safetensors_format import TensorInfo
from flashtier.storage_backends.verified import VerifiedRecord
from flashtier.tiers.config import ArenaConfig, StoreConfig
from flashtier.tiers.jobs import TransferJob
from flashtier.tiers.device import DEVICE_ALIGNMENT
from flashtier.tiers.page import PageDesc, PageSource
from flashtier.runtime.kv.cache import KV_BLOCKS_ARENA
from flashtier.tiers.manager import DEFAULT_ARENA
from flashtier.tiers.store import TieredStore

COMPRESSED_MODES = ("auto", "on", "off")
TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


class PagedWeights:
    """A :class:`~flashtier.runtime.weights.base.WeightAccessor` over a tiered store (see module doc).

    With a device budget (``device_budget > 0``) the model computes on ``device`` ('cuda[:n]', or
    'cpu': the device tier's stand-in in host memory, which runs the same placement and transfer
    schedule on machines without a GPU): the planner fills the device first (norms, attention,
    output head, then whole layers: working pages of the ``resident`` arena's device pool), then
    the host (pages *held* in the default arena's pinned host pool: never read from storage
    again), and streams the rest from storage; every page that is not on the device is copied
    into the default arena's device window at its use, layer-ahead, on the copy thread (a CUDA
    stream with events on a GPU). Pages handed to the forward are device tensors."""

    def __init__(self, checkpoint: Checkpoint, dram_budget: int, compute_dtype: torch.dtype | None = None,
                 kv_tokens: int = 4096, bandwidths: Bandwidths = Bandwidths(), device_budget: int = 0,
                 direct_io: str = "auto", host_policy: str = "lru",
                 progress: Callable[[int, int], None] | None = None,
                 external: frozenset[str] = frozenset(), expert_cache_min_bytes: int | None = None,
                 streamed_unit: StreamedUnit = "tensor", compressed: str = "auto",
                 verified_record: str | None = None, kv_block_size: int | None = None,
                 kv_sequences: int = 1, device: str | torch.device = "cpu", attention: str = "full",
                 resident_kv_tokens: int = 4 + 512, huge_pages: bool = True) -> None:
        """``external``: streamed tensors another component serves (e.g. FFN neurons read from
        row-column bundles by the sparse FFN): they are neither read nor prefetched here, and the
        store's window shrinks to what the remaining streamed tensors need; ``external_window_bytes``
        is the part of the plan's window left to that component. ``compressed``: read streamed
        tensors from the checkpoint's compressed side files (``flashtier compress``): 'auto' when
        they exist, 'on' (an error without them), 'off'. ``expert_cache_min_bytes``: plan
        MoE experts for a per-layer expert cache of at least that many bytes instead of placing
        them (``plan.expert_cache_bytes``; the expert cache pages them, see ``expert_weights``).
        ``kv_block_size``: the full-attention KV caches of this model keep their blocks in the
        store's ``kv.blocks`` arena, budgeted at the plan's KV share (``kv_sequences`` sequences
        of ``kv_tokens`` positions, each rounded up to whole blocks of that size) and shared by
        every cache (a batch's sequences draw from it); None = no such arena (retrieval attention
        keeps its own). ``device``: where the model computes when ``device_budget`` > 0 (see the
        class doc); ``dram_budget`` None then means unlimited host memory."""
        self.checkpoint = checkpoint
        cfg = self.config = checkpoint.config
        has_device = device_budget > 0
        self.device = torch.device(device) if has_device else torch.device("cpu")
        """Where the model computes: the device tier's device, else the CPU."""
        if dram_budget is None and not has_device:
            raise BudgetError("paged weights need --dram-budget (or a --device-budget)")
        self.compute_dtype = compute_dtype or checkpoint.weights_dtype
        self.compressed_index = _compressed_index(checkpoint, compressed)
        sizes = {n: t.nbytes for n, t in checkpoint.tensors.items()}
        sequences = kv_sequences if kv_block_size is not None else 1
        # With a device, retrieval attention keeps only sinks + the window there (the plan says so);
        # on the CPU its KV has its own budget (--kv-dram-budget) and the plan keeps the old share.
        req = PlanRequest(dram_budget=dram_budget, device_budget=device_budget, context=kv_tokens * sequences,
                          attention="retrieval" if has_device and attention == "retrieval" else "full",
                          resident_kv_tokens=resident_kv_tokens,
                          resident_sizes=resident_sizes(checkpoint, self.compute_dtype),
                          kv_dtype_bytes=self.compute_dtype.itemsize, weight_dtype_bytes=2,
                          expert_cache=expert_cache_min_bytes is not None,
                          expert_cache_min_bytes=expert_cache_min_bytes or 0,
                          streamed_unit=streamed_unit,
                          storage_fraction=self.compressed_index.stored_fraction() if self.compressed_index else 1.0)
        self.plan: Plan = make_plan(cfg, sizes, req, bandwidths)
        plan = self.plan
        device_need = plan.resident_bytes["device"] + plan.kv_bytes["device"] + plan.stream_window_bytes
        if has_device and not plan.fits and device_need <= device_budget:
            raise BudgetError(f"--dram-budget {dram_budget} is below what this plan keeps in host memory "
                              f"({plan.resident_bytes['host'] + plan.stream_window_bytes + plan.expert_reserve_bytes} "
                              "bytes: weights held there, the staging window, the expert caches' minimum); "
                              "raise --dram-budget or --device-budget")
        full_kv_on_host = kv_block_size is not None and plan.kv_bytes["host"] > 0  # read over the link: not built
        if has_device and (not plan.fits or full_kv_on_host):
            kv = kv_tokens * sequences * kv_bytes_per_token(cfg, self.compute_dtype.itemsize)
            raise BudgetError(f"--device-budget {device_budget} cannot hold the KV cache of {kv_tokens * sequences} "
                              f"positions ({kv} bytes) and the window the weights are copied through "
                              f"({self.plan.stream_window_bytes} bytes); raise --device-budget or lower --max-context")
        self._resident: dict[str, torch.Tensor] = {}
        head = checkpoint.lm_head  # with tied embeddings the table is also the output head
        # With a device, the plan's host weights are pages held in host memory and copied to the
        # device at each use (they pass through the device window as streamed pages do).
        paged_tiers = ("storage", "host") if has_device else ("storage",)
        streamed = [n for n, t in self.plan.placement.items()
                    if t in paged_tiers and (n != EMBED or n == head) and n not in external and n in checkpoint.tensors]
        held = [n for n in streamed if self.plan.placement[n] == "host"]
        resident = [n for n, t in self.plan.placement.items()
                    if t not in paged_tiers and n in checkpoint.tensors and n not in external]

        window = self.plan.stream_window_bytes
        if external:
            window = _window_for(checkpoint, streamed, self.plan)
        self.external_window_bytes = self.plan.stream_window_bytes - window
        # With a compressed copy the IO threads also decode what they read: twice as many threads
        # keep reads going while others decode (measured 1.47 -> 2.09 GB/s of weights restored).
        depth = 8 if self.compressed_index is not None else 4
        self.backend: StorageBackend = DirectFileBackend(DirectFileConfig(queue_depth=depth, direct_io=direct_io))  # type: ignore[arg-type]
        if self.compressed_index is not None:
            self.backend = CompressedBackend(self.backend, self.compressed_index, owns_inner=True,
                                             **self._compressed_read_options())
        # Files that record a crc32 per tensor (GGUF files flashtier wrote): every streamed tensor
        # is checked on its first read, on the IO thread that read it.
        checks = {(str(i.path), i.offset, i.nbytes): (i.crc32, f"tensor {n}") for n, i in checkpoint.tensors.items()
                  if i.crc32 is not None and n in streamed}
        kv_limit = kv_rounding = 0
        if kv_block_size is not None and not has_device:
            kv_limit = sequences * -(-kv_tokens // kv_block_size) * kv_block_size * \
                kv_bytes_per_token(cfg, self.compute_dtype.itemsize)
            kv_rounding = max(0, kv_limit - self.plan.kv_bytes["host"])
        # Held pages take their O_DIRECT spans, rounded to the host pool's blocks.
        held_bytes = sum(_round_up(self.backend.plan(checkpoint.tensors[n].offset, checkpoint.tensors[n].nbytes).span,
                                   HOST_BLOCK) for n in held)
        host_window = window if streamed else max(window, 4096)  # an idle store: one block
        tier_budget = None if dram_budget is None else max(dram_budget, window) + _alignment_slack(len(resident)) + \
            kv_rounding + held_bytes - sum(checkpoint.tensors[n].nbytes for n in held)
        self.store = TieredStore(
            StoreConfig(host_budget=host_window + held_bytes,
                        device_budget=window if has_device else 0, host_policy=host_policy,
                        device=self.device.type,  # type: ignore[arg-type]
                        storage_gb_per_s=bandwidths.disk / 1e9,
                        # one host budget for every arena of this store (streamed and resident weights,
                        # expert caches, neuron windows; the KV arena adds --kv-dram-budget): the
                        # planner's shares, plus the block alignment they round to
                        host_tier_budget=tier_budget, huge_pages=huge_pages),
            ChecksummedBackend(self.backend, checks) if checks else self.backend)
        self._descs: dict[str, PageDesc] = {}
        for name in streamed:
            info = checkpoint.tensors[name]
            self._descs[name] = PageDesc(name, PageSource(str(info.path), info.offset, info.nbytes), *page_format(info))
        try:
            self._load_resident(resident, progress, "device" if has_device else "host")
            if kv_limit:
                self.store.add_heap_arena(KV_BLOCKS_ARENA, kv_limit, zeroed=False)
            self.store.register_many(self._descs.values())
            if held:
                self.store.hold(held, "host")  # read once now; copied to the device at each use
        except BaseException:
            self.store.close()
            self.backend.close()
            raise
        # The order in which a forward pass uses the streamed (non-expert) pages: the cycle.
        self._cycle = [n for n in self._forward_order() if n in self._descs and ".experts." not in n]
        self._cursor = 0  # next index of the cycle to prefetch
        self._ahead: deque[str] = deque()  # prefetched, not yet used, in cycle order
        self._jobs: dict[str, TransferJob] = {}  # with a device: the last prefetch job of each page ahead
        self._in_use: list[str] = []
        self._embed_info = checkpoint.tensors[EMBED]
        self._embed_fd = os.open(self._embed_info.path, os.O_RDONLY)
        if self._embed_info.crc32 is not None and EMBED not in self._resident:
            # Rows are read one by one (no per-read check): the table is checked once, or not at all
            # when the record says it passed on this very file before.
            record = VerifiedRecord(verified_record)
            what = f"tensor {EMBED} at {self._embed_info.offset}"
            if not record.verified(what, [self._embed_info.path]):
                _verify_extent(self._embed_fd, self._embed_info)
                record.mark(what, [self._embed_info.path])
        self._lock = threading.Lock()
        self._counters = {"embedding_bytes_read": 0}
        self._top_up()

    # ---------------------------------------------------------------- accessor protocol
    def get(self, name: str) -> torch.Tensor:
        t = self._resident.get(name)
        if t is not None:
            return t
        if name not in self._descs:
            raise CheckpointError(f"tensor {name!r} is neither resident nor a page; the plan is inconsistent")
        self._jobs.pop(name, None)
        if self._ahead and self._ahead[0] == name:
            self._ahead.popleft()
        elif not self._ahead and self._cycle and self._cycle[self._cursor] == name:
            # used before its prefetch was issued (no room then): the cycle moves past it, else it
            # would be prefetched now and wait at the head of the queue for a whole cycle, out of step
            self._cursor = (self._cursor + 1) % len(self._cycle)
        tensor = self.store.acquire(name)
        self._in_use.append(name)
        return as_weight(tensor, self.checkpoint.tensors[name], self.compute_dtype)

    def resident(self, name: str) -> bool:
        return name in self._resident

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        info = self._embed_info
        row = info.nbytes // info.shape[0]
        out = torch.empty((tokens.shape[0], row), dtype=torch.uint8)  # [T, bytes of a row]
        buf = out.numpy()
        for i, tok in enumerate(tokens.tolist()):
            off = info.offset + tok * row
            n = os.preadv(self._embed_fd, [memoryview(buf[i])], off)
            if n != row:
                raise CheckpointError(f"{info.path}: short read of embedding row {tok} ({n} of {row} bytes)")
            os.posix_fadvise(self._embed_fd, off, row, os.POSIX_FADV_DONTNEED)
        self._counters["embedding_bytes_read"] += row * tokens.shape[0]
        if info.quantized:
            rows = QuantizedTensor.from_bytes(out, GGMLType(info.ggml_type), (tokens.shape[0], info.shape[1]))
            return rows.dequantize(self.compute_dtype).to(self.device)
        return out.view(TORCH_DTYPES[info.dtype]).to(self.device, self.compute_dtype)

    def layer_begin(self, layer: int, hidden: torch.Tensor) -> None:
        self._top_up()

    def ffn(self, layer: int, xs: list[torch.Tensor]) -> list[torch.Tensor] | None:
        return None

    def computes_ffn(self, layer: int) -> bool:
        return False

    def route(self, layer: int, experts: list[int], hidden: torch.Tensor) -> None:
        return None  # experts are streamed on demand here; runtime/weights/experts.py reads ahead

    def done(self, names: tuple[str, ...]) -> None:
        released = False
        for name in names:
            if name in self._in_use:
                self._in_use.remove(name)
                self.store.release(name)
                released = True
        if released:
            self._top_up()  # the room just freed takes the next page of the cycle at once

    def layer_end(self, layer: int) -> None:
        self._release_in_use()

    def step_end(self) -> None:
        self._release_in_use()

    def abort(self) -> None:
        """Release pages in use, withdraw prefetches, restart the cycle at the first layer."""
        for name in self._in_use:
            self.store.release(name)
        self._in_use.clear()
        for name in self._ahead:
            self.store.cancel_prefetch(name)
        self._ahead.clear()
        self._jobs.clear()
        self._cursor = 0
        self._top_up()

    def _release_in_use(self) -> None:
        for name in self._in_use:
            self.store.release(name)
        self._in_use.clear()
        self._top_up()

    def _top_up(self) -> None:
        """Prefetch the next pages of the cycle while the window has room (adaptive depth)."""
        n = len(self._cycle)
        device = self.store.compute_tier == "device"
        if device:
            # A prefetch stops at the host when the device window is full; carry the pages it
            # left there on to the device, in order, before announcing later ones (else a later
            # page would take the room, and the earlier one's demand would evict it: copied twice).
            # Pages whose job is still moving or reached the device are skipped without the lock.
            for name in self._ahead:
                job = self._jobs.get(name)
                if job is not None and (not job.done() or job.reached == "device"):
                    continue
                job = self.store.prefetch(name)
                if job is None:
                    return
                self._jobs[name] = job
        while n and len(self._ahead) < n - len(self._in_use):
            name = self._cycle[self._cursor]
            job = self.store.prefetch(name)
            if job is None:
                return  # no room yet: retry when pages are released
            if device:
                self._jobs[name] = job
            self._ahead.append(name)
            self._cursor = (self._cursor + 1) % n

    def _forward_order(self) -> list[str]:
        cfg = self.config
        order: list[str] = []
        for i in range(cfg.num_layers):
            n = layer_names(cfg, i)
            order += [n.q, n.k, n.v, n.o]
            if n.gate:
                order += [n.gate, n.up, n.down]
            if n.shared_gate:
                order += [n.shared_gate, n.shared_up, n.shared_down]
        order.append(self.checkpoint.lm_head)
        return order

    def _load_resident(self, names: list[str], progress: Callable[[int, int], None] | None,
                       tier: str = "host") -> None:
        """Read the weights the plan keeps in memory into working pages of the store's resident
        arena in ``tier`` (sized to them exactly, 64-byte aligned in the host pool, 256 in the
        device pool), so the store accounts every weight byte."""
        sizes = {n: _compute_nbytes(self.checkpoint.tensors[n], self.compute_dtype) for n in names}
        if not sizes:
            return
        if tier == "device":
            arena = ArenaConfig(RESIDENT_ARENA, HOST_BLOCK, sum(_round_up(n, DEVICE_ALIGNMENT) for n in sizes.values()))
        else:
            arena = ArenaConfig(RESIDENT_ARENA, sum(_round_up(n, RESIDENT_ALIGNMENT) for n in sizes.values()),
                                alignment=RESIDENT_ALIGNMENT)
        self.store.add_arena(arena)
        for i, name in enumerate(names):
            t = to_compute(read_tensor(self.checkpoint.tensors[name]), self.compute_dtype)
            page = self.store.reserve(("resident", name), sizes[name], RESIDENT_ARENA, tier)
            if isinstance(t, QuantizedTensor):
                page.copy_(t.data.reshape(-1))
                self._resident[name] = QuantizedTensor(page.view(t.data.shape), t.qtype, t.shape)
            else:
                weight = page.view(t.dtype).view(t.shape)
                weight.copy_(t)
                self._resident[name] = weight
            if progress is not None:
                progress(i + 1, len(names))

    # ---------------------------------------------------------------- reporting
    def stats(self) -> dict[str, Any]:
        s = self.store.stats([DEFAULT_ARENA])  # the streamed weights (subclasses' arenas count themselves)
        storage = s.tiers["storage"]
        host = s.tiers["host"]
        resident = sum(t.nbytes if isinstance(t, QuantizedTensor) else t.numel() * t.element_size()
                       for t in self._resident.values())
        # With compressed side files the store counts tensor bytes, the backend what the disk read.
        read = self.backend.stats().bytes_read if self.compressed_index is not None else storage.bytes_read
        on_device = self.device.type != "cpu" or "device" in s.tiers
        held = sum(self.checkpoint.tensors[n].nbytes for n, t in self.plan.placement.items()
                   if t == "host" and n in self._descs)
        out = {
            "bytes_read_storage": read + self._counters["embedding_bytes_read"],
            "io_wait_s": round(s.wait_s, 6),
            "resident_bytes": {"device": resident if on_device else 0, "host": held if on_device else resident,
                               "stream_window": self.plan.stream_window_bytes,
                               "storage": self.checkpoint.total_bytes()},
            "host_hits": host.hits,
            "host_misses": host.misses,
            "prefetches": s.prefetches,
            "late_prefetches": s.late,
            "streamed_tensors": len(self._descs),
            "plan_predicted_decode_tok_s": round(self.plan.predicted_decode_tok_s, 3),
            "direct_io": self.backend.stats().buffered_files == 0,
            "weights_at_rest": "compressed" if self.compressed_index is not None else "raw",
        }
        if "device" in s.tiers:
            out["bytes_host_to_device"] = s.tiers["device"].bytes_written
            out["device_hits"] = s.tiers["device"].hits
        if self.compressed_index is not None:
            assert isinstance(self.backend, CompressedBackend)
            out["compressed_stored_fraction"] = round(self.compressed_index.stored_fraction(), 4)
            out["weights_decoded_bytes"] = self.backend.decoded_bytes
            out["weights_decode_s"] = round(self.backend.decode_s, 4)
        return out

    def _compressed_read_options(self) -> dict[str, int]:
        """How the compressed copy is read: streamed weights are throughput-bound, so records go
        in reads of up to 8 MiB, 4 at a time (+15% on dense-1.7g under 1 GiB in three paired
        `generate` runs); subclasses whose reads
        are latency-bound override this."""
        return {"read_bytes": 8 << 20, "max_in_flight": 4}

    def memory_report(self) -> dict[str, Any]:
        return self.stats()["resident_bytes"]

    def close(self) -> None:
        for name in self._in_use:
            self.store.release(name)
        self._in_use.clear()
        self.store.close()
        self.backend.close()
        os.close(self._embed_fd)


RESIDENT_ARENA = "resident"
"""The weights' store arena of the weights kept in memory (working pages, never evicted)."""
RESIDENT_ALIGNMENT = 64
"""Block alignment of the resident arena: enough for any dtype and the kernels' vector loads, and
small, so that the arena's size is the planner's resident bytes to within 63 bytes per tensor."""


def resident_sizes(checkpoint: Checkpoint, compute_dtype: torch.dtype) -> dict[str, int]:
    """The tensors that take more bytes in memory than stored once ready to compute with (a bf16
    or f16 tensor computed in float32: twice), with those bytes, for the planner's placement (the
    stored size undercounted resident weights there: found in session 9 by the store's one-budget
    check)."""
    out = {}
    for n, t in checkpoint.tensors.items():
        held = _compute_nbytes(t, compute_dtype)
        if held > t.nbytes:
            out[n] = held
    return out


def _alignment_slack(resident_tensors: int) -> int:
    """Bytes the arenas may take beyond the planner's shares: the idle default arena's one block,
    the device-resident arena's one host block, and the resident arena's rounding (at most 63
    bytes per tensor)."""
    return 2 * HOST_BLOCK + RESIDENT_ALIGNMENT * resident_tensors


HOST_BLOCK = 4096
"""Alignment of the default arena's host blocks (O_DIRECT reads land in place)."""


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def _compute_nbytes(info: TensorInfo, compute_dtype: torch.dtype) -> int:
    """Bytes of tensor ``info`` once ready to compute with (:func:`to_compute`)."""
    return info.nbytes if info.quantized else math.prod(info.shape) * compute_dtype.itemsize


def _compressed_index(checkpoint: Checkpoint, mode: str) -> CompressedIndex | None:
    """The checkpoint's compressed side files per ``mode`` ('auto' / 'on' / 'off')."""
    if mode not in COMPRESSED_MODES:
        raise ConfigError(f"--compressed {mode!r} is unknown; choose one of {', '.join(COMPRESSED_MODES)}")
    if mode == "off":
        return None
    index = load_index(checkpoint.model_dir)
    if index is None and mode == "on":
        raise ConfigError(f"{checkpoint.model_dir} has no compressed weights; run `flashtier compress "
                          f"{checkpoint.model_dir}` first, or use --compressed auto")
    return index


def _window_for(checkpoint: Checkpoint, streamed: list[str], plan: Plan) -> int:
    """Store window for ``streamed`` alone: two of the largest per-layer groups (as the planner
    sizes it), at least one alignment block (the store needs a positive budget)."""
    from flashtier.runtime.planner import PAGE_SLACK

    groups: dict[str, int] = {}
    for name in streamed:
        key = name.split(".mlp.")[0].split(".self_attn.")[0] if name.startswith("model.layers.") else name
        groups[key] = groups.get(key, 0) + checkpoint.tensors[name].nbytes + PAGE_SLACK
    need = 2 * max(groups.values(), default=0)
    return min(plan.stream_window_bytes, max(need, 1 << 16))


def budget_options(checkpoint: Checkpoint, config: Any, what: str) -> dict[str, Any]:
    """The constructor arguments a budgeted accessor takes from an EngineConfig: ``dram_budget``,
    ``compute_dtype``, ``kv_tokens`` (the context planned for), ``device_budget``, ``direct_io``.
    ``what`` names the accessor in the error raised when no budget is set."""
    from flashtier.runtime.units import DTYPES

    if config.dram_budget is None and not config.device_budget:
        raise BudgetError(f"{what} need --dram-budget")
    return {"dram_budget": config.dram_budget,
            "compute_dtype": DTYPES[config.compute_dtype] if config.compute_dtype else None,
            "kv_tokens": config.max_context or min(checkpoint.config.max_position_embeddings, 4096),
            "device_budget": config.device_budget or 0,
            "direct_io": config.paging.direct_io,
            "compressed": config.paging.compressed,
            "huge_pages": config.paging.huge_pages,
            "verified_record": config.verified_record,
            "kv_block_size": config.kv_block_size if config.attention == "full" else None,
            "kv_sequences": config.kv_sequences,
            "device": config.device,
            "attention": config.attention,
            "resident_kv_tokens": _resident_kv_tokens(config)}


def _resident_kv_tokens(config: Any) -> int:
    """Positions retrieval attention keeps in its device tier (sinks + the ring), for the plan."""
    if config.attention != "retrieval":
        return 4 + 512
    from flashtier.runtime.kv.retrieval_config import RetrievalCacheConfig

    cache = RetrievalCacheConfig.from_engine(config.kv_block_size, config.prefill_chunk, config.retrieval.as_mapping())
    return cache.retrieval.sink_tokens + cache.ring_tokens


def paged_weights(checkpoint: Checkpoint, config: Any) -> PagedWeights:
    """EngineConfig -> PagedWeights (the factory the engine uses when a budget is set)."""
    return PagedWeights(checkpoint, **budget_options(checkpoint, config, "paged weights"))



def _verify_extent(fd: int, info: Any) -> None:
    """Check the crc32 recorded for tensor ``info`` by reading it once (pages dropped): for tensors
    read piecemeal (embedding rows), which no per-read check covers. IntegrityError naming the
    file and tensor on a mismatch."""
    crc, got = crc32_of_range(fd, info.offset, info.nbytes)
    if got != info.nbytes:
        raise CheckpointError(f"{info.path}: short read of tensor {info.name!r}; the file is truncated")
    if crc != info.crc32:
        raise IntegrityError(f"{info.path}: tensor {info.name!r} does not match its crc32; the file is corrupt or was "
                             "modified after it was written: write it again from the original")
