"""Low-rank activation predictors: which FFN neurons will be positive for this token.

Per layer, from the FFN input ``x`` ``[T, H]`` (the post-attention-normed hidden state, exactly
what the gate projection sees) a rank-``r`` map scores every neuron: ``s = (x @ A) @ B + c``
(``A`` ``[H, r]``, ``B`` ``[r, I]``, ``c`` ``[I]``); neuron i is predicted active when
``s_i > threshold`` (a logit). The threshold trades recall (of truly active neurons, the share
predicted) for bytes read.

Training (:func:`train_layer`) on recorded FFN inputs: the label is ``gate(x) > 0`` (for ReLU this
is exactly "the neuron's output is nonzero"). ``A, B`` start from the best rank-r approximation of
the gate pre-activations on the data (top eigenvectors of ``Z^T Z`` with ``Z = X W_gate^T``), then
minimise a class-balanced logistic loss (positives and negatives weigh half each), then the
threshold is set on held-out rows to reach ``target_recall``.

:class:`PredictorSet` is the per-layer collection, saved next to the model as
``sparsity_predictor.safetensors`` with a fingerprint of the model it was trained for; loading it
for another model is refused.
"""

from __future__ import annotations

import json
import math
import os
import uuid
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from flashtier.errors import CheckpointError, ConfigError, IntegrityError, StorageError

PREDICTOR_FILE = "sparsity_predictor.safetensors"


@dataclass(frozen=True, slots=True)
class PredictorTraining:
    """How predictors are trained by ``flashtier calibrate``."""

    rank: int = 128
    """Rank r of every layer's predictor (cost: r * (H + I) values per layer). On tiny-dense
    (H 256, I 1024) 128 read 10% fewer bytes than 64 at equal speed (bench_sparse_ffn.py)."""
    steps: int = 300
    """Optimiser steps of the balanced logistic loss (0: eigen initialisation only)."""
    batch: int = 4096
    """Rows per optimiser step."""
    lr: float = 2e-3
    """Adam learning rate."""
    target_recall: float = 0.99
    """The threshold is set so that this share of truly active neurons is predicted on the
    held-out rows (lower: fewer bytes, more misses)."""
    val_fraction: float = 0.15
    """Share of the recorded rows held out for the threshold and the reported metrics."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"predictor rank must be >= 1, got {self.rank}")
        if self.steps < 0 or self.batch < 1:
            raise ConfigError(f"steps must be >= 0 and batch >= 1, got {self.steps} and {self.batch}")
        if not 0.0 < self.target_recall <= 1.0:
            raise ConfigError(f"target_recall must be in (0, 1], got {self.target_recall}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")


class NeuronSelector(Protocol):
    """Names the neurons of one layer to read for one token."""

    def select(self, x: torch.Tensor, offset: float = 0.0) -> np.ndarray:
        """Neuron ids for ``x`` ``[1, H]``, highest priority first (unique). ``offset`` raises
        (fewer neurons, lower recall) or lowers (more) the selector's own threshold, in logits."""
        ...


@dataclass
class LowRankPredictor:
    """One layer's predictor (see module doc). Tensors are float32."""

    a: torch.Tensor  # [H, r]
    b: torch.Tensor  # [r, I]
    bias: torch.Tensor  # [I]
    threshold: float
    """Logit above which a neuron is predicted active (calibrated for ``target_recall``)."""
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.a, self.b, self.bias))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[T, I]`` for ``x`` ``[T, H]``, computed in the predictor's dtype."""
        return torch.addmm(self.bias, x.to(self.a.dtype) @ self.a, self.b)

    def cast(self, dtype: torch.dtype) -> LowRankPredictor:
        """A copy holding its tensors in ``dtype`` (e.g. the compute dtype, to halve its memory)."""
        return LowRankPredictor(self.a.to(dtype), self.b.to(dtype), self.bias.to(dtype), self.threshold,
                                dict(self.metrics))

    def select(self, x: torch.Tensor, offset: float = 0.0) -> np.ndarray:
        s = self.scores(x)[0].float()  # [I]
        ids = torch.nonzero(s > self.threshold + offset).flatten()
        ids = ids[torch.argsort(s[ids], descending=True)]
        return ids.numpy()


class AllNeurons:
    """A selector that names every neuron (the FFN is then computed exactly)."""

    def __init__(self, neurons: int) -> None:
        self._ids = np.arange(neurons, dtype=np.int64)

    def select(self, x: torch.Tensor, offset: float = 0.0) -> np.ndarray:
        return self._ids


# ------------------------------------------------------------------------------------ training
def _balanced_loss(s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean BCE over positives and mean over negatives, weighed half each."""
    pos = y.sum().clamp(min=1)
    neg = (~y).sum().clamp(min=1)
    loss_pos = (F.softplus(-s) * y).sum() / pos
    loss_neg = (F.softplus(s) * ~y).sum() / neg
    return 0.5 * (loss_pos + loss_neg)


def threshold_for_recall(s: torch.Tensor, y: torch.Tensor, recall: float) -> float:
    """Largest logit threshold keeping at least ``recall`` of the positives (``s > t``)."""
    pos = s[y]
    if pos.numel() == 0:
        return float(s.max()) if s.numel() else 0.0
    k = int(math.floor((1.0 - recall) * pos.numel()))  # positives allowed below the threshold
    if k <= 0:
        return float(pos.min()) - 1e-6
    return float(torch.kthvalue(pos, k).values)


def evaluate(s: torch.Tensor, y: torch.Tensor, threshold: float) -> dict[str, float]:
    """Recall, predicted fraction and true active fraction at ``threshold``."""
    pred = s > threshold
    tp = (pred & y).sum().item()
    return {
        "recall": tp / max(1, y.sum().item()),
        "predicted_fraction": pred.float().mean().item(),
        "active_fraction": y.float().mean().item(),
        "precision": tp / max(1, pred.sum().item()),
    }


def train_layer(x: torch.Tensor, w_gate: torch.Tensor, cfg: PredictorTraining,
                log: Callable[[str], None] | None = None) -> LowRankPredictor:
    """Fit a predictor of ``(x @ w_gate.T) > 0`` from inputs ``x`` ``[N, H]`` (fp32)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    x = x.float()
    w = w_gate.float()  # [I, H]
    n = x.shape[0]
    perm = torch.randperm(n, generator=gen)
    n_val = max(1, int(n * cfg.val_fraction))
    xv, xt = x[perm[:n_val]], x[perm[n_val:]]
    yv = (xv @ w.t()) > 0  # [Nv, I]
    yt = (xt @ w.t()) > 0  # [Nt, I] labels, computed once
    rank = min(cfg.rank, w.shape[0], w.shape[1])

    # Eigen initialisation: Z ~ Z V V^T with V the top eigenvectors of Z^T Z = W (X^T X) W^T.
    cov = xt.t() @ xt / max(1, xt.shape[0])  # [H, H]
    gram = w @ cov @ w.t()  # [I, I]
    _, vecs = torch.linalg.eigh(gram.double())
    v = vecs[:, -rank:].float()  # [I, r]
    a = (w.t() @ v).contiguous().requires_grad_(True)  # [H, r]
    b = v.t().contiguous().requires_grad_(True)  # [r, I]
    bias = torch.zeros(w.shape[0], requires_grad=True)

    if cfg.steps:
        opt = torch.optim.Adam([a, b, bias], lr=cfg.lr)
        for step in range(cfg.steps):
            idx = torch.randint(0, xt.shape[0], (min(cfg.batch, xt.shape[0]),), generator=gen)
            loss = _balanced_loss(torch.addmm(bias, xt[idx] @ a, b), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if log is not None and (step + 1) % 100 == 0:
                log(f"step {step + 1}/{cfg.steps}: balanced loss {loss.item():.4f}")
    pred = LowRankPredictor(a.detach().contiguous(), b.detach().contiguous(), bias.detach().contiguous(), 0.0)
    with torch.no_grad():
        sv = pred.scores(xv)
    pred.threshold = threshold_for_recall(sv, yv, cfg.target_recall)
    pred.metrics = {**evaluate(sv, yv, pred.threshold), "rank": float(rank), "val_rows": float(n_val)}
    return pred


# ------------------------------------------------------------------------------------ storage
@dataclass
class PredictorSet:
    """Predictors by layer, with the model fingerprint and training settings they came from."""

    layers: dict[int, LowRankPredictor]
    fingerprint: dict[str, object]
    training: PredictorTraining

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.layers.values())

    def save(self, model_dir: Path) -> Path:
        """Write the predictors to ``model_dir/PREDICTOR_FILE`` (temporary sibling, then renamed), with
        the crc32 of every tensor's bytes in the metadata (checked by :meth:`load`)."""
        from flashtier.storage_backends.safetensors_format import save_safetensors

        tensors, meta = {}, {}
        for i, p in self.layers.items():
            tensors[f"layers.{i}.a"], tensors[f"layers.{i}.b"], tensors[f"layers.{i}.bias"] = p.a, p.b, p.bias
            meta[str(i)] = {"threshold": p.threshold, "metrics": p.metrics}
        path = Path(model_dir) / PREDICTOR_FILE
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")  # one per writer
        header: dict[str, object] = {"layers": meta, "fingerprint": self.fingerprint, "training": asdict(self.training)}
        header["crc32"] = _predictor_crc32(tensors, header)
        try:
            save_safetensors(tensors, tmp, metadata={"flashtier": json.dumps(header)})
            tmp.replace(path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise StorageError(f"writing {path} failed: {e.strerror or e}; check free space and that the folder is "
                               "writable") from e
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, model_dir: Path, fingerprint: dict[str, object]) -> PredictorSet:
        """Load ``model_dir``'s predictors; CheckpointError if missing or made for another model
        (``fingerprint`` is what the running model's fingerprint is)."""
        from safetensors import SafetensorError, safe_open

        path = Path(model_dir) / PREDICTOR_FILE
        if not path.is_file():
            raise CheckpointError(f"{model_dir} has no sparsity predictors ({PREDICTOR_FILE}); train them with "
                                  f"`flashtier calibrate {model_dir} --text FILE`")
        try:
            with safe_open(str(path), framework="pt") as f:
                info = json.loads(f.metadata()["flashtier"])
                layers = {}
                for key, m in info["layers"].items():
                    i = int(key)
                    layers[i] = LowRankPredictor(f.get_tensor(f"layers.{i}.a"), f.get_tensor(f"layers.{i}.b"),
                                                 f.get_tensor(f"layers.{i}.bias"), float(m["threshold"]),
                                                 dict(m["metrics"]))
        except (OSError, KeyError, ValueError, TypeError, AttributeError, SafetensorError) as e:
            raise CheckpointError(f"{path}: unreadable predictor file ({e!r}); re-run `flashtier calibrate`") from e
        tensors = {f"layers.{i}.{k}": getattr(p, k) for i, p in layers.items() for k in ("a", "b", "bias")}
        if "crc32" not in info:
            raise CheckpointError(f"{path} carries no checksum (written by an older flashtier); re-run "
                                  f"`flashtier calibrate {model_dir} --text FILE`")
        if info["crc32"] != _predictor_crc32(tensors, {k: v for k, v in info.items() if k != "crc32"}):
            raise IntegrityError(f"{path}: checksum mismatch in the predictor weights (crc32 differs from the one "
                                 f"written); the file is corrupt: re-run `flashtier calibrate {model_dir} --text FILE`")
        if info.get("fingerprint") != fingerprint:
            raise CheckpointError(f"{path}: these predictors were trained for another model (fingerprint differs); "
                                  f"re-run `flashtier calibrate {model_dir} --text FILE`")
        return cls(layers, info["fingerprint"], PredictorTraining(**info["training"]))


def _predictor_crc32(tensors: dict[str, torch.Tensor], header: dict[str, object]) -> int:
    """crc32 of the header (thresholds, fingerprint, training; canonical JSON) followed by the
    tensors' bytes in name order."""
    crc = zlib.crc32(json.dumps(header, sort_keys=True).encode())
    for name in sorted(tensors):
        crc = zlib.crc32(tensors[name].detach().contiguous().view(-1).view(torch.uint8).numpy(), crc)
    return crc & 0xFFFFFFFF


def recall_of(selected: np.ndarray, active: np.ndarray) -> tuple[int, int]:
    """(truly active ids that were selected, truly active ids) for one token of one layer."""
    if active.size == 0:
        return 0, 0
    return int(np.isin(active, selected, assume_unique=True).sum()), int(active.size)
