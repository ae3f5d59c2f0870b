"""One-token decode steps in C (runtime/decode_ops.py: RMSNorm, rotary embedding, attention over
the block KV cache) against the torch code they replace, within fp32 rounding; and the forward that
uses them still equals the torch forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from flashtier.runtime import decode_ops
from flashtier.runtime.kv.cache import BlockKVCache, KVCacheConfig
from flashtier.runtime.model import apply_rope, rms_norm, rope_tables

pytestmark = pytest.mark.skipif(not decode_ops.native_attend(), reason="C extension flashtier._native not built")


def torch_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def torch_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    if interleaved:
        pairs = x.unflatten(-1, (-1, 2))
        return x * cos + torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2) * sin
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 700), scale=st.sampled_from([1e-3, 1.0, 300.0]), seed=st.integers(0, 2**31))
def test_rms_norm_row_matches_torch(n: int, scale: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(1, n, generator=g) * scale, torch.randn(n, generator=g)
    got = rms_norm(x, w, 1e-6)
    assert torch.allclose(got, torch_rms_norm(x, w, 1e-6), rtol=1e-5, atol=1e-6)
    assert decode_ops.rms_norm_row(x.double(), w, 1e-6) is None  # another dtype: the torch code runs


@settings(max_examples=40, deadline=None)
@given(heads=st.integers(1, 9), half=st.integers(1, 70), pos=st.integers(0, 70000), interleaved=st.booleans(),
       seed=st.integers(0, 2**31))
def test_rope_row_matches_torch(heads: int, half: int, pos: int, interleaved: bool, seed: int) -> None:
    d = 2 * half
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    emb = rope_tables(torch.tensor([[float(pos)]]) * inv[None], interleaved)
    cos, sin = emb.cos(), emb.sin()  # [1, D]
    x = torch.randn(heads, 1, d, generator=torch.Generator().manual_seed(seed))
    got = apply_rope(x, cos, sin, interleaved)
    want = torch_rope(x, cos, sin, interleaved)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(hkv=st.integers(1, 4), group=st.sampled_from([1, 2, 3, 8, 12]), d=st.sampled_from([16, 48, 64, 128, 20]),
       length=st.integers(1, 300), window=st.sampled_from([None, 1, 7, 64]), threads=st.integers(1, 3),
       seed=st.integers(0, 2**31))
def test_cache_attention_one_row_matches_sdpa(hkv: int, group: int, d: int, length: int, window: int | None,
                                              threads: int, seed: int) -> None:
    """The block cache's one-row attention (native) equals SDPA over the same keys, with GQA,
    head sizes that are and are not multiples of 16, sliding windows, several blocks."""
    g = torch.Generator().manual_seed(seed)
    cache = BlockKVCache(1, hkv, d, torch.float32, KVCacheConfig(block_size=16, sliding_window=window))
    keys, values = torch.randn(hkv, length, d, generator=g), torch.randn(hkv, length, d, generator=g) * 3
    cache.write(0, keys[:, :-1], values[:, :-1], 0)
    q = torch.randn(hkv * group, 1, d, generator=g) * 4
    torch.set_num_threads(threads)
    try:
        got = cache.attend(0, q, keys[:, -1:], values[:, -1:], length - 1)
    finally:
        torch.set_num_threads(2)
    lo = 0 if window is None else max(0, length - window)
    want = F.scaled_dot_product_attention(q[None], keys[None, :, lo:], values[None, :, lo:], scale=d ** -0.5,
                                          enable_gqa=True)[0]
    # fp32 rounding of a weighted sum: relative to the largest value summed
    assert torch.allclose(got, want, rtol=1e-5, atol=4e-6 * values.abs().max().item())
    k_all, v_all = cache.read(0, length)
    assert torch.equal(k_all, keys) and torch.equal(v_all, values)  # the one-row write stored them


def test_attention_over_a_long_context_uses_the_pool_and_propagates_nan() -> None:
    g = torch.Generator().manual_seed(0)
    hkv, d, n = 2, 64, 5000
    cache = BlockKVCache(1, hkv, d, torch.float32, KVCacheConfig(block_size=64))
    keys, values = torch.randn(hkv, n, d, generator=g), torch.randn(hkv, n, d, generator=g)
    cache.write(0, keys[:, :-1], values[:, :-1], 0)
    q = torch.randn(8, 1, d, generator=g)
    got = cache.attend(0, q, keys[:, -1:], values[:, -1:], n - 1)
    want = F.scaled_dot_product_attention(q[None], keys[None], values[None], scale=d ** -0.5, enable_gqa=True)[0]
    assert torch.allclose(got, want, rtol=1e-5, atol=4e-6 * values.abs().max().item())
    q[3, 0, 5] = float("nan")  # a corrupted activation is never hidden by the softmax
    got = cache.attend(0, q, keys[:, -1:], values[:, -1:], n - 1)
    assert torch.isnan(got[3]).all() and torch.isfinite(got[4:]).all()


def test_native_ops_reject_bad_sizes() -> None:
    from flashtier import _native

    x = np.zeros(8, np.float32)
    with pytest.raises(ValueError, match="rms_norm"):
        _native.rms_norm(x, x[:4], x, 8, 1e-6)
    with pytest.raises(ValueError, match="rope"):
        _native.rope(x, x, 2, 4, x[:3], x[:4], False)
    with pytest.raises(ValueError, match="attend"):
        _native.attend(x, x, x, x, 2, 1, 4, 0, 3, 4, 0.5, 1)  # 3 positions do not fit a head stride of 4


@pytest.mark.parametrize("n, lo, threads", [(37, 0, 1), (300, 0, 2), (5000, 0, 2), (300, 100, 1)])
def test_attention_through_a_block_table_is_bit_identical_to_the_rows_in_order(n, lo, threads) -> None:
    """The blocks of a sequence scattered in a pool shared with others (a block table) give exactly
    the attention of the same rows in order: the kernel visits the positions in the same order."""
    if not decode_ops.native_attend():
        pytest.skip("the C extension is not built")
    g = torch.Generator().manual_seed(n)
    hkv, hq, d, block = 2, 8, 64, 16
    blocks = -(-n // block)
    pool_blocks = 3 * blocks + 5
    pool_k = torch.randn(hkv, pool_blocks, block, d, generator=g)  # [H, N, B, D], others' blocks around
    pool_v = torch.randn(hkv, pool_blocks, block, d, generator=g)
    table = torch.randperm(pool_blocks, generator=g)[:blocks]  # logical block -> physical block
    in_order_k = pool_k[:, table].reshape(hkv, -1, d).contiguous()  # [H, blocks * B, D]
    in_order_v = pool_v[:, table].reshape(hkv, -1, d).contiguous()
    q = torch.randn(hq, 1, d, generator=g)
    want = decode_ops.attend_row(q, in_order_k.numpy().reshape(-1), in_order_v.numpy().reshape(-1), hkv,
                                 blocks * block * d, lo, n, threads)
    got = decode_ops.attend_row(q, pool_k.numpy().reshape(-1), pool_v.numpy().reshape(-1), hkv,
                                pool_blocks * block * d, lo, n, threads, table.numpy(), block)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="block table entry"):
        bad = table.numpy().copy()
        bad[-1] = pool_blocks
        decode_ops.attend_row(q, pool_k.numpy().reshape(-1), pool_v.numpy().reshape(-1), hkv,
                              pool_blocks * block * d, lo, n, threads, bad, block)
    with pytest.raises(ValueError, match="must cover positions"):
        decode_ops.attend_row(q, pool_k.numpy().reshape(-1), pool_v.numpy().reshape(-1), hkv,
                              pool_blocks * block * d, lo, n, threads, table.numpy()[:-1], block)
    with pytest.raises(ValueError, match="power of two"):
        decode_ops.attend_row(q, pool_k.numpy().reshape(-1), pool_v.numpy().reshape(-1), hkv,
                              pool_blocks * block * d, lo, n, threads, table.numpy(), 12)
