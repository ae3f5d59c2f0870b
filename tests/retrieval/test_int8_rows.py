"""Int8Rows: per-row symmetric int8 codes in the packed layout the native search reads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from flashtier.retrieval.buffer import Int8Rows

finite = st.floats(-1e6, 1e6, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(dim=st.sampled_from([1, 16, 32, 64, 80, 128, 200]), data=st.data())
def test_round_trip_within_half_a_step(dim: int, data: st.DataObject) -> None:
    n = data.draw(st.integers(0, 6))
    rows = torch.from_numpy(data.draw(hnp.arrays(np.float32, (n, dim), elements=finite)))
    buf = Int8Rows(dim, huge_pages=False)
    buf.append(rows[: n // 2])
    buf.append(rows[n // 2 :])  # two appends: the buffer grows and keeps both
    assert len(buf) == n
    codes, scale = Int8Rows.quantize(rows)
    assert torch.equal(buf.codes(), codes)  # the packed layout unpacks to the row-order codes
    assert torch.equal(buf.scales(), scale)
    deq = buf.view()
    assert deq.shape == (n, dim) and deq.dtype == torch.float32
    assert torch.equal(deq, codes.float() * scale.unsqueeze(1))
    # each value within half a quantization step (plus fp32 rounding of the step itself)
    assert bool(((deq - rows).abs() <= scale.unsqueeze(1) * 0.5 * (1 + 1e-5) + 1e-30).all())
    assert int(codes.abs().max()) <= 127 if n else True


def test_zero_rows_and_the_largest_value() -> None:
    buf = Int8Rows(64, huge_pages=False)
    rows = torch.zeros(2, 64)
    rows[1, 5] = -3.0
    buf.append(rows)
    assert torch.equal(buf.view(), rows)  # zero row stays zero; the largest magnitude is exact (+-127 steps)
    assert buf.codes()[1, 5] == -127


def test_packed_layout_is_what_the_native_loads_expect() -> None:
    """Lane i of a 64-value chunk holds values i, 16+i, 32+i, 48+i from its highest byte down."""
    buf = Int8Rows(64, huge_pages=False)
    row = torch.arange(64, dtype=torch.float32).unsqueeze(0) - 32  # codes = value * 127/32 rounded
    buf.append(row)
    codes = buf.codes()[0]
    lanes = buf._codes.view()[0].view(torch.int32)  # [16] little-endian lanes
    for i in range(16):
        for g in range(4):
            assert int((lanes[i] << (8 * g)) >> 24) == int(codes[16 * g + i])


def test_truncate_and_nbytes() -> None:
    buf = Int8Rows(80, huge_pages=False)
    buf.append(torch.randn(5, 80))
    assert buf.nbytes() == 5 * 128 + 5 * 4  # rows padded to 128 codes, one fp32 scale each
    buf.truncate(2)
    assert len(buf) == 2 and buf.view().shape == (2, 80)


def test_non_finite_rows_are_an_error() -> None:
    buf = Int8Rows(16, huge_pages=False)
    with pytest.raises(ValueError, match="finite"):
        buf.append(torch.full((1, 16), float("nan")))
