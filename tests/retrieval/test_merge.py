"""Partial attention and the log-sum-exp merge: exact for any split of the keys."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flashtier.retrieval.merge import PartialAttention, merge_partials, partial_attention


def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v


@settings(max_examples=60, deadline=None)
@given(
    n_keys=st.integers(1, 40),
    groups=st.integers(1, 4),
    dim=st.integers(1, 8),
    n_parts=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
)
def test_merge_is_exact_for_any_split(n_keys: int, groups: int, dim: int, n_parts: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(groups, dim, generator=g, dtype=torch.float64) * 3
    k = torch.randn(n_keys, dim, generator=g, dtype=torch.float64) * 3
    v = torch.randn(n_keys, dim, generator=g, dtype=torch.float64)
    part_of = torch.randint(0, n_parts, (n_keys,), generator=g)  # some parts may stay empty
    scale = 1 / math.sqrt(dim)
    parts = [partial_attention(q, k[part_of == p], v[part_of == p], scale) for p in range(n_parts)]
    merged = merge_partials(parts)
    whole = partial_attention(q, k, v, scale)
    torch.testing.assert_close(merged.out, full_attention(q, k, v, scale), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(merged.lse, whole.lse, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(whole.lse, torch.logsumexp(q @ k.T * scale, dim=-1))


@settings(max_examples=30, deadline=None)
@given(n_keys=st.integers(1, 300), cut=st.floats(0, 1), seed=st.integers(0, 2**31 - 1))
def test_merge_fp32_two_parts(n_keys: int, cut: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(s, 16, generator=g) for s in (4, n_keys, n_keys))
    c = int(cut * n_keys)
    merged = merge_partials([partial_attention(q, k[:c], v[:c], 0.25), partial_attention(q, k[c:], v[c:], 0.25)])
    torch.testing.assert_close(merged.out, full_attention(q, k, v, 0.25), rtol=1e-5, atol=1e-5)


def test_empty_parts_give_zero_and_minus_inf() -> None:
    q = torch.randn(3, 4)
    empty = partial_attention(q, torch.empty(0, 4), torch.empty(0, 4), 1.0)
    assert torch.equal(empty.out, torch.zeros(3, 4))
    assert torch.isneginf(empty.lse).all()
    merged = merge_partials([empty, empty])
    assert torch.equal(merged.out, torch.zeros(3, 4)) and torch.isneginf(merged.lse).all()


def test_minus_inf_part_is_ignored_even_with_garbage_output() -> None:
    q, k, v = torch.randn(2, 4), torch.randn(5, 4), torch.randn(5, 4)
    real = partial_attention(q, k, v, 0.5)
    garbage = PartialAttention(torch.full((2, 4), float("nan")), torch.full((2,), float("-inf")))
    merged = merge_partials([garbage, real])
    torch.testing.assert_close(merged.out, real.out)
    torch.testing.assert_close(merged.lse, real.lse)


def test_batched_leading_dims_match_per_head() -> None:
    q, k, v = torch.randn(3, 4, 8), torch.randn(3, 10, 8), torch.randn(3, 10, 8)
    batched = partial_attention(q, k, v, 0.3)
    for h in range(3):
        single = partial_attention(q[h], k[h], v[h], 0.3)
        torch.testing.assert_close(batched.out[h], single.out)
        torch.testing.assert_close(batched.lse[h], single.lse)


def test_large_scores_do_not_overflow() -> None:
    q = torch.full((1, 2), 100.0)
    k = torch.tensor([[100.0, 100.0], [99.0, 99.0]])
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    merged = merge_partials([partial_attention(q, k[:1], v[:1], 1.0), partial_attention(q, k[1:], v[1:], 1.0)])
    assert torch.isfinite(merged.out).all() and torch.isfinite(merged.lse).all()
    torch.testing.assert_close(merged.out, full_attention(q, k, v, 1.0))
