"""Sparse FFN from flash ("LLM in a flash"): a weight accessor that reads only predicted neurons.

:class:`SparseFFNWeights` composes :class:`~flashtier.runtime.weights.paged.PagedWeights` with the
same plan as dense streaming under the same ``--dram-budget``: everything resident there stays
resident, and every dense FFN layer the plan streams becomes a *sparse layer*, served by
``ffn(layer, x)`` from the row-column bundles (``checkpoint/bundles.py``) instead:

* decode (one-token groups: one sequence, or several decoded in one pass): the layer's low-rank
  predictor (``prefetch/sparsity.py``) names each row's neurons likely to be positive; the
  layer's :class:`~flashtier.prefetch.windowing.NeuronWindow` keeps the neurons used in the last
  k tokens and is told the union of the rows' selections (each bundle read once for the pass);
  the missing ones are read (coalesced runs, straight into the rows of the layer's preallocated
  matrix). Each row is then computed over **its own selection only, in neuron order**:
  ``down_S^T (relu(gate_S x) * (up_S x))``. The native kernel (``native/sparse_ffn.c``) reads
  the rows where they are and sums each output column over the neurons one after the other in
  fp32; without it the rows of S are gathered into a chunk buffer and multiplied by torch,
  ``prefill_chunk_neurons`` at a time (partial sums added in fp32). A row's output is thus a
  function of its input and its selection alone: the same alone, in any batch, and whatever
  earlier tokens left in the window (batch and history invariance). Neurons of the union the
  window has no room for (capacity) are read into a chunk buffer without being kept
  ("overflow"): once per step for every row by the native path, per row by the torch path;
* prefill (groups of several tokens): the layer is computed exactly from its bundles, read in
  chunks of ``prefill_chunk_neurons`` (two buffers, the next chunk reads while this one computes).

Budget: the part of the plan's streaming window that PagedWeights no longer needs pays for the
predictors, the two prefill buffers and the window matrices (the rest sets the window capacity).
Approximation is opt-in: only with ``--sparse-ffn`` does the engine build this accessor.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from flashtier.errors import BudgetError, CheckpointError, ConfigError
from flashtier.prefetch.sparsity import NeuronSelector, PredictorSet, recall_of
from flashtier.prefetch.windowing import NeuronWindow, RowMatrix, WindowConfig
from flashtier.tiers.config import ArenaConfig
from flashtier.tiers.host import HOST_ALIGNMENT
from flashtier.checkpoint.folder import Checkpoint, layer_names, read_tensor
from flashtier.runtime.options import SparseFFNConfig
from flashtier.runtime.weights.paged import PagedWeights, resident_sizes
from flashtier.runtime.planner import PlanRequest, make_plan
from flashtier.storage_backends.batched_reads import BatchedReadConfig
from flashtier.checkpoint.bundles import (
    BundleReader,
    PendingRead,
    layer_views,
    model_fingerprint,
    open_bundles,
    torch_dtype,
)
from flashtier.storage_backends.verified import VerifiedRecord


try:  # the C extension is optional: without it each row's neurons are gathered and multiplied by torch
    from flashtier._native import sparse_ffn_rows as _native_rows
except ImportError:  # pragma: no cover - depends on the build
    _native_rows = None

WINDOW_ARENA = "ffn_windows"
"""The weights' store arena of the neuron windows and prefill chunk buffers."""


@dataclass
class _Counters:
    decode_tokens: int = 0
    decode_storage_bytes: int = 0
    decode_ffn_bytes: int = 0
    prefill_tokens: int = 0
    loaded: int = 0
    selected: int = 0
    computed: int = 0
    overflow: int = 0
    spec_loaded: int = 0
    spec_wait_s: float = 0.0
    spec_used: int = 0
    layer_steps: int = 0
    read_s: float = 0.0
    read_bytes: int = 0
    reads: int = 0
    recall_hit: int = 0
    recall_total: int = 0


class _SparseLayer:
    """One sparse layer: its predictor, window bookkeeping and matrix of bundle rows."""

    def __init__(self, layer: int, selector: NeuronSelector, window: NeuronWindow, matrix: RowMatrix,
                 norm: str) -> None:
        self.layer = layer
        self.selector = selector
        self.window = window
        self.matrix = matrix
        self.norm = norm
        """Name of the layer's post-attention RMSNorm weight (the speculative guess norms with it)."""
        self.gate_audit: torch.Tensor | None = None  # [I, H] only with audit
        self.speculative: tuple[PendingRead | None, np.ndarray] | None = None
        """Reads of this token's guess in flight, and the guessed neurons loaded."""


class SparseFFNWeights:
    """A :class:`~flashtier.runtime.weights.base.WeightAccessor` with sparse FFN layers (module doc)."""

    def __init__(self, checkpoint: Checkpoint, dram_budget: int, compute_dtype: torch.dtype | None = None,
                 kv_tokens: int = 4096, config: SparseFFNConfig = SparseFFNConfig(),
                 selectors: Mapping[int, NeuronSelector] | None = None, verified_record: str | None = None,
                 direct_io: str = "auto", kv_block_size: int | None = None, kv_sequences: int = 1,
                 huge_pages: bool = True) -> None:
        """``huge_pages``: the weights' store on transparent huge pages; ``selectors`` overrides the predictors loaded from the model folder (tests, ablations);
        ``verified_record``: see ``EngineConfig.verified_record`` (bundle files checked once);
        ``direct_io``: O_DIRECT mode of the weights PagedWeights streams (bundles use O_DIRECT where
        the filesystem takes 512-byte reads, else buffered reads dropped from the page cache);
        ``kv_block_size``, ``kv_sequences``: the full-attention KV of ``kv_sequences`` contexts in the
        store, as :class:`PagedWeights` plans it (a batch's sequences draw from it)."""
        cfg = checkpoint.config
        if cfg.hidden_act != "relu":
            raise ConfigError(f"--sparse-ffn needs a ReLU FFN (most neurons exactly zero); {checkpoint.model_dir} "
                              f"uses {cfg.hidden_act!r}")
        self.config = config
        self.checkpoint = checkpoint
        self.compute_dtype = compute_dtype or checkpoint.weights_dtype
        self.manifest = open_bundles(checkpoint, verify=config.verify, record=VerifiedRecord(verified_record))
        # The same request PagedWeights makes: which dense FFN layers does dense streaming stream?
        sizes = {n: t.nbytes for n, t in checkpoint.tensors.items()}
        sequences = kv_sequences if kv_block_size is not None else 1
        plan = make_plan(cfg, sizes, PlanRequest(dram_budget=dram_budget, context=kv_tokens * sequences,
                                                 resident_sizes=resident_sizes(checkpoint, self.compute_dtype),
                                                 kv_dtype_bytes=self.compute_dtype.itemsize, weight_dtype_bytes=2,
                                                 streamed_unit="layer"))
        names = {i: layer_names(cfg, i) for i in range(cfg.num_layers)}
        sparse = [i for i, n in names.items() if n.gate and plan.placement.get(n.gate) == "storage"]
        external = frozenset(x for i in sparse for x in (names[i].gate, names[i].up, names[i].down))
        self.paged = PagedWeights(checkpoint, dram_budget, self.compute_dtype, kv_tokens=kv_tokens,
                                  direct_io=direct_io, external=external, streamed_unit="layer",
                                  verified_record=verified_record, kv_block_size=kv_block_size,
                                  kv_sequences=kv_sequences, huge_pages=huge_pages)
        try:
            if any(self.paged.plan.placement.get(x) != "storage" for x in external):
                raise CheckpointError("internal: the sparse FFN's plan differs from PagedWeights'; keep their requests equal")
            selectors = self._selectors(sparse, selectors)
            self.reader = BundleReader(checkpoint.model_dir, self.manifest, BatchedReadConfig(config.queue_depth))
        except BaseException:
            self.paged.close()
            raise
        predictor_bytes = sum(getattr(selectors[i], "nbytes", 0) for i in sparse)
        row = self.reader.row_bytes
        neurons = cfg.intermediate_size
        chunk = min(config.prefill_chunk_neurons, neurons)
        # each window and chunk buffer is a page of the window arena, rounded up to the host block
        # alignment: leave that slack out of the rows so the arena stays within the plan's share
        align = lambda n: -(-n // HOST_ALIGNMENT) * HOST_ALIGNMENT
        free = (self.paged.external_window_bytes - predictor_bytes - 2 * align(chunk * row)
                - len(sparse) * (HOST_ALIGNMENT - 1))
        demand = {i: float(getattr(selectors[i], "metrics", {}).get("predicted_fraction", 1.0)) for i in sparse}
        self.capacities = split_rows(max(0, free) // row, demand, int(neurons * config.max_capacity_fraction))
        if sparse and min(self.capacities.values()) < 1:
            self.close()
            raise BudgetError(
                f"--dram-budget leaves {max(free, 0)} bytes for the sparse FFN's neuron windows after "
                f"{predictor_bytes} bytes of predictors; raise it by at least {row * len(sparse) - free} bytes")
        # The windows and the prefill chunk buffers are working pages of one arena of the weights'
        # store (the share of the budget the plan left beside the streamed layers): the store's
        # statistics and memory report count them with every other page.
        sizes = {("ffn_window", i): self.capacities[i] * row for i in sparse}
        sizes.update({("ffn_chunk", j): chunk * row for j in range(2 if sparse else 0)})
        store = self.paged.store
        if sizes:
            store.add_arena(ArenaConfig(WINDOW_ARENA, sum(align(n) for n in sizes.values())))
        matrix = lambda key, rows: RowMatrix(rows, row, store.reserve(key, rows * row, WINDOW_ARENA))
        self.layers: dict[int, _SparseLayer] = {}
        for i in sparse:
            cap = self.capacities[i]
            self.layers[i] = _SparseLayer(i, selectors[i], NeuronWindow(neurons, WindowConfig(config.window_k, cap)),
                                          matrix(("ffn_window", i), cap), names[i].post_attn_norm)
            if config.audit:
                self.layers[i].gate_audit = read_tensor(checkpoint.tensors[names[i].gate]).float()
        self._chunks = [matrix(("ffn_chunk", j), chunk) for j in range(2)] if sparse else []
        self._bundle_dtype = torch_dtype(self.manifest)
        self._native = _native_rows is not None and self._bundle_dtype in (torch.float32, torch.bfloat16) and \
            config.native
        """Decode rows through the native kernel (else gathered per row and multiplied by torch)."""
        # what the window arena holds (each matrix rounded up to the host block alignment)
        self.memory_bytes = predictor_bytes + (store.stats([WINDOW_ARENA]).tiers["host"].capacity_bytes if sizes else 0)
        self._c = _Counters()
        self._pass_tokens = 0
        self._pass_groups: list[int] = []
        """Tokens of each group of the current pass (known once a sparse layer ran)."""
        self._pass_start_bytes = self._storage_bytes()

    def _selectors(self, sparse: list[int], given: Mapping[int, NeuronSelector] | None) -> Mapping[int, NeuronSelector]:
        """The given selectors, or the model folder's calibrated predictors in the compute dtype
        (then ``calibration_recall`` is their mean held-out recall)."""
        self.calibration_recall = float("nan")
        if given is not None or not sparse:
            return given or {}
        predictors = PredictorSet.load(self.checkpoint.model_dir, model_fingerprint(self.checkpoint))
        missing = [i for i in sparse if i not in predictors.layers]
        if missing:
            raise CheckpointError(f"{self.checkpoint.model_dir}: no predictor for layer(s) {missing}; "
                                  "re-run `flashtier calibrate`")
        self.calibration_recall = float(np.mean([predictors.layers[i].metrics.get("recall", float("nan")) for i in sparse]))
        return {i: predictors.layers[i].cast(self.compute_dtype) for i in sparse}

    # ---------------------------------------------------------------- accessor protocol
    def get(self, name: str) -> torch.Tensor:
        return self.paged.get(name)

    def resident(self, name: str) -> bool:
        return self.paged.resident(name)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.paged.embed(tokens)

    def layer_begin(self, layer: int, hidden: torch.Tensor) -> None:
        self._pass_tokens = hidden.shape[0]
        self.paged.layer_begin(layer, hidden)
        sl = self.layers.get(layer)
        if sl is not None and self.config.speculate and hidden.shape[0] == 1:
            try:
                self._speculate(sl, hidden)
            except BaseException:
                self._settle(sl)
                raise

    def done(self, names: tuple[str, ...]) -> None:
        self.paged.done(names)

    def route(self, layer: int, experts: list[int], hidden: torch.Tensor) -> None:
        self.paged.route(layer, experts, hidden)  # MoE layers only; sparse layers are dense

    def layer_end(self, layer: int) -> None:
        self.paged.layer_end(layer)

    def step_end(self) -> None:
        self.paged.step_end()
        now = self._storage_bytes()
        groups = self._pass_groups or [self._pass_tokens]
        if max(groups) == 1:  # a decode pass (one or several one-token rows)
            self._c.decode_tokens += len(groups)
            self._c.decode_storage_bytes += now - self._pass_start_bytes
        else:
            self._c.prefill_tokens += sum(groups)
        self._pass_start_bytes = now
        self._pass_groups = []

    def abort(self) -> None:
        self.paged.abort()
        for sl in self.layers.values():
            self._settle(sl)
        self._pass_start_bytes = self._storage_bytes()
        self._pass_groups = []

    def _settle(self, sl: _SparseLayer) -> None:
        """Wait out a speculative read (no IO may write into the rows afterwards) and forget the
        layer's window (its rows may be half-read)."""
        if sl.speculative is not None and sl.speculative[0] is not None:
            try:
                sl.speculative[0].wait()
            except BaseException:
                pass  # the pass already failed; its error is the one reported
        sl.speculative = None
        sl.window.reset()

    def computes_ffn(self, layer: int) -> bool:
        return layer in self.layers

    def ffn(self, layer: int, xs: list[torch.Tensor]) -> list[torch.Tensor] | None:
        sl = self.layers.get(layer)
        if sl is None:
            return None  # resident layer: the dense forward with get()
        self._pass_groups = [x.shape[0] for x in xs]
        try:
            outs: list[torch.Tensor | None] = [None] * len(xs)
            rows = [b for b, x in enumerate(xs) if x.shape[0] == 1]
            if rows:
                for b, y in zip(rows, self._decode(sl, [xs[b] for b in rows])):
                    outs[b] = y
            chunks = [b for b, x in enumerate(xs) if x.shape[0] > 1]
            if chunks:  # prompt chunks: each bundle read once for all of them
                for b, y in zip(chunks, self._prefill(sl, [xs[b] for b in chunks])):
                    outs[b] = y
            return outs  # type: ignore[return-value]
        except BaseException:
            self._settle(sl)  # rows may be half-read: forget them
            raise

    # ---------------------------------------------------------------- the sparse layer
    def _speculate(self, sl: _SparseLayer, hidden: torch.Tensor) -> None:
        """Guess this token's neurons from the layer input and start reading them (background)."""
        from flashtier.runtime.model import rms_norm

        guess_x = rms_norm(hidden, self.paged.get(sl.norm), self.checkpoint.config.rms_norm_eps)  # [1, H]
        guess = sl.selector.select(guess_x, self.config.threshold_offset)
        plan = sl.window.plan(guess, tentative=True)
        sl.matrix.apply(plan)
        pending = None
        if plan.loads.size:
            pending = self.reader.submit(sl.layer, plan.loads, sl.matrix.rows(plan.rows_start, plan.n), background=True)
        sl.speculative = (pending, plan.loads)

    def _decode(self, sl: _SparseLayer, rows: list[torch.Tensor]) -> list[torch.Tensor]:
        """One-token rows ``[1, H]`` each: the window takes the union of their selections (read
        once), then each row is computed over its own selection (module doc)."""
        c = self._c
        chosen = [sl.selector.select(x, self.config.threshold_offset) for x in rows]  # [m_b] ids, best first
        needed = chosen[0] if len(chosen) == 1 else union_by_rank(chosen)
        if sl.speculative is not None:  # set up by layer_begin for a one-row pass only
            pending, guessed = sl.speculative
            sl.speculative = None
            if pending is not None:
                t0 = time.perf_counter()
                self._account_read(pending, pending.wait())  # before any row moves
                c.spec_wait_s += time.perf_counter() - t0
            c.spec_loaded += int(guessed.size)
            c.spec_used += int(np.isin(guessed, needed, assume_unique=True).sum())
            c.decode_ffn_bytes += int(guessed.size) * self.reader.row_bytes
            c.loaded += int(guessed.size)
            plan = sl.window.extend(needed)
        else:
            plan = sl.window.plan(needed)
        sl.matrix.apply(plan)
        if plan.loads.size:
            pending = self.reader.submit(sl.layer, plan.loads, sl.matrix.rows(plan.rows_start, plan.n))
            self._account_read(pending, pending.wait())
        c.loaded += int(plan.loads.size)
        c.decode_ffn_bytes += int(plan.loads.size) * self.reader.row_bytes
        ids = [np.sort(selected) for selected in chosen]
        if self._native:
            outs = self._native_decode(sl, rows, ids, np.sort(plan.dropped))
        else:
            outs = [self._own(sl, x, own) for x, own in zip(rows, ids)]
        for x, selected in zip(rows, chosen):
            c.layer_steps += 1
            c.selected += int(selected.size)
            c.computed += int(selected.size)
            if sl.gate_audit is not None:
                active = torch.nonzero((x.float() @ sl.gate_audit.t())[0] > 0).flatten().numpy()
                hit, total = recall_of(selected, active)
                c.recall_hit += hit
                c.recall_total += total
        return outs

    def _native_decode(self, sl: _SparseLayer, rows: list[torch.Tensor], ids: list[np.ndarray],
                       dropped: np.ndarray) -> list[torch.Tensor]:
        """Each row's FFN over its neurons ``ids[b]`` (ascending) by the native kernel, straight
        from the window's rows; the union's neurons the window had no room for (``dropped``,
        ascending) are read once for all rows into a chunk buffer, a chunk at a time, and each row
        takes its neurons up to the chunk's last one from the window and the buffer (in neuron
        order: the kernel's sums then do not depend on where the rows came from)."""
        c = self._c
        x = torch.cat(rows).float().contiguous()  # [B, H]
        acc = torch.zeros_like(x)  # [B, H] fp32
        buf = self._chunks[0]
        step = buf.capacity
        window = sl.matrix.array
        row_of = sl.window.row_of
        done = [0] * len(ids)  # per row: how many of its neurons are accumulated
        bounds = [(dropped[k : k + step], int(dropped[min(k + step, dropped.size) - 1]))
                  for k in range(0, dropped.size, step)]
        bounds.append((np.zeros(0, dtype=np.int64), self.checkpoint.config.intermediate_size))
        for part, last in bounds:
            if part.size:
                pending = self.reader.submit(sl.layer, part, buf.rows(0, part.size))
                self._account_read(pending, pending.wait())
                c.overflow += int(part.size)
                c.loaded += int(part.size)
                c.decode_ffn_bytes += int(part.size) * self.reader.row_bytes
            segs = []
            for b, own in enumerate(ids):
                stop = int(np.searchsorted(own, last, side="right"))
                seg = own[done[b] : stop]
                done[b] = stop
                where = row_of[seg]
                out_of_window = where < 0
                if out_of_window.any():  # in this chunk of the buffer
                    where = where.copy()
                    where[out_of_window] = -1 - np.searchsorted(part, seg[out_of_window])
                segs.append(where)
            ptr = np.zeros(len(segs) + 1, dtype=np.int64)
            ptr[1:] = np.cumsum([s.size for s in segs])
            if ptr[-1]:
                _native_rows(window, buf.array, self.reader.row_bytes, self.manifest.hidden_size,
                             self._bundle_dtype == torch.bfloat16, np.concatenate(segs).astype(np.int64, copy=False),
                             ptr, x.numpy(), acc.numpy(), len(ids), torch.get_num_threads())
        return [acc[b : b + 1].to(r.dtype) for b, r in enumerate(rows)]

    def _own(self, sl: _SparseLayer, x: torch.Tensor, ids: np.ndarray) -> torch.Tensor:
        """``[1, H]``: the FFN of row ``x`` over neurons ``ids`` (ascending), their rows gathered
        from the window (or read, where the window had no room) into a chunk buffer, a chunk of
        neurons at a time; a function of ``x`` and ``ids`` alone (module doc)."""
        buf = self._chunks[0]
        step = buf.capacity
        out: torch.Tensor | None = None
        for k in range(0, ids.size, step):
            part = ids[k : k + step]  # [m]
            m = part.size
            where = sl.window.row_of[part]  # window row of each, -1: not held
            held = where >= 0
            if held.all():
                torch.index_select(sl.matrix.tensor, 0, torch.from_numpy(where), out=buf.tensor[:m])
            else:
                pos = np.flatnonzero(held)
                buf.array[pos] = sl.matrix.array[where[pos]]
                self._read_missing(sl.layer, part, np.flatnonzero(~held), buf)
            gate, up, down_t = self._views(buf.tensor[:m])  # [m, H] each
            h = F.relu(F.linear(x, gate)) * F.linear(x, up)  # [1, m]
            y = h @ down_t  # [1, H]
            if ids.size <= step:
                return y
            out = y.float() if out is None else out + y.float()
        if out is None:  # nothing selected: this layer's FFN adds nothing
            return torch.zeros_like(x)
        return out.to(x.dtype)

    def _read_missing(self, layer: int, part: np.ndarray, missing: np.ndarray, buf: RowMatrix) -> None:
        """Read neurons ``part[missing]`` (positions ascending) into their rows of ``buf``: one
        submission per run of adjacent positions, all in flight together."""
        c = self._c
        breaks = np.flatnonzero(np.diff(missing) != 1) + 1
        pending = [self.reader.submit(layer, part[run], buf.rows(int(run[0]), int(run[-1]) + 1))
                   for run in np.split(missing, breaks)]
        for p in pending:
            self._account_read(p, p.wait())
        c.overflow += int(missing.size)
        c.loaded += int(missing.size)
        c.decode_ffn_bytes += int(missing.size) * self.reader.row_bytes

    def _prefill(self, sl: _SparseLayer, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Groups of several tokens ``[T_b, H]``: the exact FFN over all neurons."""
        neurons = self.checkpoint.config.intermediate_size
        outs = self._stream(sl.layer, np.arange(neurons, dtype=np.int64), xs)
        return [y.to(x.dtype) for x, y in zip(xs, outs)]

    def _stream(self, layer: int, neurons: np.ndarray, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Exact FFN contribution ``[T_b, H]`` (fp32) of ``neurons`` (sorted) for each group
        ``xs[b]``, read chunk by chunk into the two chunk buffers (the next chunk reads while this
        one computes) once for all groups; each group computes exactly what it would alone."""
        chunk = self._chunks[0].capacity
        parts = [neurons[k : k + chunk] for k in range(0, neurons.size, chunk)]
        outs = [torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32) for x in xs]  # [T_b, H] each

        def submit(k: int) -> PendingRead:
            return self.reader.submit(layer, parts[k], self._chunks[k % 2].rows(0, parts[k].size))

        pending = submit(0)
        for k, ids in enumerate(parts):
            nxt = submit(k + 1) if k + 1 < len(parts) else None
            self._account_read(pending, pending.wait())
            gate, up, down_t = self._views(self._chunks[k % 2].tensor[: ids.size])
            for x, out in zip(xs, outs):
                h = F.relu(F.linear(x, gate)) * F.linear(x, up)  # [T_b, m]
                out += (h @ down_t).float()
            if nxt is not None:
                pending = nxt
        return outs

    def _views(self, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        views = layer_views(rows, self.manifest, self._bundle_dtype)
        if self._bundle_dtype != self.compute_dtype:
            views = tuple(v.to(self.compute_dtype) for v in views)
        return views

    def _account_read(self, pending: PendingRead, seconds: float) -> None:
        """``seconds``: submission to completion of ``pending`` (its reads' time in flight)."""
        self._c.read_s += seconds
        self._c.read_bytes += pending.nbytes
        self._c.reads += pending.runs

    def _storage_bytes(self) -> int:
        return self.paged.stats()["bytes_read_storage"] + self.reader.io.stats().bytes_transferred

    # ---------------------------------------------------------------- reporting
    def stats(self) -> dict[str, Any]:
        c = self._c
        out = self.paged.stats()
        out["bytes_read_storage"] = self._storage_bytes()
        per_layer = max(1, c.layer_steps) * self.checkpoint.config.intermediate_size
        out.update({
            "sparse_ffn_layers": sorted(self.layers),
            "window_k": self.config.window_k,
            "window_capacity_rows": {str(i): c for i, c in self.capacities.items()},
            "sparse_ffn_memory_bytes": self.memory_bytes,
            "decode_tokens_counted": c.decode_tokens,
            "bytes_per_token_storage": round(c.decode_storage_bytes / max(1, c.decode_tokens), 1),
            "ffn_bytes_per_token_storage": round(c.decode_ffn_bytes / max(1, c.decode_tokens), 1),
            "ffn_neurons_loaded_fraction": round(c.loaded / per_layer, 5),
            "ffn_neurons_predicted_fraction": round(c.selected / per_layer, 5),
            "ffn_neurons_computed_fraction": round(c.computed / per_layer, 5),
            "ffn_neurons_overflow": c.overflow,
            "ffn_speculative_loads_fraction": round(c.spec_loaded / per_layer, 5),
            "ffn_speculative_loads_used": round(c.spec_used / c.spec_loaded, 4) if c.spec_loaded else None,
            "ffn_speculative_wait_s": round(c.spec_wait_s, 6),
            "ffn_bundle_reads": c.reads,
            "ffn_bundle_read_s": round(c.read_s, 6),
            "ffn_bundle_read_gb_per_s": round(c.read_bytes / c.read_s / 1e9, 4) if c.read_s else 0.0,
            "bundle_read_alignment": self.reader.alignment,
            "bundle_reads_direct_io": self.reader.io.direct_files,
        })
        if c.recall_total:
            out["predictor_recall"] = round(c.recall_hit / c.recall_total, 5)
            out["predictor_recall_source"] = "audit"
        else:
            out["predictor_recall"] = None if np.isnan(self.calibration_recall) else round(self.calibration_recall, 5)
            out["predictor_recall_source"] = "calibration"
        res = dict(out.get("resident_bytes", {}))
        res["sparse_ffn"] = self.memory_bytes
        out["resident_bytes"] = res
        return out

    def memory_report(self) -> dict[str, Any]:
        return self.stats()["resident_bytes"]

    def close(self) -> None:
        self.paged.close()
        self.reader.close()


def union_by_rank(chosen: list[np.ndarray]) -> np.ndarray:
    """The union of several rows' selections (each best first), ordered by rank: every row's best
    neuron, then every row's second best, ...; each neuron at its best rank (the window gives up
    the lowest-ranked ones first when it has no room)."""
    ids = np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)
    rank = np.concatenate([np.arange(a.size) for a in chosen]) if chosen else ids
    order = np.lexsort((np.concatenate([np.full(a.size, b) for b, a in enumerate(chosen)]), rank))
    ids = ids[order]
    _, first = np.unique(ids, return_index=True)
    return ids[np.sort(first)].astype(np.int64, copy=False)


def split_rows(total: int, demand: Mapping[int, float], cap: int) -> dict[int, int]:
    """Share ``total`` window rows among layers in proportion to ``demand`` (each layer's expected
    share of neurons selected per token), at most ``cap`` per layer; rows a capped layer cannot use
    go to the others."""
    rows = {i: 0 for i in demand}
    open_layers = dict(demand)
    left = total
    while left > 0 and open_layers:
        weight = sum(open_layers.values()) or float(len(open_layers))
        grant = {i: int(left * ((d / weight) if weight else 1 / len(open_layers)) + 1e-9) for i, d in open_layers.items()}
        if not any(grant.values()):  # fewer rows left than layers: one each, most demanding first
            for i in sorted(open_layers, key=lambda j: -open_layers[j])[:left]:
                grant[i] = 1
        for i, g in grant.items():
            take = min(g, cap - rows[i])
            rows[i] += take
            left -= take
            if rows[i] >= cap:
                del open_layers[i]
    return rows


def sparse_ffn_weights(checkpoint: Checkpoint, config: Any) -> SparseFFNWeights:
    """EngineConfig -> SparseFFNWeights (the factory the engine uses with ``--sparse-ffn``)."""
    from flashtier.runtime.units import DTYPES

    if config.dram_budget is None:
        raise ConfigError("--sparse-ffn needs --dram-budget: without a budget every FFN is resident and "
                          "nothing would be read from flash")
    dtype = DTYPES[config.compute_dtype] if config.compute_dtype else None
    kv_tokens = config.max_context or min(checkpoint.config.max_position_embeddings, 4096)
    return SparseFFNWeights(checkpoint, config.dram_budget, dtype, kv_tokens=kv_tokens,
                            config=config.sparse_ffn or SparseFFNConfig(), verified_record=config.verified_record,
                            direct_io=config.paging.direct_io,
                            kv_block_size=config.kv_block_size if config.attention == "full" else None,
                            kv_sequences=config.kv_sequences, huge_pages=config.paging.huge_pages)
