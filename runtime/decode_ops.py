"""One-token decode steps in fp32, each one native call instead of several torch operations.

A one-row pass on a small quantized model spends as long in the dozen small torch operations
between a layer's products (RMSNorm, rotary embedding, attention over the cache) as in the products
themselves: each torch call costs a few microseconds of dispatch whatever its size. These helpers
do the same arithmetic in C (``flashtier._native``: ``rms_norm``, ``rope``, ``attend``,
``act_mul``) for fp32 tensors holding one token; with quantized weights held in memory, each half
of a layer is one call (``attn_step``, ``ffn_step``: the same C functions in the same order, so
the same bits). They return None where they do not apply (no native extension, another
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
try:
    from flashtier._native import act_mul as _act_mul
    from flashtier._native import attn_step as _attn_step
    from flashtier._native import experts_step as _experts_step
    from flashtier._native import ffn_step as _ffn_step
    from flashtier._native import route_row as _route_row
except ImportError:
    _act_mul = _attn_step = _experts_step = _ffn_step = _route_row = None

EXPERTS_MAX = 4
"""Most routed experts :func:`experts_step` computes in one call."""

ACT_KINDS = {"silu": 0, "gelu_pytorch_tanh": 1, "gelu_new": 1, "gelu": 2}
"""The FFN activations the native one-row code computes (config ``hidden_act`` -> kind)."""


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


def act_mul_row(g: torch.Tensor, u: torch.Tensor, hidden_act: str) -> torch.Tensor | None:
    """``act(g) * u`` for one fp32 row ``g``, ``u`` ``[1, I]`` (the FFN's gated activation); None
    where it does not apply (then the caller runs torch's, whose exp / erf round differently)."""
    kind = ACT_KINDS.get(hidden_act)
    if (_act_mul is None or kind is None or g.dtype != torch.float32 or u.dtype != torch.float32 or g.shape[0] != 1
            or g.shape != u.shape or g.requires_grad or u.requires_grad or g.device.type != "cpu"
            or not g.is_contiguous() or not u.is_contiguous()):
        return None
    out = torch.empty_like(g)  # [1, I]
    _act_mul(g.numpy(), u.numpy(), out.numpy(), g.shape[-1], kind)
    return out


def native_steps() -> bool:
    """Whether the fused steps (:func:`attn_step`, :func:`ffn_step`, :func:`experts_step`) are available."""
    return _attn_step is not None


WeightSpec = tuple  # (ggml type id, blocks as a uint8 numpy array, rows, fp32 bias numpy array or None)


def attn_step(x: "np.ndarray", out: "np.ndarray", norm: "np.ndarray", eps: float,
              qkv: tuple[WeightSpec, WeightSpec, WeightSpec], o: WeightSpec, cos: "np.ndarray", sin: "np.ndarray",
              interleaved: bool, kv: tuple, heads: int, kv_heads: int, head_dim: int, threads: int, attn_threads: int,
              act: int) -> None:
    """The attention half of a layer for one fp32 token: ``out`` ``[H]`` = ``x`` + o(attention),
    q, k, v of ``rms_norm(x, norm)``, rotated by ``cos``/``sin`` ``[D]``, this token's key and
    value written into the cache first. ``kv`` = (keys, values, head stride, int64 block table,
    block, lo, end) as :meth:`~flashtier.runtime.kv.cache.BlockKVCache.decode_slot` returns it.
    Bit-identical to the separate calls (rms_norm_row, the products, rope_row, the cache's write
    and attend_row, the o product, the residual add)."""
    k, v, stride, table, block, lo, end = kv
    _attn_step(x, out, norm, eps, qkv, o, cos, sin, interleaved, k, v, stride, table, block, lo, end, heads, kv_heads,
               head_dim, head_dim ** -0.5, threads, attn_threads, act)


def ffn_step(x: "np.ndarray", out: "np.ndarray", norm: "np.ndarray", eps: float,
             gate_up: tuple[WeightSpec, WeightSpec], down: WeightSpec, hidden_act: str, threads: int, act: int) -> bool:
    """The dense FFN half of a layer for one fp32 token: ``out`` ``[H]`` = ``x`` +
    down(act(gate(xn)) * up(xn)), ``xn = rms_norm(x, norm)``; returns whether ``out`` is all
    finite. Bit-identical to the separate calls (with :func:`act_mul_row`)."""
    return _ffn_step(x, out, norm, eps, gate_up, down, ACT_KINDS[hidden_act], threads, act)


def experts_step(xn: "np.ndarray", out: "np.ndarray", experts: list[tuple[WeightSpec, WeightSpec, WeightSpec]],
                 weights: "np.ndarray", hidden_act: str, threads: int, act: int,
                 residual: "np.ndarray | None" = None) -> bool | None:
    """One fp32 token's routed experts: ``out`` ``[H]`` = sum over ``experts`` (gate, up, down;
    1 to :data:`EXPERTS_MAX`), in order, of ``weights[e]`` * down_e(act(gate_e(xn)) * up_e(xn)),
    each term rounded before it is added (the separate path's operations, so the same bits). With
    ``residual`` ``[H]``: ``out`` = ``residual`` + that sum, and returns whether ``out`` is all
    finite (else None)."""
    if residual is None:
        return _experts_step(xn, out, tuple(experts), weights, ACT_KINDS[hidden_act], threads, act)
    return _experts_step(xn, out, tuple(experts), weights, ACT_KINDS[hidden_act], threads, act, residual)


def route_row(x: torch.Tensor, router: torch.Tensor, k: int, norm: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One fp32 token ``x`` ``[1, H]`` routed by ``router`` ``[E, H]`` (fp32): (top_i ``[1, k]``
    int64, top_w ``[1, k]`` fp32), the softmax's k most probable experts in descending order (ties
    to the lower index) and their probabilities, divided by their sum when ``norm``. None where it
    does not apply (no extension, several rows, another dtype or device, a quantized router): then
    the caller runs torch's softmax and topk."""
    if (_route_row is None or not isinstance(router, torch.Tensor) or x.shape[0] != 1 or x.dtype != torch.float32
            or router.dtype != torch.float32 or x.device.type != "cpu" or router.device.type != "cpu"
            or x.requires_grad or router.requires_grad or not x.is_contiguous() or not router.is_contiguous()
            or router.dim() != 2 or router.shape[1] != x.shape[1] or not 1 <= k <= router.shape[0]):
        return None
    ids = torch.empty(1, k, dtype=torch.int64)
    weights = torch.empty(1, k, dtype=torch.float32)
    _route_row(x.numpy(), router.numpy(), ids.numpy(), weights.numpy(), k, norm)
    return ids, weights


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
