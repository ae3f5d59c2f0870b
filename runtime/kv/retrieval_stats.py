"""Counters of the long-context KV cache, and the sampled comparison with exact attention.

:class:`RetrievalCounters` sums what retrieval attention cost at decode (keys scanned / retrieved,
search / gather / attend seconds) and how long indexing took. :class:`AttentionCheck` averages two
quality measures over sampled (decode step, layer, kv head) triples, both against exact softmax
attention over every cached key (see :mod:`flashtier.retrieval.metrics`):

- ``attention_mass_recall``: mass on the keys actually attended (sinks + window + retrieved)
  divided by the mass on as many best keys; ``..._offloaded`` restricts both sides to the
  offloaded keys (retrieved vs the best offloaded keys), the part the index is responsible for.
- ``attention_mass_covered``: share of the total exact mass the attended keys hold.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flashtier.retrieval.attention import StepStats
from flashtier.retrieval.metrics import attention_mass_covered, attention_mass_recall


@dataclass
class RetrievalCounters:
    """Sums over decode steps (all layers and kv heads)."""

    decode_steps: int = 0
    decode_attention_s: float = 0.0
    """Wall time inside ``attend`` for one-token passes (the exact-attention check excluded)."""
    check_s: float = 0.0
    """Wall time of the sampled comparisons with exact attention."""
    keys_offloaded: int = 0
    keys_scanned: int = 0
    keys_retrieved: int = 0
    searches: int = 0
    """(layer, kv head) searches."""
    search_s: float = 0.0
    gather_s: float = 0.0
    attend_s: float = 0.0
    demote_s: float = 0.0
    """Wall time moving blocks out of the window (index build included)."""
    exact_passes: int = 0
    exact_attention_s: float = 0.0

    def add_step(self, step: StepStats, num_kv_heads: int) -> None:
        """Account one layer's decode step."""
        self.keys_offloaded += step.keys_offloaded
        self.keys_scanned += step.keys_scanned
        self.keys_retrieved += step.keys_retrieved
        self.searches += num_kv_heads
        self.search_s += step.search_s
        self.gather_s += step.gather_s
        self.attend_s += step.attend_s

    def as_dict(self) -> dict[str, float | int]:
        steps = max(self.decode_steps, 1)
        return {
            "attention_keys_scanned_fraction": round(self.keys_scanned / self.keys_offloaded, 6) if self.keys_offloaded else 0.0,
            "attention_keys_retrieved_per_search": round(self.keys_retrieved / self.searches, 2) if self.searches else 0.0,
            "attention_decode_steps": self.decode_steps,
            "attention_decode_ms_per_step": round(1e3 * self.decode_attention_s / steps, 3),
            "attention_search_ms_per_step": round(1e3 * self.search_s / steps, 3),
            "attention_gather_ms_per_step": round(1e3 * self.gather_s / steps, 3),
            "attention_attend_ms_per_step": round(1e3 * self.attend_s / steps, 3),
            "kv_demote_s": round(self.demote_s, 4),
            "attention_exact_s": round(self.exact_attention_s, 4),
            "attention_check_s": round(self.check_s, 4),
        }


class AttentionCheck:
    """Running means of the attention-quality measures over sampled (step, layer, kv head)."""

    def __init__(self) -> None:
        self.samples = 0
        self._sums = {"attention_mass_recall": 0.0, "attention_mass_covered": 0.0, "attention_mass_recall_offloaded": 0.0}
        self._min_recall = 1.0

    def add(self, queries: torch.Tensor, keys: torch.Tensor, attended: torch.Tensor, offloaded: range,
            retrieved: torch.Tensor, scale: float) -> None:
        """One kv head: ``queries [G, D]`` of its group, every cached key ``keys [S, D]`` (row =
        position), the attended positions ``[n]``, the offloaded positions and the retrieved ones."""
        recall = attention_mass_recall(queries, keys, attended, scale).mean().item()
        self._sums["attention_mass_recall"] += recall
        self._sums["attention_mass_covered"] += attention_mass_covered(queries, keys, attended, scale).mean().item()
        off_keys = keys[offloaded.start : offloaded.stop]
        self._sums["attention_mass_recall_offloaded"] += attention_mass_recall(
            queries, off_keys, retrieved - offloaded.start, scale).mean().item()
        self._min_recall = min(self._min_recall, recall)
        self.samples += 1

    def as_dict(self) -> dict[str, float | int]:
        n = max(self.samples, 1)
        out: dict[str, float | int] = {k: round(v / n, 6) for k, v in self._sums.items()}
        out["attention_mass_recall_min"] = round(self._min_recall, 6)
        out["attention_check_samples"] = self.samples
        return out
