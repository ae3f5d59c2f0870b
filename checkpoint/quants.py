"""Quantize and dequantize weights in ggml's block formats, in vectorised numpy.

Contract: ``quantize(w, t)`` turns float weights ``[..., cols]`` into the bytes ``[..., row_bytes]``
that ggml (llama.cpp) stores for type ``t``; ``dequantize(b, t, shape)`` turns them back into float32.
The block layouts are those in :mod:`flashtier.checkpoint.ggml_types`, bit-compatible with ggml:
``dequantize`` gives exactly the floats ``gguf.quants.dequantize`` gives for the same bytes (the same
float32 operations in the same order), and Q8_0 / Q4_0 / BF16 ``quantize`` give exactly the bytes of
ggml's reference ``quantize_row_*_ref`` (as reproduced by ``gguf.quants.quantize``).

The K-quants follow ggml's reference quantizers without an importance matrix:

* Q4_K / Q5_K (``quantize_row_q{4,5}_K_ref``): per 32-weight sub-block a scale and a min are fitted
  by ``make_qkx2_quants`` (weighted least squares over a sweep of candidate scales, weights
  ``rms(sub-block) + |x|``); the eight scales and eight mins are then quantized to 6 bits against the
  super-block's ``d = max_scale / 63`` and ``dmin = max_min / 63`` (both f16), and the weights are
  requantized against the rounded scales.
* Q6_K (``quantize_row_q6_K_ref``): per 16-weight sub-block a signed scale from ``make_qx_quants``
  (``rmse_type = 1``: weights ``x**2``, 19 candidate scales), quantized to int8 against
  ``d = -max_scale / 128``.

They agree with ggml up to float summation order (numpy sums pairwise, C sums left to right, and the
candidate errors here are computed from expanded sums in float64), so a block may now and then pick
a neighbouring candidate scale; the layouts and the error level are the same.

Vectorisation: every step runs over all (sub-)blocks of a chunk at once; the only Python loops are
over the fixed candidate-scale sweeps (21 steps for Q4_K, 16 for Q5_K, 19 for Q6_K).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from flashtier.checkpoint.ggml_types import GGMLType, TypeInfo, type_info

QK_K = 256
CHUNK_WEIGHTS = 1 << 18
"""Weights quantized per vectorised step: large enough to amortise numpy's per-call cost, small
enough that a step's temporaries stay in cache."""


# --------------------------------------------------------------------------------------------------
# small helpers


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    """float32 ``[n]`` -> the little-endian f16 bytes ``[n, 2]`` (round to nearest even, as ggml)."""
    with np.errstate(over="ignore"):  # an overflow to inf is caught (and reported) by quantize
        return np.ascontiguousarray(v, dtype=np.float32).astype("<f2").view(np.uint8).reshape(-1, 2)


def _f16_value(b: np.ndarray) -> np.ndarray:
    """f16 bytes ``[n, 2]`` -> float32 ``[n, 1]``."""
    return np.ascontiguousarray(b).view("<f2").astype(np.float32).reshape(-1, 1)


def _round_away(v: np.ndarray) -> np.ndarray:
    """C ``roundf`` (halves away from zero), exactly, in float32."""
    a = np.abs(v)
    fl = np.floor(a)
    return np.copysign(fl + (a - fl >= 0.5), v)


def _rsum(a: np.ndarray) -> np.ndarray:
    """Sum over the last axis, as float64 (the candidate errors below subtract nearly equal sums)."""
    return a.sum(axis=-1, dtype=np.float64)


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise dot product ``[n, k] . [n, k] -> [n]`` in float64."""
    return np.einsum("ij,ij->i", a, b, dtype=np.float64)


# --------------------------------------------------------------------------------------------------
# plain float types (block size 1)


def _q_f32(x: np.ndarray) -> np.ndarray:
    return x.astype("<f4").view(np.uint8)


def _dq_f32(b: np.ndarray) -> np.ndarray:
    return b.view("<f4").astype(np.float32)


def _q_f16(x: np.ndarray) -> np.ndarray:
    if np.abs(x).max(initial=0.0) > 65504.0:
        raise ValueError(f"values up to {np.abs(x).max():g} overflow F16 (largest finite 65504); use BF16 or F32")
    return x.astype("<f2").view(np.uint8)


def _dq_f16(b: np.ndarray) -> np.ndarray:
    return b.view("<f2").astype(np.float32)


def _q_bf16(x: np.ndarray) -> np.ndarray:
    u = x.view(np.uint32)  # finite input only: no NaN quieting needed, and no uint32 overflow
    r = (u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    return r.astype("<u2").view(np.uint8)


def _dq_bf16(b: np.ndarray) -> np.ndarray:
    return (b.view("<u2").astype(np.uint32) << np.uint32(16)).view(np.float32)


# --------------------------------------------------------------------------------------------------
# Q8_0 and Q4_0: 32-weight blocks, one f16 scale


def _q_q8_0(x: np.ndarray) -> np.ndarray:  # x: [n, 32]
    d = np.abs(x).max(axis=1, keepdims=True) / np.float32(127)  # [n, 1]
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    q = _round_away(x * inv).astype(np.int8)
    return np.concatenate([_f16_bytes(d), q.view(np.uint8)], axis=1)


def _dq_q8_0(b: np.ndarray) -> np.ndarray:  # b: [n, 34]
    return _f16_value(b[:, :2]) * b[:, 2:].view(np.int8).astype(np.float32)


def _q_q4_0(x: np.ndarray) -> np.ndarray:  # x: [n, 32]
    imax = np.abs(x).argmax(axis=1)[:, None]  # first weight of largest magnitude, as ggml
    d = np.take_along_axis(x, imax, axis=1) / np.float32(-8)  # [n, 1]
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    q = np.minimum(np.trunc(x * inv + np.float32(8.5)), 15).astype(np.uint8)  # [n, 32] in 0..15
    qs = q[:, :16] | (q[:, 16:] << np.uint8(4))
    return np.concatenate([_f16_bytes(d), qs], axis=1)


def _dq_q4_0(b: np.ndarray) -> np.ndarray:  # b: [n, 18]
    qs = b[:, 2:]
    q = np.concatenate([qs & np.uint8(15), qs >> np.uint8(4)], axis=1).astype(np.int8) - np.int8(8)
    return _f16_value(b[:, :2]) * q.astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Q4_K / Q5_K: 256-weight super-blocks of 8 sub-blocks with 6-bit scales and mins


def _make_qkx2(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml's ``make_qkx2_quants`` over every row of ``x`` ``[s, 32]`` at once (``use_mad = false``).

    Fits ``x ~ scale * l + min`` with integer ``l`` in ``0..nmax`` and ``min <= 0``, minimising the
    ``w``-weighted squared error over the candidate inverse scales ``(nmax + rmin + rdelta*i) /
    (max - min)``, ``i = 0..nstep``, each followed by a least-squares refit. As in ggml, the sweep
    measures ``max - min`` from the best min so far. Returns ``(scale [s], -min [s])``, float32.
    """
    f32 = np.float32
    mn = np.minimum(x.min(axis=1), f32(0))  # [s]
    mx = x.max(axis=1)
    sum_w = _rsum(w)
    sum_x = _dot(w, x)
    sum_x2 = _dot(w * x, x)

    def sums(iscale: np.ndarray, lo: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        l = np.clip(np.rint(iscale[:, None] * (x - lo[:, None])), 0, nmax)  # [s, 32]
        wl = w * l
        return _rsum(wl), _dot(wl, l), _dot(wl, x)

    def error(scale: np.ndarray, lo: np.ndarray, sl: np.ndarray, sl2: np.ndarray, sxl: np.ndarray) -> np.ndarray:
        # sum w (scale*l + lo - x)^2, expanded so that only the sums above pass over the weights
        s, m = scale.astype(np.float64), lo.astype(np.float64)
        return s * s * sl2 + m * m * sum_w + sum_x2 + 2 * (s * m * sl - s * sxl - m * sum_x)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        flat = mx == mn
        iscale = np.where(flat, f32(0), f32(nmax) / (mx - mn))
        scale = np.where(flat, f32(0), f32(1) / iscale)
        best = error(scale, mn, *sums(iscale, mn))
        for i in range(nstep + 1):
            iscale = (f32(rmin) + f32(rdelta) * f32(i) + f32(nmax)) / (mx - mn)
            sl, sl2, sxl = sums(iscale, mn)
            det = sum_w * sl2 - sl * sl
            this_scale = ((sum_w * sxl - sum_x * sl) / det).astype(f32)
            this_min = ((sl2 * sum_x - sl * sxl) / det).astype(f32)
            clamp = this_min > 0
            this_min = np.where(clamp, f32(0), this_min)
            this_scale = np.where(clamp, (sxl / sl2).astype(f32), this_scale)
            err = error(this_scale, this_min, sl, sl2, sxl)
            take = (det > 0) & (err < best) & ~flat
            best = np.where(take, err, best)
            scale = np.where(take, this_scale, scale)
            mn = np.where(take, this_min, mn)
    return scale, -mn


def _pack_k_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """6-bit scales and mins ``[n, 8]`` each -> ggml's 12-byte ``scales`` field ``[n, 12]``."""
    out = np.empty((ls.shape[0], 12), np.uint8)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 15) | ((lm[:, 4:] & 15) << 4)
    return out


def _unpack_k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's ``get_scale_min_k4`` for all eight sub-blocks: ``[n, 12]`` -> (scales, mins) ``[n, 8]``."""
    a, b, c = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([a & 63, (c & 15) | ((a >> 6) << 4)], axis=1)
    mn = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=1)
    return sc, mn


@dataclass(frozen=True, slots=True)
class _KxSearch:
    """Parameters of ``make_qkx2_quants`` for one K-type, as ggml's reference quantizer uses them."""

    nmax: int
    rmin: float
    rdelta: float
    nstep: int


def _quantize_qk_min(x: np.ndarray, p: _KxSearch) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Shared part of Q4_K / Q5_K: ``x [n, 256]`` -> (d f16 bytes, dmin f16 bytes, scales [n, 12],
    levels ``[n, 8, 32]`` uint8 in ``0..nmax``)."""
    n = x.shape[0]
    xs = x.reshape(n * 8, 32)
    av = np.sqrt((xs * xs).mean(axis=1, dtype=np.float32))  # [n*8]
    w = av[:, None] + np.abs(xs)
    scale, the_min = _make_qkx2(xs, w, p.nmax, p.rmin, p.rdelta, p.nstep)
    scale, the_min = scale.reshape(n, 8), the_min.reshape(n, 8)

    max_scale = np.maximum(scale.max(axis=1), np.float32(0))  # [n]
    max_min = np.maximum(the_min.max(axis=1), np.float32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, np.float32(63) / max_scale, np.float32(0))
        inv_min = np.where(max_min > 0, np.float32(63) / max_min, np.float32(0))
    ls = np.clip(np.rint(inv_scale[:, None] * scale), 0, 63).astype(np.uint8)  # [n, 8]
    lm = np.clip(np.rint(inv_min[:, None] * the_min), 0, 63).astype(np.uint8)
    d16 = _f16_bytes(max_scale / np.float32(63))
    dmin16 = _f16_bytes(max_min / np.float32(63))

    d = (_f16_value(d16) * ls.astype(np.float32))[:, :, None]  # [n, 8, 1]
    dm = (_f16_value(dmin16) * lm.astype(np.float32))[:, :, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        l = np.rint((x.reshape(n, 8, 32) + dm) / d)
    l = np.where(d == 0, 0, np.clip(l, 0, p.nmax)).astype(np.uint8)  # [n, 8, 32]
    return d16, dmin16, _pack_k_scales(ls, lm), l


_Q4_K_SEARCH = _KxSearch(nmax=15, rmin=-1.0, rdelta=0.1, nstep=20)
_Q5_K_SEARCH = _KxSearch(nmax=31, rmin=-0.5, rdelta=0.1, nstep=15)


def _q_q4_k(x: np.ndarray) -> np.ndarray:  # x: [n, 256] -> [n, 144]
    d, dmin, scales, l = _quantize_qk_min(x, _Q4_K_SEARCH)
    l = l.reshape(-1, 4, 2, 32)  # sub-blocks 2g and 2g+1 share bytes 32g..32g+31
    qs = (l[:, :, 0] | (l[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([d, dmin, scales, qs], axis=1)


def _q_q5_k(x: np.ndarray) -> np.ndarray:  # x: [n, 256] -> [n, 176]
    d, dmin, scales, l = _quantize_qk_min(x, _Q5_K_SEARCH)  # l: [n, 8, 32] in 0..31
    hi = (l >> 4) << np.arange(8, dtype=np.uint8)[None, :, None]
    qh = np.bitwise_or.reduce(hi, axis=1)  # [n, 32]: bit s of byte j is sub-block s, weight j
    lo = (l & 15).reshape(-1, 4, 2, 32)
    qs = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([d, dmin, scales, qh, qs], axis=1)


def _dq_qk_min(b: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Shared tail of Q4_K / Q5_K dequantization: ``w = (d*sc)*q - dmin*m`` in float32."""
    sc, m = _unpack_k_scales(b[:, 4:16])
    d = (_f16_value(b[:, 0:2]) * sc.astype(np.float32))[:, :, None]  # [n, 8, 1]
    dm = (_f16_value(b[:, 2:4]) * m.astype(np.float32))[:, :, None]
    return (d * q.astype(np.float32) - dm).reshape(-1, QK_K)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """``qs [n, 128]`` -> 4-bit levels of the 8 sub-blocks ``[n, 8, 32]`` (low nibbles first)."""
    qs = qs.reshape(-1, 4, 1, 32)
    return np.concatenate([qs & 15, qs >> 4], axis=2).reshape(-1, 8, 32)


def _dq_q4_k(b: np.ndarray) -> np.ndarray:  # b: [n, 144]
    return _dq_qk_min(b, _nibbles(b[:, 16:]))


def _dq_q5_k(b: np.ndarray) -> np.ndarray:  # b: [n, 176]
    qh = b[:, 16:48][:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]  # [n, 8, 32]
    return _dq_qk_min(b, _nibbles(b[:, 48:]) | ((qh & 1) << 4))


# --------------------------------------------------------------------------------------------------
# Q6_K: 256-weight super-blocks of 16 sub-blocks with int8 scales


def _make_qx(x: np.ndarray, nmax: int) -> np.ndarray:
    """ggml's ``make_qx_quants(n, nmax, x, L, rmse_type=1, NULL)`` over every row of ``x [s, k]``:
    the signed scale (float32 ``[s]``) of ``x ~ scale * l``, ``l`` in ``-nmax..nmax-1``, best in
    ``x**2``-weighted least squares over the inverse scales ``-(nmax + 0.1*i) / max``, ``|i| <= 9``."""
    f32 = np.float32
    imax = np.abs(x).argmax(axis=1)[:, None]
    mx = np.take_along_axis(x, imax, axis=1)[:, 0]  # the weight of largest magnitude, signed
    zero = np.abs(mx) < f32(1e-15)
    w = x * x
    wx = w * x

    def fit(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        l = np.clip(np.rint(iscale[:, None] * x), -nmax, nmax - 1)
        return _dot(wx, l), _dot(w * l, l)

    with np.errstate(divide="ignore", invalid="ignore"):
        sumlx, suml2 = fit(np.where(zero, f32(0), f32(-nmax) / mx))
        scale = np.where(suml2 > 0, sumlx / suml2, 0.0)
        best = scale * sumlx
        for i in (*range(-9, 0), *range(1, 10)):
            sumlx, suml2 = fit(-(f32(nmax) + f32(0.1) * f32(i)) / mx)
            take = (suml2 > 0) & (sumlx * sumlx > best * suml2) & ~zero
            scale = np.where(take, sumlx / suml2, scale)
            best = np.where(take, scale * sumlx, best)
    return np.where(zero, 0.0, scale).astype(f32)


def _q_q6_k(x: np.ndarray) -> np.ndarray:  # x: [n, 256] -> [n, 210]
    f32 = np.float32
    n = x.shape[0]
    scales = _make_qx(x.reshape(n * 16, 16), 32).reshape(n, 16)
    imax = np.abs(scales).argmax(axis=1)[:, None]
    max_scale = np.take_along_axis(scales, imax, axis=1)[:, 0]  # [n], signed
    empty = np.abs(max_scale) < f32(1e-15)
    with np.errstate(divide="ignore"):
        iscale = np.where(empty, f32(0), f32(-128) / max_scale)
        d16 = _f16_bytes(np.where(empty, f32(0), f32(1) / iscale))
    sc = np.minimum(np.rint(iscale[:, None] * scales), 127).astype(np.int8)  # [n, 16]
    d = (_f16_value(d16) * sc.astype(f32))[:, :, None]  # [n, 16, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        l = np.rint(x.reshape(n, 16, 16) / d)
    l = (np.where(d == 0, 0, np.clip(l, -32, 31)) + 32).astype(np.uint8)  # [n, 16, 16] in 0..63
    l = l.reshape(n, 2, 4, 32)  # [block half, quarter, weight]
    ql = ((l[:, :, 0:2] & 15) | ((l[:, :, 2:4] & 15) << 4)).reshape(n, 128)
    qh = np.bitwise_or.reduce((l >> 4) << np.array([0, 2, 4, 6], np.uint8)[None, None, :, None], axis=2)
    return np.concatenate([ql, qh.reshape(n, 64), sc.view(np.uint8), d16], axis=1)


def _dq_q6_k(b: np.ndarray) -> np.ndarray:  # b: [n, 210]
    ql = b[:, :128].reshape(-1, 2, 1, 2, 32)  # [n, half, nibble, quarter pair, weight]
    lo = np.concatenate([ql & 15, ql >> 4], axis=2).reshape(-1, 2, 4, 32)
    hi = (b[:, 128:192].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[None, None, :, None]) & 3
    q = ((lo | (hi << 4)).astype(np.int8) - np.int8(32)).reshape(-1, 16, 16)
    d = (_f16_value(b[:, 208:210]) * b[:, 192:208].view(np.int8).astype(np.float32))[:, :, None]
    return (d * q.astype(np.float32)).reshape(-1, QK_K)


# --------------------------------------------------------------------------------------------------
# public API


@dataclass(frozen=True, slots=True)
class _Codec:
    """Block codec: ``encode`` float32 ``[n, block_size]`` -> uint8 ``[n, type_size]``; ``decode`` back."""

    encode: Callable[[np.ndarray], np.ndarray]
    decode: Callable[[np.ndarray], np.ndarray]


_CODECS: dict[GGMLType, _Codec] = {
    GGMLType.F32: _Codec(_q_f32, _dq_f32),
    GGMLType.F16: _Codec(_q_f16, _dq_f16),
    GGMLType.BF16: _Codec(_q_bf16, _dq_bf16),
    GGMLType.Q8_0: _Codec(_q_q8_0, _dq_q8_0),
    GGMLType.Q4_0: _Codec(_q_q4_0, _dq_q4_0),
    GGMLType.Q4_K: _Codec(_q_q4_k, _dq_q4_k),
    GGMLType.Q5_K: _Codec(_q_q5_k, _dq_q5_k),
    GGMLType.Q6_K: _Codec(_q_q6_k, _dq_q6_k),
}


def _codec(qtype: int | GGMLType) -> tuple[TypeInfo, _Codec]:
    info = type_info(qtype)  # ValueError naming the supported types for any other
    return info, _CODECS[info.ggml_type]


def _chunks(n_blocks: int, block_size: int) -> range:
    return range(0, n_blocks, max(1, CHUNK_WEIGHTS // block_size))


def quantize(w: np.ndarray, qtype: int | GGMLType) -> np.ndarray:
    """Quantize float weights ``w [..., cols]`` to type ``qtype``: uint8 ``[..., row_bytes]``.

    ``ValueError`` if ``qtype`` is not supported, ``cols`` is not a multiple of its block size, ``w``
    holds a NaN or infinity, or a value does not fit the type's f16 scales (F16: ``|w| > 65504``).
    """
    info, codec = _codec(qtype)
    w = np.asarray(w)
    if w.ndim == 0 or not np.issubdtype(w.dtype, np.floating):
        raise ValueError(f"quantize wants a float array of shape [..., cols], not {w.dtype} {list(w.shape)}")
    cols = w.shape[-1]
    row_bytes = info.row_bytes(cols)  # ValueError if cols is not a multiple of the block size
    x = np.ascontiguousarray(w, dtype=np.float32)
    if not np.isfinite(x).all():
        bad = np.argwhere(~np.isfinite(x))[0]
        raise ValueError(f"cannot quantize to {info.ggml_type.name}: non-finite value {x[tuple(bad)]} at index {bad.tolist()}")
    blocks = x.reshape(-1, info.block_size)  # [n_blocks, block_size]
    out = np.empty((blocks.shape[0], info.type_size), np.uint8)
    for i in _chunks(blocks.shape[0], info.block_size):
        j = i + max(1, CHUNK_WEIGHTS // info.block_size)
        # blocks of subnormal weights overflow 1/d to inf on the way, as in ggml; their f16 d is 0
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            out[i:j] = codec.encode(blocks[i:j]).reshape(-1, info.type_size)
            overflow = info.quantized and not np.isfinite(codec.decode(out[i:j])).all()
        if overflow:
            big = np.abs(blocks[i:j]).max()
            raise ValueError(f"cannot quantize to {info.ggml_type.name}: values up to {big:g} overflow its f16 block scales")
    return out.reshape(*w.shape[:-1], row_bytes)


def dequantize(blocks: np.ndarray, qtype: int | GGMLType, shape: tuple[int, ...] | list[int]) -> np.ndarray:
    """Decode ggml bytes of type ``qtype`` (``[rows, row_bytes]`` or flat) to float32 of ``shape``."""
    info, codec = _codec(qtype)
    shape = tuple(int(s) for s in shape)
    if not shape:
        raise ValueError("dequantize wants the tensor's shape [..., cols], not a scalar shape")
    want = info.nbytes(shape)  # ValueError if the row length is not a multiple of the block size
    b = np.ascontiguousarray(blocks).view(np.uint8).reshape(-1)
    if b.size != want:
        raise ValueError(f"{info.ggml_type.name} tensor of shape {list(shape)} takes {want} bytes, got {b.size}")
    b = b.reshape(-1, info.type_size)  # [n_blocks, type_size]
    out = np.empty((b.shape[0], info.block_size), np.float32)
    for i in _chunks(b.shape[0], info.block_size):
        j = i + max(1, CHUNK_WEIGHTS // info.block_size)
        out[i:j] = codec.decode(b[i:j]).reshape(-1, info.block_size)
    return out.reshape(shape)


__all__ = ["dequantize", "quantize"]
