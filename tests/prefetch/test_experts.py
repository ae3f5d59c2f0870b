"""Next-layer expert prediction: the router predictor routes as the model does on the same
input, the affinity predictor learns which expert follows which, 'auto' picks the better one."""

from __future__ import annotations

import pytest
import torch
from flashtier.errors import ConfigError
from flashtier.prefetch.experts import ExpertPredictor, MoeLayerSpec, PredictorConfig

E, H, K = 8, 32, 2


def predictor(mode: str = "auto", widen: int = 0, layers=(0, 2, 3)) -> tuple[ExpertPredictor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    weights: dict[str, torch.Tensor] = {}
    specs = {}
    for i in layers:
        weights[f"r{i}"] = torch.randn(E, H, generator=g)
        weights[f"n{i}"] = 1 + 0.1 * torch.randn(H, generator=g)
        specs[i] = MoeLayerSpec(f"r{i}", f"n{i}")
    return ExpertPredictor(specs, E, K, 1e-5, weights.__getitem__, PredictorConfig(mode, widen)), weights


def model_routing(weights, layer: int, x: torch.Tensor) -> set[int]:
    """What the forward does: RMSNorm with the layer's norm, router, softmax, top-k."""
    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * weights[f"n{layer}"]
    return set(torch.topk(torch.softmax(h @ weights[f"r{layer}"].t(), -1), K).indices[0].tolist())


def test_router_prediction_on_the_routers_own_input_is_exact():
    p, w = predictor()
    for seed in range(20):
        x = torch.randn(1, H, generator=torch.Generator().manual_seed(seed))
        for layer in (0, 2, 3):
            assert set(p.from_hidden(layer, x)) == model_routing(w, layer, x)


def test_targets_skip_dense_layers_and_width_grows_with_widening():
    p, _ = predictor(widen=3)
    assert [p.target(i) for i in range(4)] == [2, 2, 3, None]
    assert p.previous(2) == 0 and p.previous(0) is None
    assert p.width == K + 3 and len(p.from_hidden(2, torch.randn(1, H))) == K + 3
    assert predictor(widen=100)[0].width == E


def test_affinity_learns_which_expert_follows_which():
    p, _ = predictor("affinity")
    follow = {e: [(e + 1) % E, (e + 5) % E] for e in range(E)}  # layer 2's experts given layer 0's
    for step in range(40):
        a = step % E
        p.observe(2, follow[a], [a], guesses={})
    assert set(p.from_previous(2, [3])) == set(follow[3])
    assert p.from_previous(3, [1]) == []  # nothing seen for layer 3 yet
    assert p.source(2) == "affinity" and p.source(0) == "router"  # layer 0 has no earlier layer


def test_auto_issues_the_predictor_with_the_better_recent_recall():
    p, _ = predictor("auto")
    assert p.source(2) == "router"  # no evidence yet: the router (it guesses earlier)
    for _ in range(10):
        p.observe(2, [1, 2], [0], guesses={"router": [5, 6], "affinity": [1, 2]})
    assert p.source(2) == "affinity"
    for _ in range(40):
        p.observe(2, [3, 4], [0], guesses={"router": [3, 4], "affinity": [1, 2]})
    assert p.source(2) == "router"
    assert p.running_recall()[2]["router"] > 0.9


def test_bad_configs_are_refused():
    with pytest.raises(ConfigError, match="router"):
        PredictorConfig("psychic")
    with pytest.raises(ConfigError, match=">= 0"):
        PredictorConfig("router", widen=-1)


def test_a_state_normalised_by_the_previous_layer_routes_like_the_raw_state():
    p, w = predictor()
    for seed in range(10):
        h = torch.randn(1, H, generator=torch.Generator().manual_seed(100 + seed)) * 3
        normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * w["n0"]  # layer 0's router input
        assert p.from_hidden(2, normed, normed_by=0) == p.from_hidden(2, h)


def test_gate_withholds_costly_guesses_and_issues_cheap_ones():
    from flashtier.prefetch.experts import PrefetchGate

    gate = PrefetchGate([0], width=2, read_s=0.013)  # a 17 MB expert at 1.3 GB/s
    for _ in range(50):  # the disk is the bottleneck, a layer computes in 3 ms, guesses 60% right
        gate.observe_step(0.003, 0.9)
        gate.score(0, [1, 2], [1, 5] if _ % 5 < 3 else [3, 5])
    assert not gate.pays(0, 0, displaces=False)  # 0.6 * 3 ms < 0.4 * 13 ms * 0.9
    cheap = PrefetchGate([0], width=2, read_s=0.0003)  # a small expert, an idle disk
    for _ in range(50):
        cheap.observe_step(0.001, 0.1)
        cheap.score(0, [1, 2], [1, 5] if _ % 5 < 3 else [3, 5], cached=[4, 6])
    assert cheap.pays(0, 0, displaces=False)
    # ...but not if it would evict an expert the layer reuses more often than the guess is right
    for _ in range(50):
        cheap.score(0, [1, 2], [4, 6] if _ % 5 < 4 else [1, 2], cached=[4, 6])
    assert not cheap.pays(0, 0, displaces=True)
