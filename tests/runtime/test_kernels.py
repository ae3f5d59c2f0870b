"""The bf16 decode kernels (C extension and numba) against an fp32 reference, their fallbacks,
and the engine's choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from flashtier.runtime import kernels
from flashtier.runtime.kernels import Linear, choose_kernel

AVAILABLE = [k for k in ("native", "numba") if Linear(kernel=k, threads=1).kernel == k]
needs_kernel = pytest.mark.skipif(not AVAILABLE, reason="no fast kernel on this platform")
fast = Linear(fast=True, threads=1)
each_kernel = pytest.mark.parametrize("name", AVAILABLE)


def _bf16(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 0.05).to(torch.bfloat16)


@needs_kernel
@each_kernel
@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 300), k=st.integers(1, 300), seed=st.integers(0, 10_000), bias=st.booleans(),
       threads=st.integers(1, 3))
def test_matches_fp32_product_rounded_once(name: str, n: int, k: int, seed: int, bias: bool, threads: int) -> None:
    w, x = _bf16(n, k, seed=seed), _bf16(1, k, seed=seed + 1)
    b = _bf16(n, seed=seed + 2) if bias else None
    y = Linear(kernel=name, threads=threads)(x, w, b)
    assert y.dtype == torch.bfloat16 and y.shape == (1, n)
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())  # exact-ish product
    # fp32 accumulation then one rounding to bf16: within one bf16 ulp (2^-8 relative) of the truth
    tol = ref.abs() * 2.0 ** -8 + 1e-6 * k
    assert ((y.double() - ref).abs() <= tol).all()


@needs_kernel
@each_kernel
def test_agrees_with_torch_bf16_kernel(name: str) -> None:
    fast = Linear(kernel=name, threads=2)
    w, x = _bf16(2048, 1024), _bf16(1, 1024, seed=1)
    y, ref = fast(x, w), F.linear(x, w)
    ulp = ref.float().abs() * 2.0 ** -7 + 1e-30
    assert ((y.float() - ref.float()).abs() <= ulp).all()
    assert (y == ref).float().mean() > 0.99  # differs from torch's only by rare last-bit rounding
    assert fast.calls_fast > 0


@needs_kernel
@each_kernel
def test_deterministic_across_thread_counts(name: str) -> None:
    w, x = _bf16(999, 513, seed=4), _bf16(1, 513, seed=5)
    assert torch.equal(Linear(kernel=name, threads=1)(x, w), Linear(kernel=name, threads=2)(x, w))
    assert torch.equal(Linear(kernel=name, threads=1)(x, w), Linear(kernel=name, threads=3)(x, w))


@pytest.mark.parametrize("case", ["rows", "fp32", "fp16", "strided"])
def test_other_shapes_and_dtypes_go_to_torch(case: str) -> None:
    lin = Linear(fast=True, threads=1)
    w, x = _bf16(64, 32), _bf16(1, 32, seed=1)
    if case == "rows":
        x = _bf16(3, 32, seed=1)
    elif case == "fp32":
        w, x = w.float(), x.float()
    elif case == "fp16":
        w, x = w.half(), x.half()
    else:
        w = _bf16(32, 64).t()  # [64, 32], not contiguous
    y = lin(x, w)
    assert torch.equal(y, F.linear(x, w))
    assert lin.calls_fast == 0 and lin.calls_torch == 1


def test_disabled_is_torch() -> None:
    lin = Linear(fast=False)
    w, x = _bf16(64, 32), _bf16(1, 32, seed=1)
    assert not lin.fast
    assert torch.equal(lin(x, w), F.linear(x, w))


@needs_kernel
def test_engine_fast_and_torch_kernels_give_the_same_tokens() -> None:
    from pathlib import Path

    from flashtier.runtime.engine import open_model

    model_dir = Path(__file__).resolve().parents[2] / "models" / "tiny-moe"
    prompt = "def parse_args(argv):\n    "
    out = {}
    for flag in (True, False):
        m = open_model(model_dir, fast_matvec=flag, threads=1)
        r = m.generate(prompt, max_new_tokens=24, ignore_eos=True)
        assert r.stats["matvec_kernel"] == (f"{AVAILABLE[0]}-bf16" if flag else "torch")
        out[flag] = r.tokens
    assert out[True] == out[False]


def test_kernel_choice_keeps_numba_out_of_budgeted_runs(monkeypatch) -> None:
    assert choose_kernel(False, budgeted=False) == "torch"
    monkeypatch.setattr(kernels, "native_matvec", lambda: None)  # an install without a C compiler
    assert choose_kernel(None, budgeted=False) == "numba"
    assert choose_kernel(None, budgeted=True) == "torch"  # numba's ~120 MiB belongs to the weights there
    assert choose_kernel(True, budgeted=True) == "numba"


def test_auto_kernel_under_a_dram_budget_and_cli_flag_parses() -> None:
    import argparse
    from pathlib import Path

    from flashtier.apps.common import add_budget_args, engine_options
    from flashtier.runtime.engine import open_model

    model_dir = Path(__file__).resolve().parents[2] / "models" / "tiny-dense"
    m = open_model(model_dir, dram_budget="64M")
    expected = "native-bf16" if "native" in AVAILABLE else "torch"
    assert m.generate("x = ", max_new_tokens=2).stats["matvec_kernel"] == expected
    p = argparse.ArgumentParser()
    add_budget_args(p)
    assert engine_options(p.parse_args(["--fast-matvec", "on"]))["fast_matvec"] is True
    assert engine_options(p.parse_args(["--fast-matvec", "off"]))["fast_matvec"] is False
    assert "fast_matvec" not in engine_options(p.parse_args(["--fast-matvec", "auto"]))


@needs_kernel
@each_kernel
def test_concurrent_callers_from_threads_get_correct_results(name: str) -> None:
    # the server and embedding apps may run models on several threads at once
    from concurrent.futures import ThreadPoolExecutor

    w, xs = _bf16(700, 300, seed=8), [_bf16(1, 300, seed=s) for s in range(16)]
    lin = Linear(kernel=name, threads=2)
    expected = [lin(x, w) for x in xs]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda x: lin(x, w), xs * 4))
    assert all(torch.equal(g, e) for g, e in zip(got, expected * 4))


def test_bad_fast_matvec_value_is_a_config_error() -> None:
    from flashtier.errors import ConfigError
    from flashtier.runtime.engine import EngineConfig

    with pytest.raises(ConfigError, match="fast_matvec must be True, False or None"):
        EngineConfig(fast_matvec="yes")  # type: ignore[arg-type]


def test_native_kernel_rejects_buffers_that_do_not_match_the_shape() -> None:
    native = pytest.importorskip("flashtier._native")
    import numpy as np

    w = np.zeros((4, 8), np.uint16)
    with pytest.raises(ValueError, match=r"do not match a \[4, 9\] bf16 weight"):
        native.bf16_matvec(w, np.zeros(9, np.float32), np.zeros(4, np.float32), 4, 9, 1)
    with pytest.raises(TypeError):
        native.bf16_matvec(w, np.zeros(8, np.float32), b"\0" * 16, 4, 8, 1)  # read-only output


@pytest.mark.parametrize("batch, rows, cols, threads", [(2, 33, 64, 1), (5, 128, 1000, 2), (9, 17, 4096, 3)])
def test_rows_equal_one_row_products_bitwise(batch, rows, cols, threads):
    """Linear.rows (batched decode: one kernel call, the weight read once) gives each row exactly
    the one-row product, bias included."""
    from flashtier.runtime.kernels import Linear

    g = torch.Generator().manual_seed(rows * cols)
    w = torch.randn(rows, cols, generator=g).to(torch.bfloat16)
    b = torch.randn(rows, generator=g).to(torch.bfloat16)
    xs = [torch.randn(1, cols, generator=g).to(torch.bfloat16) for _ in range(batch)]
    lin = Linear(threads=threads)
    for bias in (None, b):
        got = lin.rows(xs, w, bias)
        want = [lin(x, w, bias) for x in xs]
        assert all(torch.equal(x, y) for x, y in zip(got, want))


@pytest.mark.parametrize("batch, threads", [(4, 1), (8, 2), (5, 3)])
def test_native_rows_kernel_is_the_one_row_kernel_in_fp32(batch, threads):
    """The C kernel's several-row entry point against its one-row entry point, compared in fp32
    (a bf16 comparison would round most differences away): every bit equal."""
    native = pytest.importorskip("flashtier._native")
    if not hasattr(native, "bf16_matvec_rows"):
        pytest.skip("extension built before bf16_matvec_rows")
    g = torch.Generator().manual_seed(batch)
    rows, cols = 777, 2048 + 48  # a 16-lane tail and a scalar-free tail
    w = (torch.randn(rows, cols, generator=g) * 0.02).to(torch.bfloat16)
    bits = w.view(torch.int16).numpy().view(np.uint16)
    x = torch.randn(batch, cols, generator=g).to(torch.bfloat16).float().numpy()
    out = np.empty((batch, rows), np.float32)
    native.bf16_matvec_rows(bits, x, out, rows, cols, batch, threads)
    ref = np.empty((batch, rows), np.float32)
    for b in range(batch):
        native.bf16_matvec(bits, np.ascontiguousarray(x[b]), ref[b], rows, cols, threads)
    assert np.array_equal(out, ref)
