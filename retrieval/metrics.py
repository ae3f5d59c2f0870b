"""Measurements of how well a set of attended keys stands in for full attention.

All helpers compare against exact softmax attention of ``queries [G, D]`` over *all* keys
``[T, D]`` (``keys[t]`` is position ``t``) with scores ``scale * q . k``. ``attended`` is either
positions ``[n]`` shared by the group or ``[G, n]`` per query; positions in a row must be distinct.
"""

from __future__ import annotations

import torch

from flashtier.errors import InputError


def exact_attention_probs(queries: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax probabilities ``[G, T]`` (fp64 for accurate sums over long contexts)."""
    return torch.softmax((queries.double() @ keys.double().T) * scale, dim=-1)


def _rows(attended: torch.Tensor, groups: int) -> torch.Tensor:
    attended = torch.as_tensor(attended, dtype=torch.int64)
    if attended.dim() == 1:
        return attended.unsqueeze(0).expand(groups, -1)
    if attended.dim() != 2 or attended.shape[0] != groups:
        raise InputError(f"attended positions must be [n] or [{groups}, n], got {tuple(attended.shape)}")
    return attended


def attention_mass_covered(queries: torch.Tensor, keys: torch.Tensor, attended: torch.Tensor, scale: float) -> torch.Tensor:
    """Share ``[G]`` of each query's total exact attention mass held by its attended keys."""
    probs = exact_attention_probs(queries, keys, scale)  # [G, T]
    return probs.gather(1, _rows(attended, probs.shape[0])).sum(dim=1)


def attention_mass_recall(queries: torch.Tensor, keys: torch.Tensor, attended: torch.Tensor, scale: float) -> torch.Tensor:
    """Mass ``[G]`` on the attended keys divided by the mass on the same number of best keys
    (1.0 means the attended keys are an optimal set of their size)."""
    probs = exact_attention_probs(queries, keys, scale)  # [G, T]
    rows = _rows(attended, probs.shape[0])
    n = rows.shape[1]
    if n == 0:
        return torch.ones(probs.shape[0], dtype=probs.dtype)
    best = torch.topk(probs, min(n, probs.shape[1]), dim=1).values.sum(dim=1)  # [G]
    return probs.gather(1, rows).sum(dim=1) / best


def recall_at_k(found: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """Per row ``[R]``: share of ``exact [R, k]`` positions present in ``found [R or 1, k']``."""
    found = found.expand(exact.shape[0], -1) if found.shape[0] == 1 else found
    if found.shape[0] != exact.shape[0]:
        raise InputError(f"recall_at_k: found has {found.shape[0]} rows, exact {exact.shape[0]}")
    hits = torch.stack([torch.isin(e, f).sum() for f, e in zip(found, exact)])
    return hits.double() / max(exact.shape[1], 1)


def keys_scanned_fraction(keys_scanned: int, keys_total: int) -> float:
    """``keys_scanned / keys_total`` (0 when nothing is indexed)."""
    return keys_scanned / keys_total if keys_total else 0.0
