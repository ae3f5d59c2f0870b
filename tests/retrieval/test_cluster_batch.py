"""The native search of every kv head of a layer equals the per-head reference (ClusterIndex.search +
estimate_rest), and the decode step gives the same attention through either path."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flashtier.retrieval import attention as attention_mod
from flashtier.retrieval.attention import OffloadedLayerKV, RetrievalAttention, RetrievalConfig
from flashtier.errors import ConfigError
from flashtier.retrieval.buffer import Int8Rows
from flashtier.retrieval.cluster_batch import native_search_available, search_heads
from flashtier.retrieval.index_cluster import ClusterIndexConfig
from flashtier.runtime.kv.retrieval_cost import HeadShape, step_bytes
from flashtier.runtime.kv.retrieval_config import PRESETS, retrieval_config

pytestmark = pytest.mark.skipif(not native_search_available(), reason="native extension not built")


def _layer(config: RetrievalConfig, heads: int, dim: int, blocks: list[int], seed: int) -> OffloadedLayerKV:
    """Keys with a common offset (as a trained model's), added block by block as a cache demotes them."""
    gen = torch.Generator().manual_seed(seed)
    layer = OffloadedLayerKV(heads, dim, config)
    offset = torch.randn(heads, 1, dim, generator=gen) * 2
    pos = 4
    for n in blocks:
        keys = offset + torch.randn(heads, n, dim, generator=gen)
        values = torch.randn(heads, n, dim, generator=gen)
        layer.append(keys, values, torch.arange(pos, pos + n))
        pos += n
    return layer


def _check_against_reference(layer: OffloadedLayerKV, config: RetrievalConfig, rows: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed + 1)
    heads, dim = layer.num_kv_heads, layer.head_dim
    queries = torch.randn(heads, rows, dim, generator=gen) * 1.5  # [H, R, D]
    scale = dim ** -0.5
    indexes = [h.index for h in layer.heads]
    found = search_heads(indexes, queries, config.top_k, estimate_scale=scale if config.estimate_rest else None)
    assert found is not None
    assert found.positions.shape == (heads, rows, config.top_k)
    for h, index in enumerate(indexes):
        ref = index.search(queries[h], config.top_k)
        assert found.keys_scanned[h] == ref.keys_scanned
        assert torch.equal(found.positions[h].sort(dim=1).values, ref.positions.sort(dim=1).values)
        if config.estimate_rest:
            rest = index.estimate_rest(queries[h], ref.positions, scale)
            torch.testing.assert_close(found.rest.lse[h], rest.lse, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(found.rest.out[h], rest.out, rtol=1e-4, atol=1e-5)
        else:
            assert found.rest is None


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("rows", [1, 4])
def test_presets_match_the_reference(preset: str, rows: int) -> None:
    config = retrieval_config({"retrieval_preset": preset})
    layer = _layer(config, heads=3, dim=32, blocks=[1024] * 6 + [64], seed=rows)  # 64 keys left in the tail
    _check_against_reference(layer, config, rows, seed=rows)


@pytest.mark.parametrize("summary", ["store", "int8"])
def test_fp32_store_one_level_and_no_estimate(summary: str) -> None:
    """fp32 keys; with int8 summaries the centroids are centred first (as bf16 ones are)."""
    config = RetrievalConfig(top_k=20, scan_budget_fraction=0.05, group_search="rows", estimate_rest=False,
                             index_options={"cluster_size": 8, "summary_dtype": summary})
    _check_against_reference(_layer(config, 2, 48, [512] * 4, seed=3), config, rows=2, seed=3)


def _int8_summaries(config: RetrievalConfig) -> RetrievalConfig:
    return dataclasses.replace(config, index_options={**config.index_options, "summary_dtype": "int8"})


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("dim", [32, 80, 128])
def test_int8_summaries_match_the_reference(preset: str, dim: int) -> None:
    """Centroids, super-centroids and mean values as int8 rows (packed in 64-value chunks, padded
    where the head dimension is not a multiple of 64): the native search reads the same tables the
    reference dequantizes, and returns the same keys and the same estimate."""
    config = _int8_summaries(retrieval_config({"retrieval_preset": preset}))
    layer = _layer(config, heads=2, dim=dim, blocks=[1024] * 4 + [40], seed=dim)
    index = layer.heads[0].index
    assert isinstance(index._centroids, Int8Rows) and isinstance(index._vmean, Int8Rows)
    for rows in (1, 4):
        _check_against_reference(layer, config, rows, seed=dim + rows)


def test_int8_summaries_read_fewer_bytes_and_stay_close_to_bf16() -> None:
    """int8 summaries shrink the index and the bytes a step reads, and the search finds nearly the
    same keys as with bf16 summaries (the keys scanned are still scored from the bf16 keys)."""
    preset = retrieval_config({})
    base = dataclasses.replace(preset, index_options={**preset.index_options, "summary_dtype": "store"})
    small = _int8_summaries(base)
    shape = HeadShape(num_kv_heads=8, head_dim=128, queries_per_kv=4, kv_dtype_bytes=2)
    assert step_bytes(small, shape, 131072) < 0.8 * step_bytes(base, shape, 131072)
    a, b = _layer(base, 2, 128, [1024] * 8, seed=5), _layer(small, 2, 128, [1024] * 8, seed=5)
    assert b.heads[0].index.nbytes() < a.heads[0].index.nbytes()
    q = torch.randn(2, 4, 128, generator=torch.Generator().manual_seed(6)) * 1.5
    fa = search_heads([h.index for h in a.heads], q, 100, estimate_scale=128 ** -0.5)
    fb = search_heads([h.index for h in b.heads], q, 100, estimate_scale=128 ** -0.5)
    same = [len(set(x.tolist()) & set(y.tolist())) / 100 for x, y in zip(fa.positions.flatten(0, 1), fb.positions.flatten(0, 1))]
    assert min(same) >= 0.8 and sum(same) / len(same) >= 0.9, same  # noise keys: near-ties everywhere
    torch.testing.assert_close(fb.rest.lse, fa.rest.lse, atol=0.05, rtol=0)


@pytest.mark.parametrize(("dim", "int8"), [(32, False), (64, True), (80, True), (128, True)])
def test_presets_use_int8_summaries_where_they_read_fewer_bytes(dim: int, int8: bool) -> None:
    """``auto`` (every preset): int8 rows (padded to 64 codes + a 4-byte scale) only where they are
    smaller than the bf16 rows; the step's byte count follows the choice."""
    config = retrieval_config({})
    layer = _layer(config, heads=1, dim=dim, blocks=[1100], seed=dim)
    assert layer.heads[0].index.int8_summaries is int8
    cfg = ClusterIndexConfig(**config.index_options)
    assert cfg.summary_row_bytes(dim) == (-(-dim // 64) * 64 + 4 if int8 else 2 * dim)


def test_bad_summary_dtype_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="summary_dtype must be one of"):
        ClusterIndexConfig(summary_dtype="int4")


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blocks=st.lists(st.integers(1, 700), min_size=1, max_size=5), rows=st.integers(1, 3),
       dim=st.sampled_from([8, 16, 40]), top_k=st.integers(1, 60), preset=st.sampled_from(sorted(PRESETS)),
       int8=st.booleans(), seed=st.integers(0, 2**16))
def test_any_index_shape_matches_the_reference(blocks: list[int], rows: int, dim: int, top_k: int, preset: str,
                                               int8: bool, seed: int) -> None:
    """Small indexes of every shape: only a tail, budgets below / above the tail, open segments."""
    config = retrieval_config({"retrieval_preset": preset, "top_k_keys": top_k})
    if int8:
        config = _int8_summaries(config)
    layer = _layer(config, 2, dim, blocks, seed)
    if top_k >= len(layer):
        assert search_heads([h.index for h in layer.heads], torch.randn(2, rows, dim), top_k, estimate_scale=None) is None
        return
    _check_against_reference(layer, config, rows, seed)


def test_result_does_not_depend_on_threads() -> None:
    config = retrieval_config({})
    layer = _layer(config, 4, 32, [1024] * 5, seed=7)
    q = torch.randn(4, 4, 32, generator=torch.Generator().manual_seed(8))
    indexes = [h.index for h in layer.heads]
    one = search_heads(indexes, q, 100, estimate_scale=0.2, threads=1)
    two = search_heads(indexes, q, 100, estimate_scale=0.2, threads=2)
    assert torch.equal(one.positions, two.positions) and one.keys_scanned == two.keys_scanned
    assert torch.equal(one.rest.out, two.rest.out) and torch.equal(one.rest.lse, two.rest.lse)


def test_not_applicable_returns_none() -> None:
    q = torch.randn(2, 1, 16)
    for options in ({"attend_scanned": True}, {"variance_correction": True}):
        config = RetrievalConfig(top_k=10, estimate_rest=False, index_options={"cluster_size": 4, **options})
        layer = _layer(config, 2, 16, [600], seed=1)
        assert search_heads([h.index for h in layer.heads], q, 10, estimate_scale=None) is None
    ivf = RetrievalConfig(top_k=10, index="flat")
    layer = _layer(ivf, 2, 16, [600], seed=1)
    assert search_heads([h.index for h in layer.heads], q, 10, estimate_scale=None) is None
    config = retrieval_config({})
    empty = OffloadedLayerKV(2, 16, config)
    assert search_heads([h.index for h in empty.heads], q, 10, estimate_scale=0.25) is None
    no_values = RetrievalConfig(top_k=10, estimate_rest=False, index_options={"cluster_size": 4})
    layer = _layer(no_values, 2, 16, [600], seed=1)
    assert search_heads([h.index for h in layer.heads], q, 10, estimate_scale=0.25) is None  # estimate needs values


def test_bad_arguments_are_an_error_not_a_crash() -> None:
    from flashtier._native import cluster_search

    q = np.zeros((2, 1, 16), dtype=np.float32)
    ptrs = np.zeros((2, 17), dtype=np.int64)  # null tables
    counts = np.zeros((2, 4), dtype=np.int64)
    pos = np.zeros((2, 1, 4), dtype=np.int64)
    budget = np.full(2, 8, dtype=np.int64)
    with pytest.raises(ValueError, match="cluster_search"):
        cluster_search(q, ptrs, counts, pos, np.zeros(2, np.int64), np.zeros(0, np.float32), np.zeros(0, np.float32),
                       1, 16, 4, budget, 12.0, 1, 1, 0, 0.3, 0.25, 0.25, 1)
    with pytest.raises(ValueError, match="cluster_search"):  # output of the wrong size
        cluster_search(q, ptrs, counts, pos[:1], np.zeros(2, np.int64), np.zeros(0, np.float32),
                       np.zeros(0, np.float32), 1, 16, 4, budget, 12.0, 1, 1, 0, 0.3, 0.25, 0.25, 1)
    real = np.ones((2, 17), dtype=np.int64)  # non-null tables: only the budgets are wrong below
    for wrong in (np.full(2, 3, dtype=np.int64), np.full(1, 8, dtype=np.int64), np.full(2, 8, dtype=np.int32)):
        with pytest.raises(ValueError, match="cluster_search"):  # below k, one per head, int64
            cluster_search(q, real, counts, pos, np.zeros(2, np.int64), np.zeros(0, np.float32),
                           np.zeros(0, np.float32), 1, 16, 4, wrong, 12.0, 1, 1, 0, 0.3, 0.25, 0.25, 1)


def test_bad_attention_arguments_are_an_error_not_a_crash() -> None:
    """The in-place attention refuses a resident-segments table that does not make S rows of D
    values (null addresses, rows that overlap the next head, a wrong total) and buffers of the wrong
    size, with a ValueError naming it."""
    from flashtier._native import retrieval_attend_pool

    h, g, s_, n, d, block = 2, 2, 3, 2, 16, 4
    k = np.zeros((h, s_, d), dtype=np.float32)
    v = np.zeros_like(k)
    records = np.zeros((2, 2 * h * block * d * 4), dtype=np.uint8)
    table = np.zeros(2, dtype=np.int64)
    pos = np.zeros((h, g, n), dtype=np.int64)
    good = np.array([[k.ctypes.data, v.ctypes.data, s_, s_ * d]], dtype=np.int64)
    bad = {"null address": np.array([[0, v.ctypes.data, s_, s_ * d]], dtype=np.int64),
           "overlapping heads": np.array([[k.ctypes.data, v.ctypes.data, s_, d]], dtype=np.int64),
           "wrong total": np.array([[k.ctypes.data, v.ctypes.data, s_ - 1, s_ * d]], dtype=np.int64),
           "not a table": np.zeros(5, dtype=np.int64)}
    def call(seg, out_rows=h * g):
        return retrieval_attend_pool(np.zeros((h, g, d), np.float32), seg, records, table, pos,
                                     np.zeros(h * g * n, np.int64), np.zeros(0, np.float32), np.zeros(0, np.float32),
                                     np.zeros((out_rows, d), np.float32), h, g, s_, n, d, block, h, 0, 0, 0.25, 1)
    assert call(good) == 0  # (all positions in block 0, slot 0: computed)
    for what, seg in bad.items():
        with pytest.raises(ValueError, match="resident segments"):
            call(seg)
    with pytest.raises(ValueError, match="retrieval_attend_pool"):
        call(good, out_rows=1)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_decode_step_same_through_either_path(preset: str, monkeypatch: pytest.MonkeyPatch) -> None:
    config = retrieval_config({"retrieval_preset": preset})
    heads, group, dim = 2, 3, 32
    layer = _layer(config, heads, dim, [1024] * 4 + [40], seed=11)
    gen = torch.Generator().manual_seed(12)
    q = torch.randn(heads * group, dim, generator=gen)  # [H_q, D]
    rk, rv = torch.randn(heads, 260, dim, generator=gen), torch.randn(heads, 260, dim, generator=gen)
    step = RetrievalAttention(config)
    native = step.decode_step(q, rk, rv, layer, dim ** -0.5)
    monkeypatch.setattr(attention_mod, "search_heads", lambda *a, **k: None)
    reference = step.decode_step(q, rk, rv, layer, dim ** -0.5)
    assert native.stats.keys_scanned == reference.stats.keys_scanned
    for a, b in zip(native.retrieved, reference.retrieved):
        assert torch.equal(a.sort(dim=-1).values, b.sort(dim=-1).values)
    torch.testing.assert_close(native.output, reference.output, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_rest", [True, False])
def test_fused_attention_equals_the_merged_parts(dtype: torch.dtype, with_rest: bool) -> None:
    from flashtier.retrieval.cluster_batch import attend_rows
    from flashtier.retrieval.merge import PartialAttention, merge_partials, partial_attention

    gen = torch.Generator().manual_seed(3)
    h, g, s, n, d = 3, 4, 37, 20, 48  # D not a multiple of 16: the scalar tails too
    q = torch.randn(h, g, d, generator=gen)
    rk, rv = (torch.randn(h, s, d, generator=gen) * 2).to(dtype), torch.randn(h, s, d, generator=gen).to(dtype)
    tk, tv = (torch.randn(h, g, n, d, generator=gen) * 2).to(dtype), torch.randn(h, g, n, d, generator=gen).to(dtype)
    rest = PartialAttention(torch.randn(h, g, d, generator=gen), torch.randn(h, g, generator=gen) + 3) if with_rest else None
    scale = d ** -0.5
    fused = attend_rows(q, rk, rv, tk, tv, rest, scale)
    resident = partial_attention(q, rk.float(), rv.float(), scale)
    far = partial_attention(q.unsqueeze(2), tk.float(), tv.float(), scale)
    parts = [resident, PartialAttention(far.out.squeeze(2), far.lse.squeeze(2))] + ([rest] if rest else [])
    torch.testing.assert_close(fused, merge_partials(parts).out, rtol=2e-5, atol=2e-6)
    with pytest.raises(ValueError, match="retrieval_attend"):  # sizes that do not fit are an error, not a crash
        from flashtier._native import retrieval_attend

        retrieval_attend(q.numpy(), rk.float().numpy(), rv.float().numpy(), tk.float().numpy(), tv.float().numpy(),
                         torch.empty(0).numpy(), torch.empty(0).numpy(), torch.empty(h, g, d).numpy(),
                         h, g, s + 1, n, d, 0, 0, scale, 1)


def test_heads_of_sequences_of_different_lengths_in_one_call_equal_each_alone() -> None:
    """A batched decode step searches every sequence's heads of a layer in one call: each head
    scans its own index's budget, and its result is bit-identical to searching its sequence alone."""
    config = retrieval_config({})
    layers = [_layer(config, 2, 32, blocks, seed) for seed, blocks in enumerate(([1024] * 3, [1024] * 7 + [100], [700]))]
    gen = torch.Generator().manual_seed(11)
    qs = [torch.randn(2, 4, 32, generator=gen) for _ in layers]  # [H, R, D] per sequence
    alone = [search_heads([h.index for h in layer.heads], q, 50, estimate_scale=0.2) for layer, q in zip(layers, qs)]
    joint = search_heads([h.index for layer in layers for h in layer.heads], torch.cat(qs), 50, estimate_scale=0.2)
    assert joint is not None and all(a is not None for a in alone)
    assert len({len(layer) for layer in layers}) == 3  # three index lengths, three budgets
    for b, a in enumerate(alone):
        part = slice(2 * b, 2 * b + 2)
        assert torch.equal(joint.positions[part], a.positions) and joint.keys_scanned[part] == a.keys_scanned
        assert torch.equal(joint.rest.out[part], a.rest.out) and torch.equal(joint.rest.lse[part], a.rest.lse)
    short = _layer(config, 2, 32, [40], seed=9)  # k covers one sequence's keys: the call does not apply
    assert search_heads([h.index for layer in (layers[0], short) for h in layer.heads],
                        torch.randn(4, 4, 32), 50, estimate_scale=0.2) is None
