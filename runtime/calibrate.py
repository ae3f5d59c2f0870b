"""Calibration of the sparse FFN's activation predictors (``flashtier calibrate``).

Runs the model fully in memory over a calibration text, records every dense FFN layer's input
``x`` (the tensor the gate projection sees), trains one low-rank predictor per layer
(:func:`flashtier.prefetch.sparsity.train_layer`) and saves them next to the model
(``sparsity_predictor.safetensors``), fingerprinted with the model's weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from flashtier.errors import InputError
from flashtier.prefetch.sparsity import PredictorSet, PredictorTraining, train_layer
from flashtier.checkpoint.folder import Checkpoint, layer_names
from flashtier.runtime.model import Transformer
from flashtier.runtime.weights.base import InMemoryWeights
from flashtier.checkpoint.bundles import model_fingerprint, sparse_ffn_layers


class _RecordingWeights(InMemoryWeights):
    """In-memory weights that keep each dense FFN layer's input (as float32 rows)."""

    def __init__(self, checkpoint: Checkpoint, layers: list[int]) -> None:
        super().__init__(checkpoint)
        self.records: dict[int, list[torch.Tensor]] = {i: [] for i in layers}

    def computes_ffn(self, layer: int) -> bool:
        return layer in self.records  # it records the layer's inputs

    def ffn(self, layer: int, xs: list[torch.Tensor]) -> list[torch.Tensor] | None:
        if layer in self.records:
            self.records[layer].extend(x.detach().float().clone() for x in xs)
        return None


@dataclass(frozen=True, slots=True)
class CalibrationText:
    """Which tokens to record."""

    max_tokens: int = 32768
    """Most tokens recorded (rows per layer)."""
    seq: int = 256
    """Tokens per forward window (each window starts with an empty KV cache)."""

    def __post_init__(self) -> None:
        if self.max_tokens < 16 or self.seq < 2:
            raise InputError(f"calibration needs max_tokens >= 16 and seq >= 2, got {self.max_tokens} and {self.seq}")


def record_ffn_inputs(checkpoint: Checkpoint, token_ids: list[int], text: CalibrationText = CalibrationText(),
                      progress: Callable[[int, int], None] | None = None) -> dict[int, torch.Tensor]:
    """Per dense FFN layer, its inputs ``[N, H]`` (float32) over ``token_ids`` cut into windows."""
    layers = sparse_ffn_layers(checkpoint)
    weights = _RecordingWeights(checkpoint, layers)
    model = Transformer(checkpoint.config, weights, set(checkpoint.tensors))
    ids = token_ids[: text.max_tokens]
    if len(ids) < 16:
        raise InputError(f"the calibration text has {len(ids)} tokens; give at least a few thousand")
    windows = range(0, len(ids), text.seq)
    with torch.no_grad():
        for k, start in enumerate(windows):
            chunk = torch.tensor(ids[start : start + text.seq], dtype=torch.long)
            model.forward(chunk, model.new_cache(), 0)
            if progress is not None:
                progress(k + 1, len(windows))
    return {i: torch.cat(rows) for i, rows in weights.records.items()}


def calibrate(model_dir: str | Path, token_ids: list[int], training: PredictorTraining = PredictorTraining(),
              text: CalibrationText = CalibrationText(), log: Callable[[str], None] | None = None) -> tuple[Path, PredictorSet]:
    """Record, train every dense FFN layer's predictor, save next to the model; returns (path, set)."""
    checkpoint = Checkpoint(model_dir)
    inputs = record_ffn_inputs(checkpoint, token_ids, text)
    layers = {}
    for i, x in inputs.items():
        w_gate = checkpoint.read_tensor(layer_names(checkpoint.config, i).gate)
        layers[i] = train_layer(x, w_gate, training)
        if log is not None:
            m = layers[i].metrics
            log(f"layer {i}: rank {int(m['rank'])}, active {m['active_fraction']:.3f}, predicted "
                f"{m['predicted_fraction']:.3f}, recall {m['recall']:.4f} (held-out rows)")
    predictors = PredictorSet(layers, model_fingerprint(checkpoint), training)
    return predictors.save(checkpoint.model_dir), predictors
