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

from flashtier.checkpoint.ggml_types import GGMLType, TypeInfo, type_info

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

ACTIVATIONS = ("f32", "q8")
"""Values of ``qmatvec(..., activations=)``: exact fp32 activations, or int8 with a scale per 32."""

Q8_GROUP = 32
"""Activations per int8 scale on the ``activations="q8"`` path."""

Q8_TINY = 2.0 ** -96
"""Groups of activations with ``max|x| < Q8_TINY`` quantize to zero (``activations="q8"``)."""

FALLBACK_CHUNK_ROWS = 256
"""Rows dequantized at a time by the numpy product (bounds its temporary memory)."""


def native_available() -> bool:
    """Whether the C kernels (``flashtier._native.q_matvec`` / ``q_dequantize``) are built."""
    return _native_matvec is not None


def _threads(threads: int | None) -> int:
    return max(1, int(threads) if threads is not None else torch.get_num_threads())


_INFO: dict[int, TypeInfo] = {}


def _info(qtype: int | GGMLType) -> TypeInfo:
    """``type_info`` memoised per id (this runs once per decode product)."""
    info = _INFO.get(qtype)
    if info is None:
        info = _INFO[qtype] = type_info(qtype)  # ValueError for unsupported / unknown types
    return info


def _as_uint8(blocks: torch.Tensor | np.ndarray, what: str) -> np.ndarray:
    """The weight bytes as a contiguous uint8 numpy array (no copy for contiguous CPU input)."""
    if isinstance(blocks, torch.Tensor):
        if blocks.dtype != torch.uint8:
            raise ValueError(f"{what}: blocks must be a uint8 tensor of ggml block bytes, not {blocks.dtype}")
        if blocks.device.type != "cpu":
            raise ValueError(f"{what}: blocks must be on the CPU, not {blocks.device}")
        return (blocks if blocks.is_contiguous() else blocks.contiguous()).numpy()
    arr = np.ascontiguousarray(blocks)
    if arr.dtype != np.uint8:
        raise ValueError(f"{what}: blocks must be uint8 ggml block bytes, not {arr.dtype}")
    return arr


def _geometry(qtype: int | GGMLType, cols: int, nbytes: int, what: str) -> tuple[TypeInfo, int, int]:
    """(type info, rows, row_bytes) of ``nbytes`` of type-``qtype`` rows of ``cols`` weights."""
    info = _info(qtype)
    if cols <= 0:
        raise ValueError(f"{what}: cols must be positive, not {cols}")
    row_bytes = info.row_bytes(cols)  # ValueError unless cols is a multiple of the block size
    if nbytes % row_bytes:
        raise ValueError(f"{what}: {nbytes} bytes are not whole {info.ggml_type.name} rows of {cols} weights "
                         f"({row_bytes} bytes each)")
    return info, nbytes // row_bytes, row_bytes


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

    ``activations``: ``"f32"`` (default) is the exact product described in the module docstring.
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
        if q8:
            _native_matvec(int(qtype), w, xf, y, rows, cols, _threads(threads), 1)
        else:
            _native_matvec(int(qtype), w, xf, y, rows, cols, _threads(threads))
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


def dequantize(qtype: int | GGMLType, blocks: torch.Tensor | np.ndarray, rows: int, cols: int,
               threads: int | None = None, *, use_native: bool | None = None) -> torch.Tensor:
    """The fp32 weights ``[rows, cols]`` of ``rows`` ggml rows of type ``qtype``, bit-identical to
    ``gguf.quants.dequantize``. ``blocks``: uint8, ``rows * row_bytes`` bytes (any shape,
    contiguous). ``threads`` / ``use_native`` as in :func:`qmatvec`. ``ValueError`` on mismatched
    sizes or unsupported types."""
    w = _as_uint8(blocks, "dequantize")
    info, n_rows, row_bytes = _geometry(qtype, cols, w.size, "dequantize")
    if n_rows != rows:
        raise ValueError(f"dequantize: {w.size} bytes hold {n_rows} {info.ggml_type.name} rows of {cols} weights, "
                         f"not {rows}")
    if use_native and _native_dequantize is None:
        raise RuntimeError("dequantize: the C extension flashtier._native is not built")
    if _native_dequantize is not None and use_native is not False:
        out = np.empty((rows, cols), np.float32)  # [rows, cols]
        _native_dequantize(int(info.ggml_type), w, out, rows, cols, _threads(threads))
        return torch.from_numpy(out)
    return torch.from_numpy(dequantize_numpy(info.ggml_type, w.reshape(rows, row_bytes), cols))


# ---------------------------------------------------------------- numpy dequantizers (fallback)
# Each takes blocks [n, type_size] uint8 and returns [n, block_size] float32, with the float32
# operations of ggml's dequantize_row_* in the same order (so bit-identical to gguf-py).


def _f16(b: np.ndarray) -> np.ndarray:
    """[n, 2] uint8 -> [n, 1] float32 (exact)."""
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _k_scale_min(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K packed scales [n, 12] -> 6-bit scales and mins, each [n, 8] uint8."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=1)
    return sc, mn


def _dq_q8_0(b: np.ndarray) -> np.ndarray:
    return b[:, 2:].view(np.int8).astype(np.float32) * _f16(b[:, :2])


def _dq_q4_0(b: np.ndarray) -> np.ndarray:
    qs = b[:, 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int8) - np.int8(8)  # [n, 32]
    return _f16(b[:, :2]) * q.astype(np.float32)


def _dq_k_min(b: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Q4_K / Q5_K: ``(d*sc) * q - dmin*m`` per 32-weight sub-block; q [n, 8, 32]."""
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (_f16(b[:, 0:2]) * sc.astype(np.float32)).reshape(n, 8, 1)
    dm = (_f16(b[:, 2:4]) * mn.astype(np.float32)).reshape(n, 8, 1)
    return (d * q.astype(np.float32) - dm).reshape(n, 256)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, 128] -> [n, 8, 32]: per 32 bytes, the low nibbles (one sub-block), then the high ones."""
    qs = qs.reshape(qs.shape[0], 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (qs & 0x0F).reshape(qs.shape[0], 8, 32)


def _dq_q4_k(b: np.ndarray) -> np.ndarray:
    return _dq_k_min(b, _nibbles(b[:, 16:144]))


def _dq_q5_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    qh = b[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)  # bit j -> sub-block j
    return _dq_k_min(b, _nibbles(b[:, 48:176]) | ((qh & 1) << 4))


def _dq_q6_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    ql, qh = b[:, 0:128], b[:, 128:192]
    d = (_f16(b[:, 208:210]) * b[:, 192:208].view(np.int8).astype(np.float32)).reshape(n, 16, 1)
    lo = ql.reshape(n, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)  # [n, 2, 2, 64]
    hi = qh.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)  # [n, 2, 4, 32]
    q = (lo & 0x0F).reshape(n, 2, 4, 32) | ((hi & 3) << 4)
    q = (q.astype(np.int8) - np.int8(32)).reshape(n, 16, 16).astype(np.float32)
    return (d * q).reshape(n, 256)


_BLOCK_DEQUANT = {
    GGMLType.Q8_0: _dq_q8_0,
    GGMLType.Q4_0: _dq_q4_0,
    GGMLType.Q4_K: _dq_q4_k,
    GGMLType.Q5_K: _dq_q5_k,
    GGMLType.Q6_K: _dq_q6_k,
}


def dequantize_numpy(qtype: int | GGMLType, blocks: np.ndarray, cols: int) -> np.ndarray:
    """Vectorised numpy dequantization: ``blocks`` uint8 ``[rows, row_bytes]`` -> float32
    ``[rows, cols]``, bit-identical to ``gguf.quants.dequantize``."""
    info = type_info(qtype)
    b = np.ascontiguousarray(blocks, dtype=np.uint8)
    rows = b.shape[0]
    t = info.ggml_type
    if t == GGMLType.F32:
        return b.view(np.float32).reshape(rows, cols).copy()
    if t == GGMLType.F16:
        return b.view(np.float16).astype(np.float32).reshape(rows, cols)
    if t == GGMLType.BF16:
        return (b.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(rows, cols)
    return _BLOCK_DEQUANT[t](b.reshape(-1, info.type_size)).reshape(rows, cols)
