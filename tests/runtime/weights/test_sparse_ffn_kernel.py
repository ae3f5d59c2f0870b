"""The native sparse FFN kernel (native/sparse_ffn.c): each row's FFN over its neurons, against an
fp64 reference, and the same bits however the neurons are split over calls, buffers and threads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flashtier.runtime.weights import sparse_ffn as sparse_mod

pytestmark = pytest.mark.skipif(sparse_mod._native_rows is None, reason="the C extension is not built")


def rows_matrix(rng: np.random.Generator, n: int, hidden: int, bf16: bool, pad: int) -> tuple[np.ndarray, torch.Tensor]:
    """``n`` bundle rows gate | up | down (+ padding) as uint8 ``[n, row_bytes]``, and their values fp64 ``[n, 3, H]``."""
    values = torch.from_numpy(rng.standard_normal((n, 3, hidden)).astype(np.float32))
    typed = values.to(torch.bfloat16) if bf16 else values
    es = 2 if bf16 else 4
    row_bytes = -(-3 * hidden * es // 4) * 4 + pad  # whole fp32 words (real bundles: 512-byte sectors)
    out = np.zeros((n, row_bytes), dtype=np.uint8)
    out[:, : 3 * hidden * es] = typed.reshape(n, -1).view(torch.uint8).numpy()
    return out, typed.double()


def run(win, buf, hidden, bf16, per_row: list[np.ndarray], x: np.ndarray, acc: np.ndarray, threads: int = 1) -> None:
    ptr = np.zeros(len(per_row) + 1, dtype=np.int64)
    ptr[1:] = np.cumsum([r.size for r in per_row])
    idx = np.concatenate(per_row).astype(np.int64) if per_row else np.zeros(0, dtype=np.int64)
    sparse_mod._native_rows(win, buf, win.shape[1], hidden, bf16, idx, ptr, x, acc, len(per_row), threads)


@settings(max_examples=40, deadline=None)
@given(hidden=st.integers(1, 70), neurons=st.integers(1, 40), batch=st.integers(1, 5), bf16=st.booleans(),
       seed=st.integers(0, 2**31), threads=st.integers(1, 3))
def test_rows_match_fp64_and_any_split_gives_the_same_bits(hidden, neurons, batch, bf16, seed, threads):
    rng = np.random.default_rng(seed)
    pad = 4 * int(rng.integers(0, 3))
    win, values = rows_matrix(rng, neurons, hidden, bf16, pad)
    x = rng.standard_normal((batch, hidden)).astype(np.float32)
    chosen = [np.sort(rng.choice(neurons, int(rng.integers(0, neurons + 1)), replace=False)) for _ in range(batch)]
    acc = np.zeros((batch, hidden), dtype=np.float32)
    run(win, np.zeros((0, win.shape[1]), np.uint8), hidden, bf16, chosen, x, acc, threads)
    for b in range(batch):  # fp64 reference
        v = values[chosen[b]]  # [m, 3, H]
        xb = torch.from_numpy(x[b]).double()
        h = torch.relu(v[:, 0] @ xb) * (v[:, 1] @ xb)
        ref = h @ v[:, 2]
        scale = (h.abs() @ v[:, 2].abs()).numpy() + 1e-6
        assert np.all(np.abs(acc[b] - ref.numpy()) <= 1e-4 * scale)
    # the same neurons, some moved into a buffer, split over two calls at a neuron boundary: same bits
    moved = rng.random(neurons) < 0.5
    buf_rows = np.flatnonzero(moved)
    buf = win[buf_rows] if buf_rows.size else np.zeros((0, win.shape[1]), np.uint8)
    where = lambda ids: np.where(moved[ids], -1 - np.searchsorted(buf_rows, ids), ids)
    cut = int(rng.integers(0, neurons + 1))
    split = np.zeros_like(acc)
    run(win, buf, hidden, bf16, [where(c[c < cut]) for c in chosen], x, split, threads)
    run(win, buf, hidden, bf16, [where(c[c >= cut]) for c in chosen], x, split, 1)
    assert np.array_equal(split.view(np.uint32), acc.view(np.uint32))
    # each row alone: same bits as in the batch
    for b in range(batch):
        alone = np.zeros((1, hidden), dtype=np.float32)
        run(win, buf, hidden, bf16, [where(chosen[b])], x[b : b + 1].copy(), alone, threads)
        assert np.array_equal(alone[0].view(np.uint32), acc[b].view(np.uint32))


def test_bad_arguments_are_refused_with_what_is_wrong():
    rng = np.random.default_rng(0)
    win, _ = rows_matrix(rng, 4, 16, False, 0)
    x = np.zeros((1, 16), np.float32)
    acc = np.zeros((1, 16), np.float32)
    empty = np.zeros((0, win.shape[1]), np.uint8)
    with pytest.raises(IndexError, match="outside the 4 window rows"):
        run(win, empty, 16, False, [np.array([4])], x, acc)
    with pytest.raises(IndexError, match="0 buffer rows"):
        run(win, empty, 16, False, [np.array([-1])], x, acc)
    with pytest.raises(ValueError, match="do not match"):
        run(win, empty, 32, False, [np.array([0])], x, acc)  # rows too short for 3 x 32 values
