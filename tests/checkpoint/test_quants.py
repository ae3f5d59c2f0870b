"""ggml block quantizers: round trips within each type's error, bytes bit-compatible with the gguf
package (llama.cpp's Python reference) both ways, quality and choices matching ggml's scalar
reference quantizers, and clear errors for bad input."""

from __future__ import annotations

import time

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from flashtier.checkpoint.ggml_types import SUPPORTED, GGMLType
from flashtier.checkpoint.quants import dequantize, quantize

T = GGMLType
QUANTIZED = [T.Q8_0, T.Q4_0, T.Q4_K, T.Q5_K, T.Q6_K]
ALL = [T.F32, T.F16, T.BF16, *QUANTIZED]

REL_RMS = {T.F32: 0.0, T.F16: 5e-4, T.BF16: 3e-3, T.Q8_0: 0.006, T.Q4_0: 0.095, T.Q4_K: 0.075, T.Q5_K: 0.038, T.Q6_K: 0.019}
"""Relative RMS error on Gaussian weights (a 256x1024 tensor; measured: Q8_0 .0054, Q4_0 .086,
Q4_K .071, Q5_K .036, Q6_K .0177, BF16 .0017, F16 .0002), with a little headroom."""

MAX_ERR = {T.F32: 0.0, T.F16: 2**-11, T.BF16: 2**-8, T.Q8_0: 1 / 254 + 1e-3, T.Q4_0: 1 / 8 + 1e-3, T.Q4_K: 0.1, T.Q5_K: 0.06, T.Q6_K: 0.03}
"""Largest error of one weight, as a fraction of the largest magnitude in its block (of 32 for Q8_0 /
Q4_0, of 256 for the K-types): half a step, a full step where ggml clips (Q4_0's positive end)."""


def _gguf(t: GGMLType) -> gguf.GGMLQuantizationType:
    return gguf.GGMLQuantizationType(int(t))


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def _block(t: GGMLType) -> int:
    return SUPPORTED[t].block_size if SUPPORTED[t].quantized else 32


# ---------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("t", ALL, ids=lambda t: t.name)
def test_gaussian_error_matches_llama_cpp_level(t):
    w = np.random.default_rng(0).standard_normal((256, 1024)).astype(np.float32)
    b = quantize(w, t)
    assert b.dtype == np.uint8 and b.shape == (256, SUPPORTED[t].row_bytes(1024))
    r = dequantize(b, t, w.shape)
    assert r.dtype == np.float32 and r.shape == w.shape
    rel = np.sqrt(((r - w) ** 2).mean() / (w**2).mean())
    assert rel <= REL_RMS[t], f"{t.name}: relative RMS error {rel:.4f}"


@settings(max_examples=25, deadline=None)
@given(
    t=st.sampled_from(ALL),
    rows=st.integers(1, 3),
    blocks=st.integers(1, 2),
    seed=st.integers(0, 2**32 - 1),
    kind=st.sampled_from(["normal", "heavy", "positive", "negative", "sparse", "wide"]),
    magnitude=st.floats(0.1, 1000.0),
)
def test_round_trip_error_bounded_per_block(t, rows, blocks, seed, kind, magnitude):
    # weights of many shapes: every weight lies within MAX_ERR of its block's largest magnitude
    bs = _block(t) if t in QUANTIZED else 256
    rng = np.random.default_rng(seed)
    x = {
        "normal": lambda n: rng.standard_normal(n),
        "heavy": lambda n: rng.standard_t(1.5, n),
        "positive": lambda n: rng.random(n) + 3,
        "negative": lambda n: -rng.random(n) - 3,
        "sparse": lambda n: np.where(rng.random(n) < 0.9, 0.0, rng.standard_normal(n)),
        "wide": lambda n: rng.standard_normal(n) * np.exp(rng.uniform(-5, 5, n)),
    }[kind](rows * blocks * bs).reshape(-1, bs)
    amax = np.abs(x).max(axis=1, keepdims=True)
    x = (x / np.where(amax > 0, amax, 1) * magnitude).astype(np.float32).reshape(rows, blocks * bs)
    r = dequantize(quantize(x, t), t, x.shape)
    err = np.abs(r - x).reshape(-1, _block(t) if t in QUANTIZED else bs)
    amax = np.abs(x).reshape(err.shape).max(axis=1, keepdims=True)
    assert (err <= MAX_ERR[t] * amax + 1e-4).all(), f"{t.name}: worst {(err / np.maximum(amax, 1e-30)).max():.4f}"


@settings(max_examples=20, deadline=None)
@given(x=hnp.arrays(np.float32, (2, 256), elements=st.floats(-100, 100, width=32)))
def test_round_trip_arbitrary_floats(x):
    # hypothesis' own floats: zeros, repeats, subnormals, exact ties
    for t in QUANTIZED:
        r = dequantize(quantize(x, t), t, x.shape)
        err = np.abs(r - x).reshape(-1, _block(t))
        amax = np.abs(x).reshape(err.shape).max(axis=1, keepdims=True)
        assert (err <= MAX_ERR[t] * amax + 1e-4).all(), t.name


def test_shapes_leading_dims_and_flat_bytes():
    w = np.random.default_rng(1).standard_normal((3, 4, 512)).astype(np.float32)  # [experts, rows, cols]
    b = quantize(w, T.Q4_K)
    assert b.shape == (3, 4, 2 * 144)
    flat = dequantize(b.reshape(-1), T.Q4_K, w.shape)
    assert np.array_equal(flat, dequantize(b.reshape(12, -1), T.Q4_K, w.shape))
    assert flat.shape == w.shape


def test_zero_and_constant_blocks():
    for t in QUANTIZED:
        z = np.zeros((1, 256), np.float32)
        assert not dequantize(quantize(z, t), t, z.shape).any(), t.name
        c = np.full((1, 256), 0.5, np.float32)
        assert np.allclose(dequantize(quantize(c, t), t, c.shape), c, atol=0.5 * MAX_ERR[t]), t.name


def test_q4_k_speed_vectorised():
    # a 5632x2048 Q4_K takes ~1.3 s on one core; a per-block Python loop would take minutes
    w = np.random.default_rng(2).standard_normal((1408, 2048)).astype(np.float32)
    t0 = time.perf_counter()
    quantize(w, T.Q4_K)
    assert time.perf_counter() - t0 < 5.0


# ---------------------------------------------------------------------------------------------
# bit compatibility with the gguf package


def _valid_bytes(t: GGMLType, raw: bytes, n_blocks: int) -> np.ndarray:
    """Random bytes made into valid blocks: every f16/bf16/f32 value finite."""
    info = SUPPORTED[t]
    b = np.frombuffer(raw, np.uint8).copy().reshape(n_blocks, info.type_size)
    if t == T.F32:
        v = b.view(np.uint32)
        v[(v & 0x7F800000) == 0x7F800000] &= ~np.uint32(0x40000000)
        return b
    if t == T.BF16:
        v = b.view(np.uint16)
        v[(v & 0x7F80) == 0x7F80] &= ~np.uint16(0x4000)
        return b
    f16_at = {T.F16: [0], T.Q8_0: [0], T.Q4_0: [0], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}[t]
    for off in f16_at:
        hi = b[:, off + 1]
        b[:, off + 1] = np.where((hi & 0x7C) == 0x7C, hi & ~np.uint8(0x40), hi)
    return b


@settings(max_examples=40, deadline=None)
@given(t=st.sampled_from(ALL), n_blocks=st.integers(1, 6), data=st.data())
def test_dequantize_bit_identical_to_gguf(t, n_blocks, data):
    info = SUPPORTED[t]
    n_blocks *= max(1, 32 // info.block_size)  # F32/F16/BF16: rows of 32
    raw = data.draw(st.binary(min_size=n_blocks * info.type_size, max_size=n_blocks * info.type_size))
    b = _valid_bytes(t, raw, n_blocks).reshape(1, -1)
    shape = (1, n_blocks * info.block_size)
    ours = dequantize(b, t, shape)
    ref = gguf.quants.dequantize(b, _gguf(t)).reshape(shape)
    assert np.array_equal(_bits(ours), _bits(ref))


@settings(max_examples=30, deadline=None)
@given(
    t=st.sampled_from([T.Q8_0, T.Q4_0, T.BF16]),
    x=hnp.arrays(np.float32, st.tuples(st.integers(1, 3), st.sampled_from([32, 64, 96])), elements=st.floats(-1e4, 1e4, width=32)),
)
def test_quantize_bit_identical_to_gguf(t, x):
    # gguf.quants.quantize reproduces ggml's quantize_row_{q8_0,q4_0}_ref and fp32->bf16 exactly
    assert np.array_equal(quantize(x, t), gguf.quants.quantize(x, _gguf(t)))


def test_quantize_ties_and_outliers_match_gguf():
    x = np.zeros((1, 64), np.float32)
    x[0, :32] = np.arange(32) * 0.5 - 8  # Q8_0: halves after scaling; Q4_0: max magnitude is negative
    x[0, 32] = 254.0  # id = 0.5: odd integers land exactly on .5
    x[0, 33:64] = np.arange(31) * 2 + 1
    for t in (T.Q8_0, T.Q4_0, T.BF16):
        assert np.array_equal(quantize(x, t), gguf.quants.quantize(x, _gguf(t))), t.name


def test_k_quant_bytes_decode_with_gguf():
    w = np.random.default_rng(3).standard_normal((4, 768)).astype(np.float32)
    for t in (T.Q4_K, T.Q5_K, T.Q6_K):
        b = quantize(w, t)
        assert np.array_equal(_bits(dequantize(b, t, w.shape)), _bits(gguf.quants.dequantize(b, _gguf(t))))


# ---------------------------------------------------------------------------------------------
# agreement with ggml's scalar reference quantizers (a float32 port of ggml-quants.c)

f32 = np.float32


def _ref_make_qkx2(x, w, nmax, rmin, rdelta, nstep):
    mn, mx = f32(min(x.min(), 0)), x.max()
    if mx == mn:
        return f32(0), -mn
    sum_w, sum_x = f32(w.sum()), f32((w * x).sum())

    def fit(iscale, lo):
        return np.clip(np.rint(iscale * (x - lo)), 0, nmax).astype(f32)

    def err(s, lo, l):
        return float((w * (s * l + lo - x) ** 2).sum())

    iscale = f32(nmax) / (mx - mn)
    scale = f32(1) / iscale
    best = err(scale, mn, fit(iscale, mn))
    for i in range(nstep + 1):
        iscale = (f32(rmin) + f32(rdelta) * f32(i) + f32(nmax)) / (mx - mn)
        l = fit(iscale, mn)
        sl, sl2, sxl = f32((w * l).sum()), f32((w * l * l).sum()), f32((w * l * x).sum())
        det = sum_w * sl2 - sl * sl
        if det > 0:
            ts, tm = (sum_w * sxl - sum_x * sl) / det, (sl2 * sum_x - sl * sxl) / det
            if tm > 0:
                ts, tm = sxl / sl2, f32(0)
            e = err(ts, tm, l)
            if e < best:
                best, scale, mn = e, ts, tm
    return scale, -mn


def _ref_q4_k_scales(x):
    """(d, dmin, 6-bit scales, 6-bit mins) of one super-block, as quantize_row_q4_K_ref."""
    sm = []
    for j in range(8):
        xs = x[32 * j : 32 * j + 32]
        w = np.sqrt(f32((xs * xs).sum()) / f32(32)) + np.abs(xs)
        sm.append(_ref_make_qkx2(xs, w, 15, -1.0, 0.1, 20))
    scales, mins = np.array([s for s, _ in sm], f32), np.array([m for _, m in sm], f32)
    ms, mm = max(scales.max(), f32(0)), max(mins.max(), f32(0))
    ls = np.minimum(np.rint(f32(63) / ms * scales), 63).astype(int)
    lm = np.minimum(np.rint(f32(63) / mm * mins), 63).astype(int)
    return np.float16(ms / f32(63)), np.float16(mm / f32(63)), ls, lm


def _our_q4_k_scales(b):
    a, m, c = b[4:8].astype(int), b[8:12].astype(int), b[12:16].astype(int)
    ls = np.concatenate([a & 63, (c & 15) | ((a >> 6) << 4)])
    lm = np.concatenate([m & 63, (c >> 4) | ((m >> 6) << 4)])
    return b[0:2].view(np.float16)[0], b[2:4].view(np.float16)[0], ls, lm


def test_q4_k_scales_match_ggml_reference():
    # same sweep, same picks: the scale/min choice agrees with ggml's on (nearly) every block; ties
    # broken by summation order may pick a neighbour, so allow one block in eight to differ
    x = np.random.default_rng(4).standard_normal((8, 256)).astype(np.float32)
    b = quantize(x, T.Q4_K)
    same = 0
    for i in range(8):
        d, dmin, ls, lm = _ref_q4_k_scales(x[i])
        od, odmin, ols, olm = _our_q4_k_scales(b[i])
        same += d == od and dmin == odmin and (ls == ols).all() and (lm == olm).all()
    assert same >= 7


# ---------------------------------------------------------------------------------------------
# errors


def test_bad_input_errors():
    w = np.ones((2, 100), np.float32)
    with pytest.raises(ValueError, match="multiples of 32"):
        quantize(w, T.Q8_0)
    with pytest.raises(ValueError, match="multiples of 256"):
        quantize(np.ones((2, 96), np.float32), T.Q4_K)
    with pytest.raises(ValueError, match="Q4_1 is not supported; supported: F32"):
        quantize(np.ones((1, 32), np.float32), T.Q4_1)
    with pytest.raises(ValueError, match="not supported"):
        dequantize(np.zeros(20, np.uint8), T.Q5_0, (1, 32))
    for bad in (np.nan, np.inf, -np.inf):
        x = np.ones((2, 256), np.float32)
        x[1, 7] = bad
        with pytest.raises(ValueError, match=r"non-finite value .* at index \[1, 7\]"):
            quantize(x, T.Q6_K)
    with pytest.raises(ValueError, match="overflow F16"):
        quantize(np.full((1, 4), 1e5, np.float32), T.F16)
    with pytest.raises(ValueError, match="overflow its f16 block scales"):
        quantize(np.full((1, 32), 1e7, np.float32), T.Q8_0)
    with pytest.raises(ValueError, match="float array"):
        quantize(np.ones((1, 32), np.int32), T.Q8_0)
    with pytest.raises(ValueError, match="takes 144 bytes, got 143"):
        dequantize(np.zeros(143, np.uint8), T.Q4_K, (1, 256))
    with pytest.raises(ValueError, match="multiples of 256"):
        dequantize(np.zeros(144, np.uint8), T.Q4_K, (2, 128))


# ---------------------------------------------------------------------------------------------
# torch dequantizers (the accelerator path): bit-identical to the numpy reference on the CPU


@settings(max_examples=40, deadline=None)
@given(t=st.sampled_from(ALL), rows=st.integers(1, 4), blocks=st.integers(1, 3), seed=st.integers(0, 2**32 - 1))
def test_torch_dequantizers_equal_the_reference_bit_for_bit(t, rows, blocks, seed):
    import torch

    from flashtier.checkpoint.dequant import dequantize_numpy
    from flashtier.checkpoint.dequant_torch import dequantize_torch

    cols = blocks * (SUPPORTED[t].block_size if SUPPORTED[t].quantized else 32)
    raw = np.random.default_rng(seed).integers(0, 256, (rows, SUPPORTED[t].row_bytes(cols)), dtype=np.uint8)
    with np.errstate(invalid="ignore", over="ignore"):
        want = dequantize_numpy(t, raw, cols)
    got = dequantize_torch(t, torch.from_numpy(raw), cols).numpy()
    assert got.shape == want.shape == (rows, cols) and got.dtype == np.float32
    nan = np.isnan(want)  # random bytes make some fp16 scales NaN: the same places, any payload
    assert np.array_equal(nan, np.isnan(got))
    assert np.array_equal(_bits(np.where(nan, 0, want)), _bits(np.where(nan, 0, got)))


@pytest.mark.parametrize("t", ALL, ids=lambda t: t.name)
def test_torch_dequantizers_match_gguf_on_quantized_weights(t):
    import torch

    from flashtier.checkpoint.dequant_torch import dequantize_torch

    w = np.random.default_rng(1).standard_normal((8, 512)).astype(np.float32)
    b = quantize(w, t)
    want = gguf.quants.dequantize(b, _gguf(t)).reshape(8, 512)
    assert np.array_equal(_bits(dequantize_torch(t, torch.from_numpy(b), 512).numpy()), _bits(want))
