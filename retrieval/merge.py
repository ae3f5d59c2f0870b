"""Partial attention over a subset of keys, and the exact log-sum-exp merge of partial results.

Contract: for queries ``q`` and any partition of the keys into parts ``P_1 .. P_n`` (parts may be
empty), ``merge_partials([partial_attention(q, K[P_i], V[P_i], s) for i])`` equals
``partial_attention(q, K, V, s)`` up to floating-point rounding. An empty part contributes
``out = 0, lse = -inf`` and is ignored by the merge; if every part is empty the merged result is
``out = 0, lse = -inf`` (attention over no keys).

Leading batch dimensions are allowed: ``q [..., G, D]``, ``k/v [..., N, D]`` with the same leading
shape (e.g. ``[H_kv, G, D]`` against ``[H_kv, S, D]`` for all kv heads of a layer at once).
Low-precision inputs are computed in fp32; ``out`` is returned in the query's dtype and ``lse`` in
fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from flashtier.errors import InputError


@dataclass(frozen=True)
class PartialAttention:
    """Attention of some queries over one part of the keys."""

    out: torch.Tensor
    """``[..., G, D]`` softmax-weighted values, normalised over this part only."""
    lse: torch.Tensor
    """``[..., G]`` fp32 log-sum-exp of the scaled scores of this part (``-inf`` when empty)."""


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def partial_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None = None
) -> PartialAttention:
    """Softmax attention of ``q [..., G, D]`` over ``k, v [..., N, D]`` with scores ``scale * q.k``.

    ``N`` may be 0 (result: ``out = 0``, ``lse = -inf``). ``mask`` (bool, broadcastable to
    ``[..., G, N]``, True = attend) restricts each query to some of the keys, e.g. a causal mask;
    a query that may attend none of them gets ``out = 0``, ``lse = -inf`` like an empty part.
    """
    if k.shape != v.shape[:-1] + (k.shape[-1],) or k.shape[:-2] != q.shape[:-2] or k.shape[-1] != q.shape[-1]:
        raise InputError(
            f"partial_attention needs q [..., G, D] and k/v [..., N, D] with equal leading dims and D; "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    cdt = _compute_dtype(q.dtype)
    lead, g, n = q.shape[:-2], q.shape[-2], k.shape[-2]
    if n == 0:
        out = torch.zeros((*lead, g, v.shape[-1]), dtype=q.dtype, device=q.device)
        return PartialAttention(out, torch.full((*lead, g), float("-inf"), dtype=cdt, device=q.device))
    if _FLASH_CPU is not None and q.dtype == torch.float32 and q.device.type == "cpu" and g * n >= FLASH_MIN_SCORES \
            and v.shape[-1] == q.shape[-1] and (mask is None or mask.dim() == 2):
        return _flash_partial(q, k, v, scale, mask)
    scores = torch.matmul(q.to(cdt), k.to(cdt).transpose(-1, -2)) * scale  # [..., G, N]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    part = partial_from_scores(scores, v)
    return PartialAttention(part.out.to(q.dtype), part.lse)


_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
"""torch's CPU flash-attention kernel, which also returns the log-sum-exp (None if absent)."""
FLASH_MIN_SCORES = 1 << 16
"""Smallest ``G * N`` sent to the flash kernel (below it the plain matmuls are as fast)."""


def _flash_partial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                   mask: torch.Tensor | None) -> PartialAttention:
    """:func:`partial_attention` through the CPU flash kernel: blockwise, never the whole
    ``[G, N]`` score matrix; fp32 in and out. ``mask`` is ``[G, N]`` or None."""
    lead, g, n, d = q.shape[:-2], q.shape[-2], k.shape[-2], q.shape[-1]
    q4 = q.reshape(1, -1, g, d)  # [1, prod(lead), G, D]
    k4, v4 = k.to(q.dtype).reshape(1, -1, n, d), v.to(q.dtype).reshape(1, -1, n, d)
    bias = None if mask is None else torch.zeros(mask.shape, dtype=q.dtype).masked_fill_(~mask, float("-inf"))
    out, lse = _FLASH_CPU(q4, k4, v4, 0.0, False, attn_mask=bias, scale=scale)
    out, lse = out.reshape(*lead, g, d), lse.reshape(*lead, g)
    if mask is not None:  # the kernel reports lse = 0 for a query that may attend nothing
        lse = lse.masked_fill(~mask.any(dim=-1), float("-inf"))
        out = out.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
    return PartialAttention(out, lse)


def partial_from_scores(scores: torch.Tensor, v: torch.Tensor, product_dtype: torch.dtype | None = None) -> PartialAttention:
    """Softmax of given ``scores [..., G, N]`` (``-inf`` = excluded) applied to ``v [..., N, D]``:
    ``out`` in the scores' dtype, ``lse`` of the scores. Lets callers add a per-key log-weight
    (e.g. ``log(count)`` when one vector stands for several keys). ``product_dtype`` computes the
    weighted sum of values in that dtype (e.g. bf16 values of an estimate, without converting
    them); default the scores' dtype (exact)."""
    m = scores.amax(dim=-1, keepdim=True)  # [..., G, 1]
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(scores - m_safe)  # [..., G, N]
    denom = p.sum(dim=-1, keepdim=True)  # [..., G, 1]
    dt = product_dtype or scores.dtype
    weighted = torch.matmul(p.to(dt), v.to(dt)).to(scores.dtype)  # [..., G, D]
    out = weighted / torch.where(denom > 0, denom, torch.ones_like(denom))  # [..., G, D]
    lse = (m_safe + torch.log(denom)).squeeze(-1)  # [..., G]; log(0) = -inf for all -inf rows
    return PartialAttention(out, lse)


def merge_partials(parts: Sequence[PartialAttention]) -> PartialAttention:
    """Exact combination of partial results over disjoint key parts (see module contract).

    All parts must share the leading shape ``[..., G]``; parts with ``lse = -inf`` (empty) weigh 0.
    """
    if not parts:
        raise InputError("merge_partials needs at least one partial result")
    shape = parts[0].out.shape
    for p in parts:
        if p.out.shape != shape or p.lse.shape != shape[:-1]:
            raise InputError(
                f"merge_partials: all parts need out {tuple(shape)} and lse {tuple(shape[:-1])}; "
                f"got out {tuple(p.out.shape)}, lse {tuple(p.lse.shape)}"
            )
    if len(parts) == 1:
        return parts[0]
    cdt = _compute_dtype(parts[0].out.dtype)
    lse = torch.stack([p.lse.to(cdt) for p in parts])  # [P, ..., G]
    out = torch.stack([p.out.to(cdt) for p in parts])  # [P, ..., G, D]
    m = lse.amax(dim=0)  # [..., G]
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(lse - m_safe)  # [P, ..., G]; 0 for empty parts
    total = w.sum(dim=0)  # [..., G]
    weighted = torch.where(w.unsqueeze(-1) > 0, w.unsqueeze(-1) * out, torch.zeros_like(out))  # empty parts add 0
    merged = weighted.sum(dim=0) / torch.where(total > 0, total, torch.ones_like(total)).unsqueeze(-1)
    merged_lse = m_safe + torch.log(total)  # -inf where every part is empty
    return PartialAttention(merged.to(parts[0].out.dtype), merged_lse.to(parts[0].lse.dtype))
