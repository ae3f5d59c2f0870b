"""Decode products and dequantization straight from ggml (GGUF) quantized blocks.

A GGUF weight ``[rows, cols]`` of type ``t`` is ``rows`` rows of ``cols // block_size(t)`` blocks
(layouts in :mod:`flashtier.checkpoint.ggml_types`). Two operations read those bytes as they are:

* :func:`qmatvec` ``(t, blocks, x) -> y``: ``y[r] = sum_k W[r, k] * x[k]`` for one activation row
  (single-token decode), ``W`` the dequantized weights. **Exact semantics**: the weights are
  dequantized with ggml's own fp32 operations (the values ``gguf.quants.dequantize`` gives), the
  activations stay fp32 (never quantized to int8), and products are summed in fp32; the result
  differs from the exact product of the dequantized weights only by fp32 rounding of the sum.
  The Q4_K / Q5_K kernels refactor a sub-block's sum algebraically,
  ``sum_k (d*sc*q_k - dmin*m) * x_k = sum_k (d*sc*q_k) * x_k - dmin*m * sum_k x_k``, with the
  sub-block sums of ``x`` computed once per call.
  On CPUs with AVX-512 VNNI or AVX2 the Q4_0 / Q4_K / Q5_K / Q6_K products compute the same thing faster through integer dot products (``activations="f32"``,
  the default): ``x`` is split per
  32 values into three int8 pieces, ``x ~= S * (65536 * x1 + 256 * x2 + x3)``, a 24-bit fixed
  point with one fp32 scale ``S = max|x_g| / (127 * 65536)`` (:func:`split_activations`), and each
  row is ``W @ (S * c)`` with the integer sums exact (Horner's rule over the pieces in int32) and
  fp32 rounding only where the sums are scaled and added. The activations are not rounded
  beyond fp32 precision: ``|x - S * c| <= S``, about one ulp of the group's largest value, so the
  error against the exact product is at the level of fp32 summation (measured at most ~1.5e-7 of
  ``sum_k |W[r, k] x[k]|``, 1-5x the fp32-FMA kernels' own rounding; README). ``"f32-fma"``
  forces the fp32-FMA kernels (dequantized weights times fp32 ``x``), used elsewhere and for Q8_0.
* ``qmatvec(..., activations="q8")``: an opt-in approximation for speed (llama.cpp's way of
  computing decode products): ``x`` is quantized once per call to int8 with one fp32 scale per 32
  consecutive values (:func:`quantize_activations_q8`) and every row is computed with integer dot
  products of the weights' integer quants and the int8 ``x`` (AVX-512 VNNI ``vpdpbusd``), scaled in
  fp32 once per sub-block. Q8_0, Q4_0, Q4_K, Q5_K, Q6_K; F32 / F16 / BF16 take the exact path.
* :func:`dequantize` ``(t, blocks, rows, cols) -> W``: the fp32 weights, bit-identical to
  ``gguf.quants.dequantize`` (prefill tiles, embedding rows).

Types: F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q5_K, Q6_K (ggml ids, :class:`GGMLType`).

Both run in the C extension ``flashtier._native`` when it is built (``q_matvec`` /
``q_dequantize``: AVX-512 kernels on x86-64-v4, an AVX2/FMA or baseline build elsewhere; rows split
over its thread pool; the GIL released). Without it (no C compiler at install) the same results come
from vectorised numpy: dequantization bit-identical, products through a float32 matrix product of
dequantized row chunks (correct, much slower).
"""

from __future__ import annotations

import numpy as np
import torch

from flashtier.checkpoint.dequant import (  # noqa: F401  (dequantize and the shared helpers, re-exported)
    _as_uint8,
    _geometry,
    _info,
    _threads,
    dequantize,
    dequantize_numpy,
    native_available,
)
from flashtier.checkpoint.ggml_types import GGMLType

try:
    from flashtier._native import q_dequantize as _native_dequantize
    from flashtier._native import q_matvec as _native_matvec
except ImportError:  # extension not built: numpy fallback
    _native_matvec = None
    _native_dequantize = None
try:
    from flashtier._native import q_matvec_many as _native_matvec_many
except ImportError:  # not built, or an extension built before it existed
    _native_matvec_many = None

ACTIVATIONS = ("f32", "f32-fma", "q8")
"""Values of ``qmatvec(..., activations=)``: fp32-accurate activations (split into int8 pieces
where the CPU has AVX2 or AVX-512 VNNI), the fp32-FMA kernels, or int8 with a scale per 32
(approximate)."""

ACT_CODES = {"f32": 2, "f32-fma": 0, "q8": 1}
"""The native kernels' ``act`` argument of each :data:`ACTIVATIONS` value (2 falls back to 0 where
no split kernel exists: the baseline build, Q8_0, unquantized types)."""

SPLIT_SHIFT = 8
"""Bits between the int8 pieces of :func:`split_activations`."""

Q8_GROUP = 32
"""Activations per int8 scale on the ``activations="q8"`` path."""

Q8_TINY = 2.0 ** -96
"""Groups of activations with ``max|x| < Q8_TINY`` quantize to zero (``activations="q8"``)."""

FALLBACK_CHUNK_ROWS = 256
"""Rows dequantized at a time by the numpy product (bounds its temporary memory)."""


def qmatvec(qtype: int | GGMLType, blocks: torch.Tensor | np.ndarray, x: torch.Tensor, threads: int | None = None,
            *, use_native: bool | None = None, out: torch.Tensor | None = None,
            activations: str = "f32") -> torch.Tensor:
    """``y = W @ x`` for a ggml-quantized weight ``W`` and one activation row.

    ``qtype``: the ggml type id of ``blocks``. ``blocks``: uint8, contiguous, ``[rows, row_bytes]``
    or flat ``[rows * row_bytes]`` (``row_bytes = cols // block_size * type_size``). ``x``: ``[cols]``
    or ``[1, cols]``, any float dtype (widened to fp32). ``threads``: kernel threads (None: torch's
    thread count). ``use_native``: None = the C kernel when built; False forces the numpy fallback;
    True requires the C kernel. ``out``: optional fp32 contiguous CPU ``[rows]`` tensor to write
    (saves an allocation per call). Returns fp32 ``[rows]`` (``out`` when given). ``ValueError``
    for unsupported types, mismatched sizes, a ``cols`` that is not a multiple of the type's
    block size, or an ``activations`` not in :data:`ACTIVATIONS`.

    ``activations``: ``"f32"`` (default) is the exact product described in the module docstring
    (split activations on AVX-512 VNNI and AVX2, :func:`split_activations`); ``"f32-fma"`` the
    fp32-FMA kernels only.
    ``"q8"`` is an **approximation** (opt-in, faster: integer dot products, memory-bound on
    AVX-512 VNNI CPUs): ``x`` is quantized once per call with :func:`quantize_activations_q8`
    (per 32 consecutive values ``g``: scale ``s_g = max|x_g| / 127``, ``xq = rint(x / s_g)`` in
    ``[-127, 127]``; a finer granularity than llama.cpp's 256-value q8_K, so at least as
    accurate), and the result is, to fp32 rounding, ``y = W @ (xq * s)``: the dequantized weights
    times the dequantized int8 activations. The Q4_K / Q5_K min term (``dmin * m`` per 32-weight
    sub-block) uses the sums of the *quantized* ``x`` (``s_g * sum(xq_g)``, like llama.cpp's q8_K
    bsums), not the exact sums of ``x``: a weight's ``d*sc*q`` and ``-dmin*m`` parts are large and
    of opposite sign, and their activation rounding errors cancel only when both see the same
    ``x`` -- with the exact sums the error would scale with the ``d*sc*q`` part alone (measured
    ~7x larger on Q4_K_M model weights), so the quantized sums are the more accurate choice. Per
    row the integer sums are exact; only the per-sub-block fp32 scaling and the summation round.
    Accuracy against the exact product: ``|y_q8[r] - y[r]| <= sum_k |W[r, k]| * s_g(k) / 2 <=
    sqrt(32) / 254 * ||W[r]||_2 * ||x||_2`` (~0.022 ``||W[r]|| ||x||``) plus fp32 rounding; the
    rounding errors of independent activations largely cancel: measured at most ~6e-4 of
    ``||W[r]|| ||x||`` and ~0.5-0.6% of ``||y||`` (relative 2-norm error) with Gaussian
    activations, ~1.3% with 1% of the channels 20x larger (Q4_K_M weights). Non-finite values in
    a 32-group of ``x`` make its scale NaN (every output NaN). F32 / F16 / BF16 weights ignore
    ``activations`` (always exact). The C kernels use AVX-512 VNNI where available, otherwise
    AVX2 or portable C versions of the same integer math; the numpy fallback
    (``use_native=False``) computes the same quantized-``x`` product in fp32.
    """
    if activations not in ACTIVATIONS:
        raise ValueError(f"qmatvec: activations must be one of {ACTIVATIONS}, not {activations!r}")
    if x.dim() == 2 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 1 or not x.is_floating_point():
        raise ValueError(f"qmatvec: x must be a float [cols] or [1, cols] tensor, not {x.dtype} {tuple(x.shape)}")
    cols = x.shape[0]
    w = _as_uint8(blocks, "qmatvec")
    info, rows, row_bytes = _geometry(qtype, cols, w.size, "qmatvec")
    if w.ndim == 2 and w.shape[1] != row_bytes:
        raise ValueError(f"qmatvec: blocks rows of {w.shape[1]} bytes do not hold {cols} {info.ggml_type.name} "
                         f"weights ({row_bytes} bytes)")
    if x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous():
        x = x.to(device="cpu", dtype=torch.float32).contiguous()
    xf = (x.detach() if x.requires_grad else x).numpy()  # [cols] f32
    if out is None:
        out = torch.empty(rows, dtype=torch.float32)  # [rows]
    elif (out.dtype != torch.float32 or out.device.type != "cpu" or not out.is_contiguous()
          or out.numel() != rows):
        raise ValueError(f"qmatvec: out must be a contiguous fp32 CPU tensor of {rows} elements")
    y = out.numpy()  # [rows], shares memory with out
    q8 = activations == "q8" and info.quantized
    if _native_matvec is not None and use_native is not False:
        _native_matvec(int(qtype), w, xf, y, rows, cols, _threads(threads), ACT_CODES[activations])
    elif use_native:
        raise RuntimeError("qmatvec: the C extension flashtier._native is not built")
    else:
        wr = w.reshape(rows, row_bytes)
        y = y.reshape(rows)
        if q8:  # W @ deq(q8(x))
            xq, scales = quantize_activations_q8(xf)
            xf = (xq.reshape(-1, Q8_GROUP).astype(np.float32) * scales[:, None]).reshape(cols)  # [cols]
        for r0 in range(0, rows, FALLBACK_CHUNK_ROWS):
            chunk = dequantize_numpy(info.ggml_type, wr[r0:r0 + FALLBACK_CHUNK_ROWS], cols)  # [n, cols] f32
            np.matmul(chunk, xf, out=y[r0:r0 + chunk.shape[0]])
    return out


def quantize_activations_q8(x: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The int8 activations of ``qmatvec(..., activations="q8")``, exactly as the C kernels
    compute them: ``x`` fp32 ``[cols]`` (``cols`` a multiple of 32) -> ``(xq, scales)``, ``xq`` int8
    ``[cols]`` and ``scales`` fp32 ``[cols // 32]``, with ``x ~= xq * scales`` per 32 consecutive
    values. Per group ``g``: ``scales[g] = max|x_g| / 127``, ``xq = rint(x * (1 / scale))`` (fp32
    operations, round half to even) clipped to ``[-127, 127]``; ``scale = 0`` and ``xq = 0`` where
    ``max|x_g| < 2**-96`` (:data:`Q8_TINY`; all-zero groups, and it keeps ``1 / scale`` finite);
    ``scale = NaN`` and ``xq = 0`` where the group holds an inf or NaN."""
    xf = (x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor)
          else np.asarray(x, dtype=np.float32)).reshape(-1, Q8_GROUP)  # [cols/32, 32]
    finite = np.isfinite(xf).all(axis=1)
    amax = np.abs(np.where(finite[:, None], xf, 0)).max(axis=1)
    scales = np.where(amax < np.float32(Q8_TINY), np.float32(0), amax / np.float32(127))
    scales = np.where(finite, scales, np.float32(np.nan)).astype(np.float32)  # [cols/32]
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(scales > 0, np.float32(1) / scales, np.float32(0)).astype(np.float32)  # [cols/32]
        q = np.rint(xf * inv[:, None])
    q = np.where((scales > 0)[:, None], np.clip(q, -127, 127), 0)
    return q.astype(np.int8).reshape(-1), scales


def split_activations(x: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The split activations of ``qmatvec(..., activations="f32")`` on AVX2 / AVX-512 CPUs, exactly
    as the C kernels compute them: ``x`` fp32 ``[cols]`` (a multiple of 32) -> ``(pieces, scales)``,
    ``pieces`` int8 ``[3, cols]`` and ``scales`` fp32 ``[cols // 32]`` with
    ``x ~= scales * (65536 * pieces[0] + 256 * pieces[1] + pieces[2])`` per 32 values. Per group:
    ``s1 = max|x| / 127``; ``x1 = rint(x * (1 / s1))`` in ``[-127, 127]``; ``r1 = x - s1 * x1``
    (one rounding: an FMA); ``x2 = rint(r1 * (256 / s1))``, and where that is 128 (``r1`` at
    ``+s1 / 2``) ``x1 + 1`` and ``x2`` from the new remainder; ``x2`` in ``[-128, 127]``;
    ``r2 = r1 - (s1 / 256) * x2``; ``x3 = rint(r2 * (65536 / s1))`` clipped to ``[-128, 127]``;
    ``scale = s1 / 65536``. So ``|x - scale * c| <= scale`` (half of it unless ``x3`` was clipped).
    Groups below :data:`Q8_TINY` or holding an inf / NaN: pieces 0, scale 0 / NaN (as
    :func:`quantize_activations_q8`)."""
    xf = (x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor)
          else np.asarray(x, dtype=np.float32)).reshape(-1, Q8_GROUP)  # [G, 32]
    finite = np.isfinite(xf).all(axis=1)
    amax = np.abs(np.where(finite[:, None], xf, 0)).max(axis=1)
    s1 = np.where(amax < np.float32(Q8_TINY), np.float32(0), amax / np.float32(127)).astype(np.float32)  # [G]
    ok = (s1 > 0) & finite
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv = np.where(ok, np.float32(1) / s1, np.float32(0)).astype(np.float32)[:, None]  # [G, 1]
        s = s1[:, None].astype(np.float64)

        def rem(v: np.ndarray, q: np.ndarray, step: np.ndarray) -> np.ndarray:  # v - step * q, rounded once
            return (v.astype(np.float64) - step * q.astype(np.float64)).astype(np.float32)

        x1 = np.clip(np.rint(xf * inv), -127, 127)
        r1 = rem(xf, x1, s)
        k2, k3 = inv * np.float32(256), inv * np.float32(65536)
        up = (np.rint(r1 * k2) > 127) & (x1 < 127)
        x1 = x1 + up
        r1 = rem(xf, x1, s)
        x2 = np.clip(np.rint(r1 * k2), -128, 127)
        r2 = rem(r1, x2, (s1 / np.float32(256))[:, None].astype(np.float64))
        x3 = np.clip(np.rint(r2 * k3), -128, 127)
    pieces = np.stack([np.where(ok[:, None], p, 0) for p in (x1, x2, x3)]).astype(np.int8)  # [3, G, 32]
    scales = np.where(finite, s1 / np.float32(65536), np.float32(np.nan)).astype(np.float32)  # [G]
    return pieces.reshape(3, -1), scales
