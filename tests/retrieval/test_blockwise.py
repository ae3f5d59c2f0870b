"""Masked partial attention and the running blockwise merge: exact for any split, masks included."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flashtier.retrieval.blockwise import RunningAttention, blockwise_attention
from flashtier.retrieval.merge import partial_attention


@settings(max_examples=40, deadline=None)
@given(n_keys=st.integers(1, 60), n_queries=st.integers(1, 5), cuts=st.lists(st.integers(0, 60), max_size=5),
       seed=st.integers(0, 2**31 - 1))
def test_blockwise_causal_equals_one_masked_pass(n_keys: int, n_queries: int, cuts: list[int], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, n_queries, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, n_keys, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, n_keys, 8, generator=g, dtype=torch.float64)
    q_pos = torch.randint(0, n_keys, (n_queries,), generator=g)  # query i sees keys at positions <= q_pos[i]
    mask = torch.arange(n_keys).unsqueeze(0) <= q_pos.unsqueeze(1)  # [G, N]
    whole = partial_attention(q, k, v, 1 / math.sqrt(8), mask)
    bounds = sorted({0, n_keys, *(min(c, n_keys) for c in cuts)})
    blocks = [(k[:, a:b], v[:, a:b], mask[:, a:b]) for a, b in zip(bounds, bounds[1:])]
    merged = blockwise_attention(q, blocks, 1 / math.sqrt(8))
    torch.testing.assert_close(merged.out, whole.out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(merged.lse, whole.lse, rtol=1e-10, atol=1e-10)
    reference = torch.softmax((q @ k.transpose(1, 2) / math.sqrt(8)).masked_fill(~mask, float("-inf")), dim=-1) @ v
    torch.testing.assert_close(whole.out, reference, rtol=1e-10, atol=1e-10)


def test_fully_masked_rows_behave_like_an_empty_part() -> None:
    q, k, v = torch.randn(3, 4), torch.randn(5, 4), torch.randn(5, 4)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, :2] = True
    part = partial_attention(q, k, v, 0.5, mask)
    assert torch.isneginf(part.lse[1:]).all() and torch.equal(part.out[1:], torch.zeros(2, 4))
    running = RunningAttention()
    running.add(part)
    running.add(partial_attention(q, k, v, 0.5))
    torch.testing.assert_close(running.result().out[1], partial_attention(q, k, v, 0.5).out[1])


def test_flash_fast_path_matches_the_reference_including_empty_rows(monkeypatch) -> None:
    import flashtier.retrieval.merge as merge

    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 300, 16, generator=g), torch.randn(2, 400, 16, generator=g), torch.randn(2, 400, 16, generator=g)
    mask = torch.rand(300, 400, generator=g) > 0.3
    mask[5] = False  # a query that may attend nothing
    fast = partial_attention(q, k, v, 0.25, mask)
    monkeypatch.setattr(merge, "_FLASH_CPU", None)
    slow = partial_attention(q, k, v, 0.25, mask)
    torch.testing.assert_close(fast.out, slow.out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.lse, slow.lse, rtol=1e-5, atol=1e-5)
    assert torch.isneginf(fast.lse[:, 5]).all()
