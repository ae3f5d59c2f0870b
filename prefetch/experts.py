"""Next-layer MoE expert prediction: which experts an MoE layer will route to, before it runs.

Two predictors, both scored online against what the layer then used (decode steps only):

  * ``router`` ("speculative expert loading"): layer j's own router, after layer j's own
    post-attention norm, applied to an earlier hidden state of the same token. The residual
    stream changes little from one layer to the next, so that state routes nearly as the real one
    will. Which state was measured on tiny-moe (``benchmarks/moe_prediction_study.py``, 256
    held-out tokens, layer j's top-2 found): the previous MoE layer's router input, i.e. its
    post-attention state (``state='post-attention'``, the default) 86.6%; the previous layer's
    input (``'layer-input'``, a whole layer of lead time) 71.5%; layer j's own input (only one
    attention block of lead) 88.1%; the affinity below 70.2%. The default keeps nearly all the
    accuracy and leaves the previous layer's expert compute plus layer j's attention as lead.
  * ``affinity``: counts of which expert of layer j followed which expert of the previous MoE
    layer in the same token; given that layer's actual choice, the experts that most often
    followed it. Known at the same moment (when the previous layer routes).

``mode='auto'`` issues, per layer, the predictor with the better recent recall (an exponential
average over decode steps); ties go to the router. The first MoE layer of a step has no earlier
state in the step: it is predicted from its own input. :class:`PrefetchGate` decides whether a
guess is worth reading at all.

The predictor names experts; it does not move bytes (the caller prefetches and cancels).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from flashtier.errors import ConfigError

MODES = ("router", "affinity", "auto", "off")
STATES = ("post-attention", "layer-input")


@dataclass(frozen=True, slots=True)
class PredictorConfig:
    """How experts are predicted."""

    mode: str = "auto"
    """'router', 'affinity', 'auto' (the better of the two per layer) or 'off'."""
    widen: int = 0
    """Experts named beyond the layer's top-k (top-(k+widen)), when the layer's cache has room."""
    recall_memory: float = 0.9
    """Weight of the past in the running recall that 'auto' compares (0 = last step only)."""
    state: str = "post-attention"
    """Hidden state the router predictor reads: 'post-attention' (the previous MoE layer's router
    input, once it has routed: 87% recall on tiny-moe, lead = that layer's experts + the next
    attention) or 'layer-input' (the previous layer's input: 72%, lead = a whole layer)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"expert predictor {self.mode!r} is unknown; choose one of {', '.join(MODES)}")
        if self.widen < 0:
            raise ConfigError(f"expert prefetch widening must be >= 0 experts, got {self.widen}")
        if self.state not in STATES:
            raise ConfigError(f"predictor state {self.state!r} is unknown; choose one of {', '.join(STATES)}")
        if not 0.0 <= self.recall_memory < 1.0:
            raise ConfigError(f"recall_memory must be in [0, 1), got {self.recall_memory}")


@dataclass(frozen=True, slots=True)
class MoeLayerSpec:
    """What the predictor needs of one MoE layer: its router and the norm before it."""

    router: str
    """Router weight name ``[E, H]``."""
    norm: str
    """Post-attention RMSNorm weight name ``[H]`` (the router's input is normalised by it)."""


class ExpertPredictor:
    """Names the experts the next MoE layer will use (see the module docstring)."""

    def __init__(self, layers: dict[int, MoeLayerSpec], num_experts: int, top_k: int, eps: float,
                 weight: Callable[[str], torch.Tensor], config: PredictorConfig = PredictorConfig()) -> None:
        self.config = config
        self.num_experts = num_experts
        self.top_k = top_k
        self.eps = eps
        self.moe_layers = sorted(layers)
        self._next = {a: b for a, b in zip(self.moe_layers, self.moe_layers[1:])}
        self._prev = {b: a for a, b in self._next.items()}
        self._router = {i: weight(s.router).float() for i, s in layers.items()}  # [E, H] fp32
        self._norm = {i: weight(s.norm).float() for i, s in layers.items()}  # [H]
        self._affinity = {i: torch.zeros(num_experts, num_experts) for i in self.moe_layers}  # [E_prev, E]
        self._recall = {i: {"router": 0.0, "affinity": 0.0} for i in self.moe_layers}

    @property
    def enabled(self) -> bool:
        return self.config.mode != "off"

    @property
    def width(self) -> int:
        """Experts named per layer."""
        return min(self.num_experts, self.top_k + self.config.widen)

    # ------------------------------------------------------------------ structure
    def target(self, layer: int) -> int | None:
        """The MoE layer to predict once layer ``layer`` begins: the first MoE layer after it."""
        return next((j for j in self.moe_layers if j > layer), None)

    def previous(self, layer: int) -> int | None:
        """The MoE layer before ``layer`` (whose choice the affinity predictor conditions on)."""
        return self._prev.get(layer)

    def source(self, layer: int) -> str:
        """Which predictor to issue for ``layer`` now: 'router' or 'affinity'."""
        mode = self.config.mode
        if mode == "auto":
            r = self._recall[layer]
            return "affinity" if self.previous(layer) is not None and r["affinity"] > r["router"] else "router"
        if mode == "affinity" and self.previous(layer) is None:
            return "router"  # the first MoE layer has no earlier layer to condition on
        return mode

    # ------------------------------------------------------------------ predictions
    def from_hidden(self, layer: int, hidden: torch.Tensor, normed_by: int | None = None) -> list[int]:
        """Experts of ``layer`` ranked by its router applied to ``hidden`` ``[T, H]`` (summed over
        the tokens), the first ``width`` of them. ``normed_by``: ``hidden`` is MoE layer
        ``normed_by``'s router input, already normalised with that layer's norm weight, which is
        divided out first (RMSNorm is scale-invariant, so only the weights matter)."""
        x = hidden.float()
        if normed_by is not None:
            w = self._norm[normed_by]
            x = torch.where(w.abs() > 1e-12, x / w, torch.zeros_like(x))
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self._norm[layer]  # [T, H]
        probs = torch.softmax(x @ self._router[layer].t(), dim=-1)  # [T, E]
        return torch.topk(probs.sum(0), self.width).indices.tolist()

    def from_previous(self, layer: int, previous_used: Sequence[int]) -> list[int]:
        """Experts of ``layer`` ranked by how often they followed ``previous_used`` (the previous
        MoE layer's experts in this token); [] without history."""
        if not previous_used:
            return []
        counts = self._affinity[layer][list(previous_used)].sum(0)  # [E]
        if counts.sum() <= 0:
            return []
        return torch.topk(counts, self.width).indices.tolist()

    # ------------------------------------------------------------------ learning
    def observe(self, layer: int, used: Sequence[int], previous_used: Sequence[int],
                guesses: dict[str, Sequence[int]]) -> None:
        """A decode step of ``layer`` used ``used``; the previous MoE layer used ``previous_used``.
        ``guesses`` are the predictions each predictor made for this step (scored here)."""
        used_set = set(used)
        if not used_set:
            return
        keep = self.config.recall_memory
        for name in ("router", "affinity"):
            guess = guesses.get(name)
            if guess is None:
                continue
            recall = len(used_set & set(guess[: self.top_k])) / len(used_set)
            self._recall[layer][name] = keep * self._recall[layer][name] + (1 - keep) * recall
        if previous_used:
            table = self._affinity[layer]
            for a in previous_used:
                table[a, list(used_set)] += 1.0

    def running_recall(self) -> dict[int, dict[str, float]]:
        """Per MoE layer, the running recall of each predictor (what 'auto' compares)."""
        return {i: {k: round(v, 4) for k, v in r.items()} for i, r in self._recall.items()}


class PrefetchGate:
    """Whether reading a predicted expert pays off: a cost model fed by measurements as the model runs.

    Two costs, both measured per layer as decode steps go (``p``: the running precision of rank r
    of the layer's guess *when that expert was not cached* -- the guesses that cost a read; the
    cached ones are mostly the easy repeats and cost nothing -- scored every step whether issued or
    not, so a withheld layer can turn back on):
      * IO: a right guess hides up to ``min(read_s, lead_s)`` of reading behind compute
        (``lead_s``: compute time of one layer, ``read_s``: one expert's read); a wrong one costs
        a whole read when the disk is the bottleneck, weighted by ``io_load`` (the share of a step
        the disk is busy). Pays iff ``p * min(read_s, lead_s) >= (1 - p) * read_s * io_load``.
      * Eviction: in a full cache the read displaces a cached expert, which the layer would have
        used with probability ``q`` (measured: how often cached experts the predictor did not
        name were used in the same step). Pays iff ``p >= q``.
    An expert already cached costs nothing to name. The precision starts at ``prior`` (0: a layer's
    guesses earn their reads; with the default memory two right guesses in a row open a cheap layer). With uniform routing (random weights) under a
    tight budget guesses are right about 60% of the time and a read is 5x a layer's compute: the
    IO test withholds them and the disk reads only what the router chose. On tiny-moe the first
    layer (guessed from its own input, 53% right) keeps its cached experts, which it reuses 85% of
    the time; the other layers' guesses (87%) go through.
    """

    def __init__(self, layers: Sequence[int], width: int, read_s: float, memory: float = 0.9,
                 prior: float = 0.0) -> None:
        self.read_s = read_s
        self.memory = memory
        self.lead_s = read_s  # until measured: assume a layer's compute could hide a whole read
        self.io_load = 0.5
        self._precision = {i: [prior] * width for i in layers}
        self._reuse = {i: 0.0 for i in layers}  # q: cached, unnamed experts used in the same step

    def pays(self, layer: int, rank: int, displaces: bool) -> bool:
        """Whether reading rank ``rank`` of ``layer``'s guess pays; ``displaces``: the cache is
        full, so the read evicts a cached expert."""
        p = self._precision[layer][rank]
        if p * min(self.read_s, self.lead_s) < (1.0 - p) * self.read_s * self.io_load:
            return False
        return not displaces or p >= self._reuse[layer]

    def score(self, layer: int, guess: Sequence[int], used: Sequence[int], cached: Sequence[int] = ()) -> None:
        """A decode step of ``layer`` used ``used``; ``guess`` was the prediction for it and
        ``cached`` the experts the layer's cache held when the guess was made."""
        used_set, cached_set = set(used), set(cached)
        m = self.memory
        precision = self._precision[layer]
        for r, e in enumerate(guess[: len(precision)]):
            if e not in cached_set:  # only guesses that would cost a read
                precision[r] = m * precision[r] + (1 - m) * (e in used_set)
        others = [e for e in cached if e not in guess]
        if others:
            self._reuse[layer] = m * self._reuse[layer] + (1 - m) * (sum(e in used_set for e in others) / len(others))

    def observe_step(self, compute_s_per_layer: float, io_busy: float) -> None:
        """One decode step's measurements: compute seconds per MoE layer (time not blocked on
        expert reads) and the share of the step the disk was busy (0..1)."""
        m = self.memory
        self.lead_s = m * self.lead_s + (1 - m) * max(compute_s_per_layer, 0.0)
        self.io_load = m * self.io_load + (1 - m) * min(max(io_busy, 0.0), 1.0)

    def report(self) -> dict[str, Any]:
        return {"read_ms": round(self.read_s * 1e3, 3), "lead_ms": round(self.lead_s * 1e3, 3),
                "io_load": round(self.io_load, 3),
                "rank_precision": {str(i): [round(p, 3) for p in ps] for i, ps in self._precision.items()},
                "cached_reuse": {str(i): round(q, 3) for i, q in self._reuse.items()}}
