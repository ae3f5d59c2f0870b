"""One-token decode steps in fp32, each one native call instead of several torch operations.

A one-row pass on a small quantized model spends as long in the dozen small torch operations
between a layer's products (RMSNorm, rotary embedding, attention over the cache) as in the products
themselves: each torch call costs a few microseconds of dispatch whatever its size. These helpers
do the same arithmetic in C (``flashtier._native``: ``rms_norm``, ``rope``, ``attend``) for fp32
tensors holding one token. They return None where they do not apply (no native extension, another
dtype, several rows, tensors that need autograd or live on a GPU): the caller then runs its torch
code. The results equal the torch code's up to fp32 rounding (sums are taken in another order); a
decode step takes the native path whether its weights are resident or streamed, so paged and
in-memory runs still compute the same numbers.
"""

from __future__ import annotations

import numpy as np
import torch

try:
    from flashtier._native import attend as _attend
    from flashtier._native import rms_norm as _rms_norm
    from flashtier._native import rope as _rope
except ImportError:  # extension not built, or built before these existed
    _attend = _rms_norm = _rope = None


def rms_norm_row(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """``weight * (x / sqrt(mean(x^2) + eps))`` for ``x`` ``[1, H]``; None where it does not apply."""
    if (_rms_norm is None or x.dtype != torch.float32 or weight.dtype != torch.float32 or x.requires_grad
            or x.device.type != "cpu" or not x.is_contiguous() or not weight.is_contiguous()):
        return None
    out = torch.empty_like(x)  # [1, H]
    _rms_norm(x.numpy(), weight.numpy(), out.numpy(), x.shape[-1], eps)  # checks the sizes
    return out


def rope_row(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor | None:
    """Rotary embedding of ``x`` ``[Hx, 1, D]`` at one position (``cos``/``sin`` ``[1, D]``, the
    layout of :func:`~flashtier.runtime.model.rope_tables`); None where it does not apply."""
    if (_rope is None or x.dtype != torch.float32 or cos.dtype != torch.float32 or x.requires_grad
            or x.device.type != "cpu" or not x.is_contiguous() or not cos.is_contiguous() or not sin.is_contiguous()):
        return None
    heads, _, d = x.shape
    out = torch.empty((heads, 1, d), dtype=torch.float32)  # [Hx, 1, D]
    _rope(x.numpy(), out.numpy(), heads, d, cos.numpy(), sin.numpy(), interleaved)  # checks the sizes
    return out


def native_attend() -> bool:
    """Whether :func:`attend_row` is available."""
    return _attend is not None


def attend_row(q: torch.Tensor, k: "np.ndarray", v: "np.ndarray", kv_heads: int, head_stride: int, lo: int,
               end: int, threads: int, table: "np.ndarray | None" = None, block: int = 0) -> torch.Tensor:
    """Attention of one fp32 query row ``q`` ``[Hq, 1, D]`` (contiguous) over positions
    ``lo .. end-1`` of a cache whose keys / values ``k``, ``v`` are flat fp32 arrays holding each
    kv head's positions as contiguous ``[P, D]`` rows, ``head_stride`` floats apart (the kernel
    checks that the positions fit). Scale ``D ** -0.5``. Returns ``[Hq, 1, D]``.

    With ``table`` (int64 ``[blocks]``) and ``block`` (positions per block, a power of two),
    position ``p`` is row ``table[p // block] * block + p % block`` of its head: the blocks of a
    sequence in a pool shared with others. The positions are visited in the same order, so the
    result is bit-identical to the same rows laid out in order."""
    hq, _, d = q.shape
    out = torch.empty((hq, 1, d), dtype=torch.float32)  # [Hq, 1, D]
    if table is None:
        _attend(q.numpy(), k, v, out.numpy(), hq, kv_heads, d, lo, end, head_stride, d ** -0.5, threads)
    else:
        _attend(q.numpy(), k, v, out.numpy(), hq, kv_heads, d, lo, end, head_stride, d ** -0.5, threads,
                np.ascontiguousarray(table, dtype=np.int64), block)
    return out
