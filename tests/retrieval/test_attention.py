"""Retrieval attention for one decode step: equals full attention when top-k covers the context."""

from __future__ import annotations

import math

import pytest
import torch

from flashtier.errors import ConfigError, InputError
from flashtier.retrieval import (
    GroupSearch,
    OffloadedLayerKV,
    RetrievalAttention,
    RetrievalConfig,
    attention_mass_covered,
    attention_mass_recall,
    keys_scanned_fraction,
)

H_KV, G, D, T = 2, 3, 16, 700


def full_attention(query: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Reference ``[H_q, D]``: every query head over all T keys of its kv head."""
    q = query.reshape(k.shape[0], -1, k.shape[2])  # [H_kv, G, D]
    return (torch.softmax(q @ k.transpose(1, 2) * scale, dim=-1) @ v).reshape(query.shape)


def split_layer(config: RetrievalConfig, k: torch.Tensor, v: torch.Tensor, block: int = 64):
    """Resident K/V ``[H_kv, S, D]`` and the offloaded rest, added block by block."""
    length = k.shape[1]
    resident = config.resident_positions(length)
    mask = torch.ones(length, dtype=torch.bool)
    mask[resident] = False
    offloaded_pos = torch.nonzero(mask).squeeze(1)
    layer = OffloadedLayerKV(k.shape[0], k.shape[2], config)
    for chunk in torch.split(offloaded_pos, block):
        layer.append(k[:, chunk], v[:, chunk], chunk)
    return k[:, resident], v[:, resident], layer


@pytest.fixture
def layer_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(H_KV * G, D, generator=g) * 2, torch.randn(H_KV, T, D, generator=g),
            torch.randn(H_KV, T, D, generator=g))


@pytest.mark.parametrize("index, estimate", [("flat", False), ("ivf", False), ("cluster", False), ("cluster", True)])
@pytest.mark.parametrize("group_search", ["union", "mean", "rows"])
def test_top_k_over_whole_context_equals_full_attention(index, estimate, group_search, layer_data) -> None:
    query, k, v = layer_data
    config = RetrievalConfig(sink_tokens=4, window=32, top_k=T, index=index, group_search=group_search,
                             index_options={"nlist": 8} if index == "ivf" else {}, estimate_rest=estimate)
    rk, rv, layer = split_layer(config, k, v)
    scale = 1 / math.sqrt(D)
    out = RetrievalAttention(config).decode_step(query, rk, rv, layer, scale)
    torch.testing.assert_close(out.output, full_attention(query, k, v, scale), rtol=1e-5, atol=1e-5)
    assert out.stats.keys_offloaded == H_KV * (T - 36)
    assert out.stats.keys_retrieved == H_KV * (T - 36) * (G if group_search == "rows" else 1)  # rows: per query head
    assert out.stats.keys_scanned_fraction == 1.0


def test_estimate_of_the_rest_brings_small_top_k_closer_to_full_attention(layer_data) -> None:
    query, k, v = layer_data
    scale = 1 / math.sqrt(D)
    errors = {}
    for estimate in (False, True):
        config = RetrievalConfig(sink_tokens=4, window=32, top_k=20, index="cluster", group_search="rows",
                                 estimate_rest=estimate, index_options={"cluster_size": 4, "segment_size": 256})
        rk, rv, layer = split_layer(config, k, v)
        out = RetrievalAttention(config).decode_step(query, rk, rv, layer, scale)
        errors[estimate] = float((out.output - full_attention(query, k, v, scale)).norm() / full_attention(query, k, v, scale).norm())
    assert errors[True] < 0.7 * errors[False], errors
    with pytest.raises(ConfigError, match="estimate_rest"):
        RetrievalConfig(index="flat", estimate_rest=True)


@pytest.mark.parametrize("estimate", [False, True])
def test_attending_every_scanned_key_is_closer_to_full_attention_at_the_same_scan(estimate, layer_data) -> None:
    query, k, v = layer_data
    scale = 1 / math.sqrt(D)
    ref = full_attention(query, k, v, scale)
    err, stats = {}, {}
    for every in (False, True):
        config = RetrievalConfig(sink_tokens=4, window=32, top_k=20, index="cluster", group_search="rows",
                                 scan_budget_fraction=0.2, estimate_rest=estimate,
                                 index_options={"cluster_size": 4, "segment_size": 256, "attend_scanned": every})
        rk, rv, layer = split_layer(config, k, v)
        out = RetrievalAttention(config).decode_step(query, rk, rv, layer, scale)
        err[every] = float((out.output - ref).norm() / ref.norm())
        stats[every] = out.stats
    assert stats[True].keys_scanned == stats[False].keys_scanned  # same keys scored...
    assert stats[True].keys_retrieved > stats[False].keys_retrieved / G  # ...all of them attended (once per group)
    assert err[True] < err[False], err


def test_attend_scanned_returns_one_shared_set_per_search() -> None:
    from flashtier.retrieval.index_cluster import ClusterIndex, ClusterIndexConfig

    g = torch.Generator().manual_seed(1)
    idx = ClusterIndex(D, ClusterIndexConfig(cluster_size=4, segment_size=256, scan_budget_fraction=0.1,
                                             attend_scanned=True))
    idx.add(torch.randn(600, D, generator=g), torch.arange(600))
    found = idx.search(torch.randn(3, D, generator=g), 10)
    assert found.shared and found.positions.shape[0] == 3
    assert found.positions.shape[1] == found.keys_scanned >= 60
    assert all(torch.equal(found.positions[0], row) for row in found.positions)
    assert len(torch.unique(found.positions[0])) == found.positions.shape[1]


def test_nothing_offloaded_is_resident_attention(layer_data) -> None:
    query, k, v = layer_data
    config = RetrievalConfig(sink_tokens=4, window=T)
    layer = OffloadedLayerKV(H_KV, D, config)
    out = RetrievalAttention(config).decode_step(query, k, v, layer, 0.25)
    torch.testing.assert_close(out.output, full_attention(query, k, v, 0.25), rtol=1e-5, atol=1e-5)
    assert out.stats.keys_retrieved == 0 and out.stats.keys_scanned_fraction == 0.0


def test_flat_top_k_attends_sinks_window_and_best_keys(layer_data) -> None:
    query, k, v = layer_data
    config = RetrievalConfig(sink_tokens=4, window=32, top_k=10, index="flat", group_search=GroupSearch.MEAN)
    rk, rv, layer = split_layer(config, k, v)
    out = RetrievalAttention(config).decode_step(query, rk, rv, layer, 0.25)
    q = query.reshape(H_KV, G, D)
    for h, positions in enumerate(out.retrieved):
        scores = q[h].mean(0) @ k[h, 4 : T - 32].T  # offloaded are positions 4 .. T-33
        assert set(positions.tolist()) == set((torch.topk(scores, 10).indices + 4).tolist())
    assert out.output.shape == query.shape


def test_quantised_store_equals_attention_over_dequantised_kv(layer_data) -> None:
    query, k, v = layer_data
    config = RetrievalConfig(sink_tokens=4, window=32, top_k=T, index="flat", store_bits=4, store_group_size=16)
    rk, rv, layer = split_layer(config, k, v)
    out = RetrievalAttention(config).decode_step(query, rk, rv, layer, 1 / math.sqrt(D))
    offloaded = torch.arange(4, T - 32)
    kq, vq = k.clone(), v.clone()
    for h, head in enumerate(layer.heads):  # what the host tier holds: KIVI-dequantised K/V
        kq[h, offloaded], vq[h, offloaded] = head.store.gather(offloaded)
    torch.testing.assert_close(out.output, full_attention(query, kq, vq, 1 / math.sqrt(D)), rtol=1e-5, atol=1e-5)
    assert not torch.equal(kq, k)  # really quantised
    ref = full_attention(query, k, v, 1 / math.sqrt(D))
    assert float((out.output - ref).norm() / ref.norm()) < 0.3


def test_bad_shapes_raise_input_error(layer_data) -> None:
    query, k, v = layer_data
    config = RetrievalConfig(window=32)
    rk, rv, layer = split_layer(config, k, v)
    with pytest.raises(InputError, match="multiple of H_kv"):
        RetrievalAttention(config).decode_step(query[:5], rk, rv, layer, 1.0)
    with pytest.raises(InputError, match="resident K/V"):
        RetrievalAttention(config).decode_step(query, rk[:1], rv[:1], layer, 1.0)
    with pytest.raises(InputError, match="offload expects"):
        layer.append(k[:1, :4], v[:1, :4], torch.arange(4))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"window": -1}, "window must be >= 0"),
        ({"sink_tokens": -2}, "sink_tokens must be >= 0"),
        ({"top_k": 0}, "top_k must be positive"),
        ({"index": "annoy"}, "unknown retrieval index 'annoy'; choose one of"),
        ({"group_search": "max"}, "group_search must be one of"),
        ({"scan_budget_fraction": 1.5}, "scan_budget_fraction must be in"),
        ({"store_bits": 3}, "store_bits must be"),
        ({"index": "ivf", "index_options": {"nlists": 4}}, "no option.*nlists.*options are"),
        ({"index_options": {"scan_budget_fraction": 0.1}}, "set scan_budget_fraction on RetrievalConfig"),
    ],
)
def test_bad_config_raises_config_error(kwargs, message) -> None:
    with pytest.raises(ConfigError, match=message):
        RetrievalConfig(**kwargs)


def test_config_is_frozen_and_hashable() -> None:
    config = RetrievalConfig(index="ivf", index_options={"nlist": 64})
    with pytest.raises(AttributeError):
        config.top_k = 5  # type: ignore[misc]
    assert hash(config) == hash(RetrievalConfig(index="ivf", index_options={"nlist": 64}))
    assert config.resident_positions(10).tolist() == list(range(10))
    assert RetrievalConfig(sink_tokens=2, window=3).resident_positions(10).tolist() == [0, 1, 7, 8, 9]


def test_offload_range_and_resident_positions_partition_the_context() -> None:
    config = RetrievalConfig(sink_tokens=4, window=100)
    assert config.offload_range(90, 0, block=64) == range(4, 4)  # nothing has left the window yet
    assert config.offload_range(200, 0, block=64) == range(4, 64)  # block 0 minus the sinks
    assert config.offload_range(300, 64, block=64) == range(64, 192)  # two more whole blocks
    layer = OffloadedLayerKV(1, 2, config)
    end = 0
    for length in range(1, 700, 37):  # decode in steps: offload whole blocks as they leave
        span = config.offload_range(length, layer.offloaded_end, block=64)
        if span:
            pos = torch.arange(span.start, span.stop)
            layer.append(torch.zeros(1, len(pos), 2), torch.zeros(1, len(pos), 2), pos)
        resident = config.resident_positions(length, layer.offloaded_end)
        offloaded = layer.heads[0].index.positions()
        assert sorted(resident.tolist() + offloaded.tolist()) == list(range(length))  # disjoint, complete
        assert length - layer.offloaded_end >= min(config.window, length - 4) or layer.offloaded_end == 0
        end = layer.offloaded_end
    assert end == (length - 100) // 64 * 64 == 512  # last length 667: window 100 + a partial block


def test_mass_metrics() -> None:
    g = torch.Generator().manual_seed(4)
    q, keys = torch.randn(2, 8, generator=g), torch.randn(50, 8, generator=g)
    probs = torch.softmax(q.double() @ keys.double().T, dim=-1)
    best5 = torch.topk(probs, 5, dim=1).indices  # [2, 5]
    torch.testing.assert_close(attention_mass_recall(q, keys, best5, 1.0), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(attention_mass_covered(q, keys, torch.arange(50), 1.0), torch.ones(2, dtype=torch.float64))
    worst5 = torch.topk(probs, 5, dim=1, largest=False).indices
    assert (attention_mass_recall(q, keys, worst5, 1.0) < 0.5).all()
    shared = torch.tensor([0, 1, 2])
    torch.testing.assert_close(attention_mass_covered(q, keys, shared, 1.0), probs[:, :3].sum(1))
    assert keys_scanned_fraction(30, 120) == 0.25 and keys_scanned_fraction(0, 0) == 0.0


def test_cluster_retrieval_on_shifted_data_beats_sinks_and_window_alone() -> None:
    from flashtier.retrieval import ShiftedKQConfig, make_shifted_kq

    keys, queries = make_shifted_kq(ShiftedKQConfig(n_keys=4096, dim=32, group=4, n_queries=4, seed=11))
    values = torch.randn(4096, 32, generator=torch.Generator().manual_seed(0))
    k, v = keys.unsqueeze(0), values.unsqueeze(0)  # one kv head [1, T, D]
    config = RetrievalConfig(sink_tokens=4, window=64, top_k=100, index="cluster", scan_budget_fraction=0.03)
    rk, rv, layer = split_layer(config, k, v)
    scale = 1 / math.sqrt(32)
    for q in queries:  # [G, D], one decode step each
        ref = full_attention(q, k, v, scale)
        out = RetrievalAttention(config).decode_step(q, rk, rv, layer, scale)
        resident_only = full_attention(q, rk, rv, scale)
        assert float((out.output - ref).norm()) < float((resident_only - ref).norm())
        resident = config.resident_positions(4096)
        attended = torch.cat([resident, out.retrieved[0]])
        covered = attention_mass_covered(q, keys, attended, scale).mean()
        assert covered > 2 * attention_mass_covered(q, keys, resident, scale).mean()
        assert out.stats.keys_scanned_fraction < 0.05


def test_variance_correction_brings_the_estimate_of_the_rest_closer() -> None:
    # clusters of spread keys: the centroid alone underestimates exp(q.k) summed over the members
    g = torch.Generator().manual_seed(3)
    k = torch.randn(H_KV, T, D, generator=g) * 1.5
    v = torch.randn(H_KV, T, D, generator=g)
    query = torch.randn(H_KV * G, D, generator=g) * 2
    scale = 1 / math.sqrt(D)
    ref = full_attention(query, k, v, scale)
    err = {}
    for corr in (False, True):
        config = RetrievalConfig(sink_tokens=4, window=32, top_k=20, index="cluster", group_search="rows",
                                 estimate_rest=True,
                                 index_options={"cluster_size": 8, "segment_size": 256, "variance_correction": corr})
        rk, rv, layer = split_layer(config, k, v)
        out = RetrievalAttention(config).decode_step(query, rk, rv, layer, scale)
        err[corr] = float((out.output - ref).norm() / ref.norm())
    assert err[True] < err[False], err
