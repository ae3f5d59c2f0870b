"""GGUF-block decode kernels (runtime/quant_kernels.py, flashtier._native.q_matvec / q_dequantize)
against gguf-py's reference dequantization: dequantization bit-exact, products within fp32 rounding
of the fp64 product of the dequantized weights, on every code path (AVX-512, AVX2, baseline, numpy
fallback), and argument errors as ValueError."""

from __future__ import annotations

from collections.abc import Iterator

import gguf
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flashtier.checkpoint.ggml_types import GGMLType, type_info
from flashtier.runtime import quant_kernels as qk

TYPES = [GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_K, GGMLType.Q5_K,
         GGMLType.Q6_K]
K_MIN_TYPES = {GGMLType.Q4_K: 144, GGMLType.Q5_K: 176}
"""Types with a per-sub-block min: zeroing bytes 16.. (the quants) leaves -dmin*m per weight."""

if qk.native_available():
    from flashtier import _native

    SUPPORTED_LEVEL = _native.q_isa()
    LEVELS = [lv for lv in (4, 3, 0) if lv <= SUPPORTED_LEVEL]
else:  # only the numpy fallback can be tested
    _native = None
    SUPPORTED_LEVEL = -1
    LEVELS = []
needs_native = pytest.mark.skipif(_native is None, reason="C extension flashtier._native not built")


def at_level(lv: int | None, why_none: str) -> Iterator[int]:
    """The body of the level fixtures: kernel level ``lv`` set for the test, restored afterwards;
    skipped (``why_none``) when there is none to test."""
    if lv is None:
        pytest.skip(why_none)
    assert _native.q_set_isa(lv) == lv
    yield lv
    _native.q_set_isa(SUPPORTED_LEVEL)


@pytest.fixture(params=LEVELS or [None], ids=lambda lv: f"isa{lv}")
def level(request: pytest.FixtureRequest) -> Iterator[int]:
    """Each kernel level the CPU supports (4 AVX-512, 3 AVX2, 0 baseline); restored afterwards."""
    yield from at_level(request.param, "C extension flashtier._native not built")


def random_blocks(t: GGMLType, rows: int, cols: int, seed: int) -> np.ndarray:
    """Valid [rows, row_bytes] bytes of type ``t``: random quants / scales (every bit pattern is a
    valid block) with finite f16 super-scales of a realistic size (both signs)."""
    rng = np.random.default_rng(seed)
    info = type_info(t)
    if t == GGMLType.F32:
        return rng.standard_normal((rows, cols)).astype(np.float32).view(np.uint8)
    if t == GGMLType.F16:
        return rng.standard_normal((rows, cols)).astype(np.float16).view(np.uint8)
    if t == GGMLType.BF16:
        bits = rng.standard_normal((rows, cols)).astype(np.float32).view(np.uint32) >> 16
        return bits.astype(np.uint16).view(np.uint8)
    n = rows * cols // info.block_size
    b = rng.integers(0, 256, (n, info.type_size), dtype=np.uint8)

    def f16(scale: float) -> np.ndarray:
        return rng.uniform(-scale, scale, n).astype(np.float16).view(np.uint8).reshape(n, 2)

    if t in (GGMLType.Q8_0, GGMLType.Q4_0):
        b[:, 0:2] = f16(0.05)
    elif t in K_MIN_TYPES:
        b[:, 0:2], b[:, 2:4] = f16(0.005), f16(0.005)
    else:  # Q6_K: d at the end
        b[:, 208:210] = f16(0.005)
    return b.reshape(rows, -1)


def reference(t: GGMLType, blocks: np.ndarray, rows: int, cols: int) -> np.ndarray:
    return gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType(int(t))).reshape(rows, cols).astype(np.float32)


def magnitude(t: GGMLType, blocks: np.ndarray, w: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Per weight, the size of the terms the kernel may sum separately: |w|, plus |dmin*m| for
    the min types (their kernels sum d*sc*q*x and dmin*m*sum(x) apart)."""
    mag = np.abs(w).astype(np.float64)
    if t in K_MIN_TYPES:
        zeroed = blocks.reshape(-1, K_MIN_TYPES[t]).copy()
        zeroed[:, 16:] = 0
        mins = reference(t, zeroed.reshape(rows, -1), rows, cols)  # -dmin*m per weight
        mag = mag + 2 * np.abs(mins)
    return mag


def assert_product_close(t: GGMLType, blocks: np.ndarray, y: np.ndarray, x: np.ndarray, rows: int, cols: int) -> None:
    w = reference(t, blocks, rows, cols)
    exact = w.astype(np.float64) @ x.astype(np.float64)  # [rows]
    # fp32 rounding of the products and of a summation tree at most cols/16 + 32 deep
    tol = (cols / 16 + 32) * 2.0 ** -24 * (magnitude(t, blocks, w, rows, cols) @ np.abs(x.astype(np.float64)))
    err = np.abs(y.astype(np.float64) - exact)
    assert (err <= tol + 1e-30).all(), f"max error {err.max():.3e}, tolerance {tol[err.argmax()]:.3e}"


shapes = st.tuples(st.sampled_from(TYPES), st.integers(1, 80), st.integers(1, 4), st.integers(1, 3),
                   st.integers(0, 2**31))


def _cols(t: GGMLType, n: int, seed: int) -> int:
    bs = type_info(t).block_size
    return n * bs if bs > 1 else 1 + seed % 300


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=shapes)
def test_dequantize_bit_exact(level: int, case: tuple) -> None:
    t, rows, nb, threads, seed = case
    cols = _cols(t, nb, seed)
    blocks = random_blocks(t, rows, cols, seed)
    out = qk.dequantize(t, torch.from_numpy(blocks), rows, cols, threads, use_native=True)
    assert out.dtype == torch.float32 and out.shape == (rows, cols)
    assert np.array_equal(out.numpy().view(np.uint32), reference(t, blocks, rows, cols).view(np.uint32))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=shapes)
def test_qmatvec_within_fp32_rounding(level: int, case: tuple) -> None:
    t, rows, nb, threads, seed = case
    cols = _cols(t, nb, seed)
    blocks = random_blocks(t, rows, cols, seed)
    x = torch.from_numpy(np.random.default_rng(seed + 1).standard_normal(cols).astype(np.float32))
    y = qk.qmatvec(t, torch.from_numpy(blocks), x, threads, use_native=True)
    assert y.dtype == torch.float32 and y.shape == (rows,)
    assert_product_close(t, blocks, y.numpy(), x.numpy(), rows, cols)


@needs_native
@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_threaded_many_rows_matches_one_thread(t: GGMLType) -> None:
    """Rows split over the pool (several parts, a ragged tail) give the same result as one thread."""
    rows, cols = 333, 2 * max(type_info(t).block_size, 256)
    blocks = random_blocks(t, rows, cols, 7)
    x = torch.randn(cols)
    y1 = qk.qmatvec(t, torch.from_numpy(blocks), x, 1)
    y3 = qk.qmatvec(t, torch.from_numpy(blocks), x, 3)
    assert torch.equal(y1, y3)
    assert_product_close(t, blocks, y3.numpy(), x.numpy(), rows, cols)
    d3 = qk.dequantize(t, torch.from_numpy(blocks), rows, cols, 3)
    assert np.array_equal(d3.numpy().view(np.uint32), reference(t, blocks, rows, cols).view(np.uint32))


@needs_native
@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_prefetch_mode_changes_no_result(t: GGMLType) -> None:
    """The weight prefetch (Intel: into L2 4 KiB ahead; others: non-temporal 2 KiB ahead) is a hint
    only: both modes give the same bits, exact and int8 activations, one and several threads."""
    rows, cols = 77, 4 * max(type_info(t).block_size, 256)  # rows of several KiB: the prefetch runs ahead
    blocks = torch.from_numpy(random_blocks(t, rows, cols, 11))
    x = torch.randn(cols)
    before = _native.q_prefetch()
    try:
        out = {}
        for mode in ("nta", "l2"):
            _native.q_prefetch(mode)
            out[mode] = [qk.qmatvec(t, blocks, x, th, activations=act) for th in (1, 2) for act in ("f32", "q8")]
        assert all(torch.equal(a, b) for a, b in zip(out["nta"], out["l2"]))
    finally:
        _native.q_prefetch(before)
    assert _native.q_prefetch() == before


@needs_native
def test_prefetch_mode_bad_value_is_an_error() -> None:
    with pytest.raises(ValueError, match="'l2' or 'nta'"):
        _native.q_prefetch("t0")


@settings(max_examples=40, deadline=None)
@given(case=shapes)
def test_numpy_fallback(case: tuple) -> None:
    t, rows, nb, _, seed = case
    cols = _cols(t, nb, seed)
    blocks = random_blocks(t, rows, cols, seed)
    out = qk.dequantize(t, torch.from_numpy(blocks), rows, cols, use_native=False)
    assert np.array_equal(out.numpy().view(np.uint32), reference(t, blocks, rows, cols).view(np.uint32))
    x = torch.from_numpy(np.random.default_rng(seed + 1).standard_normal(cols).astype(np.float32))
    y = qk.qmatvec(t, torch.from_numpy(blocks), x, use_native=False)
    assert y.dtype == torch.float32 and y.shape == (rows,)
    assert_product_close(t, blocks, y.numpy(), x.numpy(), rows, cols)


def test_fallback_chunks_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qk, "FALLBACK_CHUNK_ROWS", 3)
    t, rows, cols = GGMLType.Q4_K, 10, 256
    blocks = random_blocks(t, rows, cols, 3)
    x = torch.randn(cols)
    y = qk.qmatvec(t, torch.from_numpy(blocks), x, use_native=False)
    assert_product_close(t, blocks, y.numpy(), x.numpy(), rows, cols)


@pytest.mark.parametrize("native", [pytest.param(True, marks=needs_native), False], ids=["native", "numpy"])
def test_input_forms(native: bool) -> None:
    """[1, K] activations of any float dtype, flat or 2-D block bytes, numpy bytes."""
    t, rows, cols = GGMLType.Q8_0, 5, 64
    blocks = random_blocks(t, rows, cols, 1)
    x = torch.randn(1, cols).to(torch.bfloat16)
    ref = qk.qmatvec(t, torch.from_numpy(blocks), x[0].float(), 1, use_native=native)
    for b in (torch.from_numpy(blocks), torch.from_numpy(blocks.reshape(-1)), blocks):
        assert torch.equal(qk.qmatvec(t, b, x, 1, use_native=native), ref)
    assert torch.equal(qk.qmatvec(int(t), torch.from_numpy(blocks), x.half(), use_native=native),
                       qk.qmatvec(t, torch.from_numpy(blocks), x.half().float(), use_native=native))
    out = torch.full((rows,), float("nan"))
    assert qk.qmatvec(t, torch.from_numpy(blocks), x, 1, use_native=native, out=out) is out
    assert torch.equal(out, ref)
    with pytest.raises(ValueError, match="out must be"):
        qk.qmatvec(t, torch.from_numpy(blocks), x, 1, use_native=native, out=torch.empty(rows + 1))


# ---------------------------------------------------------------- argument errors


@pytest.mark.parametrize("native", [pytest.param(True, marks=needs_native), False], ids=["native", "numpy"])
def test_wrapper_rejects_bad_arguments(native: bool) -> None:
    blocks = torch.from_numpy(random_blocks(GGMLType.Q4_K, 4, 256, 0))
    x = torch.randn(256)
    with pytest.raises(ValueError, match="not supported"):
        qk.qmatvec(GGMLType.Q4_1, blocks, x, use_native=native)
    with pytest.raises(ValueError, match="not supported"):
        qk.qmatvec(99, blocks, x, use_native=native)
    with pytest.raises(ValueError, match="multiples of 256"):
        qk.qmatvec(GGMLType.Q4_K, blocks, torch.randn(128), use_native=native)
    with pytest.raises(ValueError, match="whole Q4_K rows"):
        qk.qmatvec(GGMLType.Q4_K, blocks.reshape(-1)[:-1], x, use_native=native)
    with pytest.raises(ValueError, match="do not hold"):
        qk.qmatvec(GGMLType.Q4_K, blocks.reshape(8, 72), x, use_native=native)
    with pytest.raises(ValueError, match="uint8"):
        qk.qmatvec(GGMLType.Q4_K, blocks.view(torch.int8), x, use_native=native)
    with pytest.raises(ValueError, match="float"):
        qk.qmatvec(GGMLType.Q4_K, blocks, torch.ones(256, dtype=torch.int32), use_native=native)
    with pytest.raises(ValueError, match="not 5"):
        qk.dequantize(GGMLType.Q4_K, blocks, 5, 256, use_native=native)
    with pytest.raises(ValueError, match="multiples of 32"):
        qk.dequantize(GGMLType.Q8_0, blocks, 4, 48, use_native=native)


@needs_native
def test_native_rejects_bad_arguments() -> None:
    rows, cols = 4, 256
    w = random_blocks(GGMLType.Q4_K, rows, cols, 0).reshape(-1)
    x, out = np.zeros(cols, np.float32), np.zeros(rows, np.float32)
    _native.q_matvec(12, w, x, out, rows, cols, 1)  # well-formed
    bad = [
        ((3, w, x, out, rows, cols, 1), "not supported"),
        ((12, w, x, out, rows, 128, 1), "multiple of 256"),
        ((12, w[:-1], x, out, rows, cols, 1), "bytes"),
        ((12, w, x[:-1], out, rows, cols, 1), "x must be fp32"),
        ((12, w, x, out[:-1], rows, cols, 1), "out must be fp32"),
        ((12, w, x, out, -1, cols, 1), ">= 0"),
        ((0, np.zeros(9, np.uint8)[1:], x[:2], out[:1], 1, 2, 1), "aligned"),
    ]
    for args, msg in bad:
        with pytest.raises(ValueError, match=msg):
            _native.q_matvec(*args)
    with pytest.raises(ValueError, match=r"out must be fp32 \[4, 256\]"):
        _native.q_dequantize(12, w, np.zeros(rows * cols - 1, np.float32), rows, cols, 1)
    with pytest.raises(ValueError, match="not supported"):
        _native.q_dequantize(99, w, np.zeros(rows * cols, np.float32), rows, cols, 1)
    with pytest.raises(TypeError):
        _native.q_matvec(12, w, x, out.view(np.uint8)[:0].tobytes(), rows, cols, 1)  # read-only output


@needs_native
def test_empty_shapes() -> None:
    out = np.full(3, 7, np.float32)
    _native.q_matvec(8, b"", b"", out, 3, 0, 1)
    assert (out == 0).all()
    _native.q_matvec(8, b"", np.zeros(32, np.float32), np.zeros(0, np.float32), 0, 32, 1)


# ---------------------------------------------------------------- int8 activations (activations="q8")

Q8_TYPES = [GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K]
Q8_ERROR_BOUND = np.sqrt(32) / 254
"""|y_q8 - y_exact| <= Q8_ERROR_BOUND * ||W[r]||_2 * ||x||_2 (+ fp32 rounding): Cauchy-Schwarz on
|x - deq(q8(x))| <= s_g / 2 = max|x_g| / 254 per value (sum over a group of 32 <= 32 max|x_g|^2 / 254^2)."""


def q8_reference(t: GGMLType, blocks: np.ndarray, x: np.ndarray, rows: int, cols: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(y_ref, tol, exact, half_step): the q8 contract in fp64, ``dequant(W) @ dequant(q8(x))``; its
    fp32 rounding tolerance; the exact product ``W @ x``; and ``s_g / 2`` per activation."""
    w = reference(t, blocks, rows, cols).astype(np.float64)
    xq, scales = qk.quantize_activations_q8(x)
    s = np.repeat(scales.astype(np.float64), 32)  # [cols]
    xdq = xq.astype(np.float64) * s
    x64 = x.astype(np.float64)
    y = w @ xdq
    # the same fp32 rounding budget as the exact path, on max(|x|, |deq(q8(x))|)
    mag = magnitude(t, blocks, w.astype(np.float32), rows, cols)
    tol = (cols / 16 + 32) * 2.0 ** -24 * (mag @ np.maximum(np.abs(x64), np.abs(xdq)))
    return y, tol, w @ x64, s / 2


def assert_q8_close(t: GGMLType, blocks: np.ndarray, y: np.ndarray, x: np.ndarray, rows: int, cols: int) -> None:
    ref, tol, exact, half = q8_reference(t, blocks, x, rows, cols)
    err = np.abs(y.astype(np.float64) - ref)
    assert (err <= tol + 1e-30).all(), f"max error {err.max():.3e}, tolerance {tol[err.argmax()]:.3e}"
    # against the exact product: the activation rounding, at most half a step per value
    w = np.abs(reference(t, blocks, rows, cols).astype(np.float64))
    dev = np.abs(y.astype(np.float64) - exact)
    assert (dev <= w @ (half * (1 + 2.0 ** -20)) + 2 * tol + 1e-30).all()
    norms = np.sqrt((w ** 2).sum(1)) * np.linalg.norm(x.astype(np.float64))
    assert (dev <= Q8_ERROR_BOUND * norms + 2 * tol + 1e-30).all()


q8_shapes = st.tuples(st.sampled_from(Q8_TYPES), st.integers(1, 80), st.integers(1, 9), st.integers(1, 3),
                      st.integers(0, 2**31))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=q8_shapes)
def test_qmatvec_q8_matches_quantized_x_product(level: int, case: tuple) -> None:
    """Native int8-activation products (each kernel level) = the fp64 product of the dequantized
    weights and the dequantized int8 x to fp32 rounding, and within the stated bound of the exact
    product."""
    t, rows, nb, threads, seed = case
    cols = nb * type_info(t).block_size
    blocks = random_blocks(t, rows, cols, seed)
    x = np.random.default_rng(seed + 1).standard_normal(cols).astype(np.float32)
    y = qk.qmatvec(t, torch.from_numpy(blocks), torch.from_numpy(x), threads, use_native=True, activations="q8")
    assert y.dtype == torch.float32 and y.shape == (rows,)
    assert_q8_close(t, blocks, y.numpy(), x, rows, cols)


@settings(max_examples=40, deadline=None)
@given(case=q8_shapes)
def test_numpy_fallback_q8(case: tuple) -> None:
    t, rows, nb, _, seed = case
    cols = nb * type_info(t).block_size
    blocks = random_blocks(t, rows, cols, seed)
    x = np.random.default_rng(seed + 1).standard_normal(cols).astype(np.float32)
    y = qk.qmatvec(t, torch.from_numpy(blocks), torch.from_numpy(x), use_native=False, activations="q8")
    assert_q8_close(t, blocks, y.numpy(), x, rows, cols)


@needs_native
@pytest.mark.parametrize("t", Q8_TYPES, ids=lambda t: t.name)
def test_q8_levels_agree(t: GGMLType) -> None:
    """The AVX2 and baseline kernels compute the same int8 products as the AVX-512 VNNI one (equal
    up to the order of the fp32 sums), on shapes with a ragged thread split and partial groups."""
    for rows, nb in ((333, 7), (65, 1), (17, 3)):
        cols = nb * type_info(t).block_size
        blocks = random_blocks(t, rows, cols, rows + nb)
        x = torch.from_numpy(np.random.default_rng(nb).standard_normal(cols).astype(np.float32) * 3)
        ys = {}
        try:
            for lv in LEVELS:
                _native.q_set_isa(lv)
                ys[lv] = qk.qmatvec(t, torch.from_numpy(blocks), x, 3, activations="q8").numpy()
                assert np.array_equal(ys[lv], qk.qmatvec(t, torch.from_numpy(blocks), x, 1, activations="q8").numpy())
        finally:
            _native.q_set_isa(SUPPORTED_LEVEL)
        _, tol, _, _ = q8_reference(t, blocks, x.numpy(), rows, cols)
        for lv, y in ys.items():
            assert (np.abs(y.astype(np.float64) - ys[LEVELS[0]]) <= 2 * tol + 1e-30).all(), lv
            assert_q8_close(t, blocks, y, x.numpy(), rows, cols)


def identity_q8_0(n: int) -> np.ndarray:
    """Q8_0 bytes of the [n, n] identity (d = 1, q = 1 on the diagonal): y = deq(q8(x)) exactly."""
    b = np.zeros((n, n // 32, 34), np.uint8)
    b[:, :, 0:2] = np.full((n, n // 32), 1.0, np.float16).view(np.uint8).reshape(n, n // 32, 2)
    for r in range(n):
        b[r, r // 32, 2 + r % 32] = 1
    return b.reshape(n, -1)


@pytest.mark.parametrize("native", [pytest.param(True, marks=needs_native), False], ids=["native", "numpy"])
def test_q8_quantization_exact(level: int | None, native: bool) -> None:
    """The activations the kernels use are exactly quantize_activations_q8's: per 32 values one
    scale max|x| / 127, round half to even, zero / tiny groups -> 0, through an identity weight."""
    if not native and level not in (None, LEVELS[0]):
        pytest.skip("the numpy path has no kernel levels")
    rng = np.random.default_rng(5)
    x = rng.standard_normal(32 * 7).astype(np.float32) * np.float32(10.0) ** rng.integers(-3, 4, 32 * 7)
    x[0:32] = np.concatenate([[127.0, 2.5, -3.5, 0.5, -0.5, 126.5, -127.0, 1.5], np.arange(24) - 11.5])  # s = 1: ties
    x[32:64] = 0.0  # all-zero group
    x[64:96] = rng.standard_normal(32) * 2.0 ** -100  # below Q8_TINY: quantized to zero
    x[96:128] = rng.standard_normal(32) * 2.0 ** -90  # small but normal scales
    x = x.astype(np.float32)
    xq, scales = qk.quantize_activations_q8(x)
    assert xq.dtype == np.int8 and scales.dtype == np.float32 and np.abs(xq).max() == 127
    assert scales[0] == 1.0 and list(xq[:8]) == [127, 2, -4, 0, 0, 126, -127, 2]
    assert scales[1] == 0 and scales[2] == 0 and not xq[32:96].any()
    assert np.array_equal(xq[:32], np.rint(x[:32]).astype(np.int8))
    n = x.size
    y = qk.qmatvec(GGMLType.Q8_0, identity_q8_0(n), torch.from_numpy(x), 2, use_native=native,
                   activations="q8").numpy()
    s = np.repeat(scales, 32)
    with np.errstate(divide="ignore", invalid="ignore"):
        back = np.where(s > 0, np.rint(y / s), y)
    assert np.array_equal(back, xq.astype(np.float32))
    # a non-finite activation makes its group's scale NaN: every output NaN
    x[40] = np.inf
    assert np.isnan(qk.quantize_activations_q8(x)[1][1]) and not qk.quantize_activations_q8(x)[0][32:64].any()
    y = qk.qmatvec(GGMLType.Q8_0, identity_q8_0(n), torch.from_numpy(x), 2, use_native=native, activations="q8")
    assert torch.isnan(y).all()


@pytest.mark.parametrize("native", [pytest.param(True, marks=needs_native), False], ids=["native", "numpy"])
def test_q8_float_types_are_exact(native: bool) -> None:
    """F32 / F16 / BF16 weights ignore activations="q8" (the exact product)."""
    for t in (GGMLType.F32, GGMLType.F16, GGMLType.BF16):
        blocks = torch.from_numpy(random_blocks(t, 9, 100, 2))
        x = torch.randn(100)
        assert torch.equal(qk.qmatvec(t, blocks, x, 2, use_native=native, activations="q8"),
                           qk.qmatvec(t, blocks, x, 2, use_native=native))


@pytest.mark.parametrize("native", [pytest.param(True, marks=needs_native), False], ids=["native", "numpy"])
def test_q8_bad_activations(native: bool) -> None:
    blocks = torch.from_numpy(random_blocks(GGMLType.Q4_K, 4, 256, 0))
    for bad in ("int8", "F32", "", None):
        with pytest.raises(ValueError, match=r"activations must be one of \('f32', 'f32-fma', 'q8'\)"):
            qk.qmatvec(GGMLType.Q4_K, blocks, torch.randn(256), use_native=native, activations=bad)


@needs_native
def test_native_q8_arguments() -> None:
    rows, cols = 4, 256
    w = random_blocks(GGMLType.Q4_K, rows, cols, 0).reshape(-1)
    x, out = np.random.default_rng(0).standard_normal(cols).astype(np.float32), np.zeros(rows, np.float32)
    for bad in (3, -1):
        with pytest.raises(ValueError, match="act must be 0"):
            _native.q_matvec(12, w, x, out, rows, cols, 1, bad)
    _native.q_matvec(12, w, x, out, rows, cols, 1, 1)
    assert_q8_close(GGMLType.Q4_K, w.reshape(rows, -1), out, x, rows, cols)
    out0 = np.full(3, 7, np.float32)
    _native.q_matvec(8, b"", b"", out0, 3, 0, 1, 1)  # no columns: zeros
    assert (out0 == 0).all()
    if 3 in LEVELS:
        try:
            _native.q_set_isa(3)
            assert _native.q_vnni() is False  # level 3: the AVX2 int8 kernels
        finally:
            _native.q_set_isa(SUPPORTED_LEVEL)


# ------------------------------------------------------------------ several products of one x
many_cases = st.tuples(st.lists(st.sampled_from(TYPES[3:] + [GGMLType.F32, GGMLType.BF16]), min_size=1, max_size=4),
                       st.lists(st.integers(1, 90), min_size=4, max_size=4), st.integers(1, 3), st.integers(1, 3),
                       st.integers(0, 2), st.integers(0, 2**31), st.integers(1, 9))


@needs_native
@settings(max_examples=50, deadline=None)
@given(case=many_cases)
def test_matvec_many_equals_one_call_per_weight_and_row(case: tuple) -> None:
    """q_matvec_many (a layer's q, k, v as one pool job; x prepared once per type), for one x row
    or a batch of them (batched decode: the weights read once for all), gives every output bit
    for bit as q_matvec does for that weight and x row alone, fp32 (FMA or split) and int8
    activations, any thread count: batched quantized decode is batch-invariant."""
    types, rows, nb, threads, act, seed, batch = case
    cols = 256 * nb
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, cols)).astype(np.float32)  # [B, cols]
    specs, want = [], []
    for i, t in enumerate(types):
        blocks = random_blocks(t, rows[i], cols, seed + i).reshape(-1)
        alone = np.empty((batch, rows[i]), np.float32)
        for b in range(batch):
            _native.q_matvec(int(t), blocks, x[b], alone[b], rows[i], cols, threads, act)
        want.append(alone)
        specs.append((int(t), blocks, np.full((batch, rows[i]), np.nan, np.float32), rows[i]))
    if batch == 1:
        _native.q_matvec_many(x[0], cols, threads, act, tuple(specs))
    else:
        _native.q_matvec_many(x, cols, threads, act, tuple(specs), batch)
    for (_, _, got, _), alone in zip(specs, want):
        assert np.array_equal(got.view(np.uint32), alone.view(np.uint32))


@needs_native
def test_matvec_many_rejects_bad_arguments() -> None:
    cols = 256
    w = random_blocks(GGMLType.Q4_K, 4, cols, 0).reshape(-1)
    x, out = np.zeros(cols, np.float32), np.zeros(4, np.float32)
    _native.q_matvec_many(x, cols, 2, 0, ((12, w, out, 4),))  # well-formed
    for specs, msg in [((), "1 to 8"), (tuple((12, w, out, 4) for _ in range(9)), "1 to 8"),
                       ([(12, w, out, 4)], "tuple"), (((12, w[:-1], out, 4),), "bytes"),
                       (((12, w, out[:-1], 4),), "out 0 must be fp32"), (((3, w, out, 4),), "not supported")]:
        with pytest.raises(ValueError, match=msg):
            _native.q_matvec_many(x, cols, 2, 0, specs)
    with pytest.raises(ValueError, match="x must be fp32"):
        _native.q_matvec_many(x[:-1], cols, 2, 0, ((12, w, out, 4),))
    for bad_act in (3, -1):
        with pytest.raises(ValueError, match="act must be 0"):
            _native.q_matvec_many(x, cols, 2, bad_act, ((12, w, out, 4),))
    with pytest.raises(TypeError):
        _native.q_matvec_many(x, cols, 2, 0, ((12, w, out),))
    x2, out2 = np.zeros((2, cols), np.float32), np.zeros((2, 4), np.float32)
    _native.q_matvec_many(x2, cols, 2, 0, ((12, w, out2, 4),), 2)  # well-formed batch
    for args, msg in [((x2, cols, 2, 0, ((12, w, out2, 4),), 0), "batch must be"),
                      ((x2, cols, 2, 0, ((12, w, out2, 4),), 3), "x must be fp32"),
                      ((x2, cols, 2, 0, ((12, w, out, 4),), 2), "out 0 must be fp32")]:
        with pytest.raises(ValueError, match=msg):
            _native.q_matvec_many(*args)


# ------------------------------------------------------------------ split activations (activations="f32")
SPLIT_TYPES = [GGMLType.Q4_0, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K]
HAS_VNNI = _native is not None and SUPPORTED_LEVEL >= 4 and bool(_native.q_vnni())
SPLIT_LEVELS = ([4] if HAS_VNNI else []) + ([3] if 3 in LEVELS else [])
"""Kernel levels with split-activation kernels for Q4_0, Q4_K, Q5_K, Q6_K: AVX-512 VNNI and AVX2
(the latter also what AVX-512 CPUs without VNNI run)."""


def split_types(level: int) -> list[GGMLType]:
    return SPLIT_TYPES if level in (3, 4) else []


@pytest.fixture(params=SPLIT_LEVELS or [None], ids=lambda lv: f"isa{lv}")
def split_level(request: pytest.FixtureRequest) -> Iterator[int]:
    """Each kernel level with split kernels that the CPU supports; restored afterwards."""
    yield from at_level(request.param, "no split-activation kernels on this CPU (they need AVX2 or AVX-512 VNNI)")


def split_integers(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(c, S): split_activations' integer c = 65536 x1 + 256 x2 + x3 (int64) and its fp32 scale, per
    activation."""
    pieces, scales = qk.split_activations(x)
    c = 65536 * pieces[0].astype(np.int64) + 256 * pieces[1].astype(np.int64) + pieces[2].astype(np.int64)
    return c, np.repeat(scales, qk.Q8_GROUP)


def split_value(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x_split, step): the fp64 value S * c the split kernels multiply, and S per activation."""
    c, scales = split_integers(x)
    s = scales.astype(np.float64)
    return c * s, s


def hard_x(rng: np.random.Generator, cols: int) -> np.ndarray:
    """Activations that stress the split: wide dynamic range, outlier channels, exact ties of the
    first piece (x = (k + 1/2) * s1, where x2 would be 128), extremes +-max, zero and tiny groups."""
    x = rng.standard_normal(cols) * 10.0 ** rng.integers(-2, 3, cols)
    x[rng.random(cols) < 0.02] *= 300
    g = x.reshape(-1, 32)
    for i in range(0, g.shape[0], 3):  # ties: max 127 -> s1 = 1, values k + 0.5
        g[i] = rng.integers(-126, 126, 32) + 0.5
        g[i, 0] = 127.0
        g[i, 1] = -127.0
    if g.shape[0] > 1:
        g[1] = 0.0
    if g.shape[0] > 2:
        g[2] = rng.standard_normal(32) * 2.0 ** -100  # below Q8_TINY: dropped
    return g.reshape(-1).astype(np.float32)


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**31), groups=st.integers(1, 12), scale_exp=st.integers(-60, 60))
def test_split_activations_bound(seed: int, groups: int, scale_exp: int) -> None:
    """The three pieces are in range, and S * c is within one step S of x (half a step unless the
    last piece was clipped); ties of the first piece carry into it instead of overflowing x2."""
    rng = np.random.default_rng(seed)
    x = (hard_x(rng, 32 * groups) * np.float32(2.0 ** scale_exp)).astype(np.float32)
    pieces, scales = qk.split_activations(x)
    assert pieces.dtype == np.int8 and pieces.shape == (3, x.size) and scales.shape == (groups,)
    assert np.abs(pieces[0].astype(int)).max() <= 127
    xs, s = split_value(x)
    x64 = x.astype(np.float64)
    amax = np.abs(x64).reshape(-1, 32).max(1)
    live = amax >= qk.Q8_TINY
    # within one step of x (groups below Q8_TINY are dropped: off by less than Q8_TINY)
    assert (np.abs(xs - x64) <= np.where(np.repeat(live, 32), s, qk.Q8_TINY)).all()
    # S = max|x_g| / (127 * 65536): about one ulp of the group's largest value
    assert np.allclose(scales[live], (amax[live] / 127).astype(np.float32) / np.float32(65536), rtol=0, atol=0)
    assert (scales[~live] == 0).all() and not pieces[:, np.repeat(~live, 32)].any()


def test_split_activations_special_groups() -> None:
    x = np.zeros(96, np.float32)
    x[:32] = np.arange(32) - 15.5
    x[40] = np.nan
    x[70] = -np.inf
    pieces, scales = qk.split_activations(x)
    assert scales[0] > 0 and np.isnan(scales[1]) and np.isnan(scales[2]) and not pieces[:, 32:].any()


def assert_split_close(t: GGMLType, blocks: np.ndarray, y: np.ndarray, x: np.ndarray, rows: int, cols: int) -> None:
    """y = W @ (S * c) to fp32 rounding, and within sum_k |W[r, k]| * S_k (+ that rounding) of W @ x."""
    xs, s = split_value(x)
    w = reference(t, blocks, rows, cols).astype(np.float64)
    tol = (cols / 16 + 32) * 2.0 ** -24 * (magnitude(t, blocks, w.astype(np.float32), rows, cols) @ np.abs(xs))
    err = np.abs(y.astype(np.float64) - w @ xs)
    assert (err <= tol + 1e-30).all(), f"max error {err.max():.3e}, tolerance {tol[err.argmax()]:.3e}"
    dev = np.abs(y.astype(np.float64) - w @ x.astype(np.float64))
    assert (dev <= np.abs(w) @ s + 2 * tol + 1e-30).all()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.tuples(st.sampled_from(SPLIT_TYPES), st.integers(1, 80), st.integers(1, 9), st.integers(1, 3),
                      st.integers(0, 2**31), st.booleans()))
def test_split_product_is_w_times_split_x(split_level: int, case: tuple) -> None:
    """The default decode product (AVX-512 VNNI and AVX2 kernels) multiplies exactly the split x
    (integer sums exact, no int32 overflow), so its error against W @ x is the split's, at most one
    step S per value."""
    t, rows, nb, threads, seed, hard = case
    if t not in split_types(split_level):
        t = GGMLType.Q6_K
    cols = nb * type_info(t).block_size
    blocks = random_blocks(t, rows, cols, seed)
    rng = np.random.default_rng(seed + 1)
    x = hard_x(rng, cols) if hard else rng.standard_normal(cols).astype(np.float32)
    y = qk.qmatvec(t, torch.from_numpy(blocks), torch.from_numpy(x), threads, use_native=True)
    assert_split_close(t, blocks, y.numpy(), x, rows, cols)


@pytest.mark.parametrize("t", SPLIT_TYPES, ids=lambda t: t.name)
def test_split_extreme_quants_do_not_overflow(split_level: int, t: GGMLType) -> None:
    """Every quant at its largest (and smallest) value against activations at +-max and at ties: the
    int32 Horner sums are at their bound (Q4_K: 16 * 15 * 8,355,968 ~ 2^30.9) and still exact."""
    if t not in split_types(split_level):
        pytest.skip(f"{t.name} has no split kernel at level {split_level}")
    info = type_info(t)
    cols = 4 * max(info.block_size, 128)
    rng = np.random.default_rng(3)
    for fill in (0xFF, 0x00):
        blocks = random_blocks(t, 6, cols, 11).reshape(-1, info.type_size)
        quants = {GGMLType.Q4_0: slice(2, 18), GGMLType.Q4_K: slice(16, 144), GGMLType.Q5_K: slice(16, 176),
                  GGMLType.Q6_K: slice(0, 192)}[t]
        blocks[:, quants] = fill
        if t in K_MIN_TYPES:
            blocks[:, 4:16] = 0xFF  # 6-bit scales and mins at 63
        blocks = blocks.reshape(6, -1)
        for sign in (1, -1):
            x = np.full(cols, 127.0 * sign, np.float32)
            x[1::2] = sign * 126.5  # ties: x1 = 126 or 127 ... every remainder at its edge
            y = qk.qmatvec(t, torch.from_numpy(blocks), torch.from_numpy(x), 2, use_native=True)
            assert_split_close(t, blocks, y.numpy(), x, 6, cols)
        x = hard_x(rng, cols)
        assert_split_close(t, blocks, qk.qmatvec(t, torch.from_numpy(blocks), torch.from_numpy(x), 2).numpy(), x, 6,
                           cols)


def test_split_non_finite_and_zero_activations(split_level: int) -> None:
    t, rows, cols = GGMLType.Q4_K, 5, 512
    blocks = torch.from_numpy(random_blocks(t, rows, cols, 4))
    assert (qk.qmatvec(t, blocks, torch.zeros(cols)) == 0).all()
    x = torch.randn(cols)
    x[300] = float("inf")
    assert torch.isnan(qk.qmatvec(t, blocks, x)).all()


@needs_native
@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_f32_fma_and_split_fallbacks(t: GGMLType) -> None:
    """activations="f32-fma" is the fp32-FMA kernel (act=0); "f32" equals it bit for bit wherever no
    split kernel applies (Q8_0 and the unquantized types at every level, everything at the baseline
    level), and is the split product elsewhere."""
    rows, cols = 37, 2 * max(type_info(t).block_size, 256)
    blocks = random_blocks(t, rows, cols, 9)
    x = np.random.default_rng(2).standard_normal(cols).astype(np.float32)
    fma = qk.qmatvec(t, torch.from_numpy(blocks), torch.from_numpy(x), 2, activations="f32-fma").numpy()
    out = np.empty(rows, np.float32)
    _native.q_matvec(int(t), blocks.reshape(-1), x, out, rows, cols, 2, 0)
    assert np.array_equal(fma.view(np.uint32), out.view(np.uint32))
    assert_product_close(t, blocks, fma, x, rows, cols)
    try:
        for lv in LEVELS:
            _native.q_set_isa(lv)
            default = qk.qmatvec(t, torch.from_numpy(blocks), torch.from_numpy(x), 2).numpy()
            fma = qk.qmatvec(t, torch.from_numpy(blocks), torch.from_numpy(x), 2, activations="f32-fma").numpy()
            if lv in SPLIT_LEVELS and t in split_types(lv):
                assert_split_close(t, blocks, default, x, rows, cols)
            else:  # no split kernel (the type, or the baseline level): the FMA kernel
                assert np.array_equal(default.view(np.uint32), fma.view(np.uint32))
    finally:
        _native.q_set_isa(SUPPORTED_LEVEL)


def identity_q4_0(n: int) -> np.ndarray:
    """[n, n] Q4_0 blocks of the identity (d = 1, quant 9 on the diagonal, 8 = zero elsewhere)."""
    b = np.zeros((n, n // 32, 18), np.uint8)
    b[:, :, 0:2] = np.full((n, n // 32), 1.0, np.float16).view(np.uint8).reshape(n, n // 32, 2)
    b[:, :, 2:] = 0x88
    for r in range(n):
        i = r % 32
        b[r, r // 32, 2 + i % 16] = (0x89 if i < 16 else 0x98)
    return b.reshape(n, -1)


# ------------------------------------------------------------------ a few rows through the decode kernels
@needs_native
@pytest.mark.parametrize("activations", ["f32", "f32-fma", "q8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_few_rows_use_the_decode_kernels(activations: str, dtype: torch.dtype) -> None:
    """quantized_linear of 2 .. ROWS_KERNEL_MAX rows (short prompts, the tokens routed to one
    expert) equals each row's exact one-row product bit for bit (with 'q8' too: prefill stays
    exact), bias added once in fp32; more rows take the dequantized GEMM, within fp32 rounding."""
    from flashtier.checkpoint.quantized_tensor import QuantizedTensor
    from flashtier.runtime import quantized as qz

    t, rows, cols = GGMLType.Q4_K, 40, 512
    w = QuantizedTensor(torch.from_numpy(random_blocks(t, rows, cols, 6)), t, (rows, cols))
    bias = torch.randn(rows)
    exact_act = "f32" if activations == "q8" else activations
    for n in (2, 7, qz.ROWS_KERNEL_MAX, qz.ROWS_KERNEL_MAX + 1):
        x = torch.randn(n, cols).to(dtype)
        y = qz.quantized_linear(x, w, bias, 2, activations)
        assert y.dtype == dtype and y.shape == (n, rows)
        one = torch.stack([qk.qmatvec(t, w.data, x[i].float(), 2, activations=exact_act) for i in range(n)])
        if n <= qz.ROWS_KERNEL_MAX:
            assert torch.equal(y, (one + bias).to(dtype))
        else:
            ref = reference(t, w.data.numpy(), rows, cols).astype(np.float64) @ x.double().numpy().T
            assert np.allclose(y.double().numpy(), (ref.T + bias.double().numpy()), rtol=1e-2 if dtype == torch.bfloat16
                               else 1e-4, atol=1e-3)


def identity_q4_k(n: int) -> np.ndarray:
    """[n, n] Q4_K blocks of the identity: d = 1, dmin = 0, every sub-block's scale 1 and min 0,
    quant 1 on the diagonal."""
    b = np.zeros((n, n // 256, 144), np.uint8)
    b[:, :, 0:2] = np.full((n, n // 256), 1.0, np.float16).view(np.uint8).reshape(n, n // 256, 2)
    b[:, :, 4:8] = 1     # scales of sub-blocks 0-3 (6 bits), mins 0
    b[:, :, 12:16] = 1   # sub-blocks 4-7: scale in the low nibble, min in the high one
    for r in range(n):
        i = r % 256
        jj, l = divmod(i, 64)
        b[r, r // 256, 16 + 32 * jj + l % 32] = 1 if l < 32 else 0x10
    return b.reshape(n, -1)


@pytest.mark.parametrize("t", [GGMLType.Q4_0, GGMLType.Q4_K], ids=lambda t: t.name)
def test_split_pieces_at_every_level(split_level: int, t: GGMLType) -> None:
    """Each split kernel's pieces (the AVX-512 layouts and the AVX2 natural order, the latter from the
    portable splitter) are split_activations' bit for bit: through an identity weight each output is
    fl32(S * c) of its own activation (c < 2^24, one rounding)."""
    rng = np.random.default_rng(12)
    n = 256 * 3
    x = hard_x(rng, n)
    w = identity_q4_0(n) if t == GGMLType.Q4_0 else identity_q4_k(n)
    assert np.array_equal(reference(t, w, n, n), np.eye(n, dtype=np.float32))
    y = qk.qmatvec(t, w, torch.from_numpy(x), 2).numpy()
    c, scales = split_integers(x)
    want = (c.astype(np.float32) * scales).astype(np.float32)
    assert np.array_equal(y.view(np.uint32), want.view(np.uint32))
