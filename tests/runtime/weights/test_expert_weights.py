"""MoE experts through per-layer expert caches: exact tokens with any cache size, policy and
predictor; budgets honoured; statistics; a router-perfect oracle reaches recall 1."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from flashtier.errors import BudgetError
from flashtier.runtime.engine import EngineConfig, Model, parse_bytes
from flashtier.runtime.weights.experts import ExpertWeights
from flashtier.runtime.options import ExpertCacheConfig
from flashtier.checkpoint.make_model import PRESETS, MakeModelSpec, write_model

HERE = Path(__file__).parent.parent  # tests/runtime: hf_models.py
spec = importlib.util.spec_from_file_location("hf_models", HERE / "hf_models.py")
hf_models = importlib.util.module_from_spec(spec)
spec.loader.exec_module(hf_models)

PROMPT = list(range(3, 40))
NEW = 20


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe", "made-mixtral"])
def moe(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    if request.param == "made-mixtral":  # bf16, 8 experts top-2, 4 layers
        cfg = dict(PRESETS["tiny-mixtral"], num_hidden_layers=4, vocab_size=211, num_local_experts=8)
        write_model(out, MakeModelSpec(cfg, "bfloat16", seed=7))
    else:
        hf_models.make_hf_model(request.param, out)
    expected = Model(out).generate(PROMPT, max_new_tokens=NEW, ignore_eos=True).tokens
    return out, expected


def paged(path, budget=64 << 20, **extra):
    return Model(path, EngineConfig.from_options(dram_budget=budget, max_context=64, kv_block_size=16, **extra))


@pytest.mark.parametrize("slots", [1, 2, 3, None])
def test_tokens_equal_in_memory_with_any_cache_size(moe, slots):
    path, expected = moe
    with paged(path, expert_slots=slots) as llm:
        assert isinstance(llm.weights, ExpertWeights)
        result = llm.generate(PROMPT, max_new_tokens=NEW, ignore_eos=True)
    assert result.tokens == expected
    s = result.stats
    assert 0 <= s["expert_hit_rate"] <= 1 and s["expert_uses"] > 0
    if slots is not None:
        assert set(s["expert_cache"]["slots_per_layer"].values()) == {slots}


@pytest.mark.parametrize("policy", ["lru", "lfu", "lrfu", "least-stale"])
@pytest.mark.parametrize("predictor", ["router", "affinity", "auto", "off"])
def test_tokens_equal_in_memory_with_every_policy_and_predictor(moe, policy, predictor):
    path, expected = moe
    with paged(path, expert_slots=2, expert_policy=policy, expert_predictor=predictor, expert_widen=1) as llm:
        assert llm.generate(PROMPT, max_new_tokens=NEW, ignore_eos=True).tokens == expected


def test_one_expert_per_layer_reads_on_demand(moe):
    path, expected = moe
    with paged(path, expert_slots=1, expert_predictor="off") as llm:
        result = llm.generate(PROMPT, max_new_tokens=NEW, ignore_eos=True)
    assert result.tokens == expected
    assert result.stats["expert_demand_reads"] > 0 and result.stats["bytes_per_token_storage"] > 0


def test_budget_covers_resident_weights_kv_window_and_expert_caches(moe):
    path, expected = moe
    total = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    budget = int(total * 0.6)
    try:
        paged(path, budget).close()
    except BudgetError as e:  # tiny models need a window of two of their largest dense groups
        budget = parse_bytes(re.search(r"at least (\S+)$", str(e)).group(1)) + 4 * 40960
    with paged(path, budget) as llm:
        result = llm.generate(PROMPT, max_new_tokens=NEW, ignore_eos=True)
        w = llm.weights
        held = w.plan.resident_bytes["host"] + w.plan.kv_bytes["host"] + w.plan.stream_window_bytes + w.expert_cache_bytes
    assert result.tokens == expected
    assert held <= budget
    r = result.stats["resident_bytes"]
    assert r["expert_cache"] == w.expert_cache_bytes and r["expert_cache"] >= w.slot_bytes


def test_a_cache_of_every_expert_reads_each_expert_once(moe):
    path, expected = moe
    with paged(path, 256 << 20) as llm:
        result = llm.generate(PROMPT, max_new_tokens=NEW, ignore_eos=True)
        every = sum(b for c in llm.weights._caches.values() for b in c.page_bytes.values())
    s = result.stats
    assert result.tokens == expected
    assert s["expert_bytes_read"] <= every  # nothing was read twice
    with paged(path, 256 << 20) as llm:  # a second request reads only experts never used before
        llm.generate(PROMPT, max_new_tokens=NEW, ignore_eos=True)
        again = llm.generate(PROMPT[:-1], max_new_tokens=NEW, ignore_eos=True).stats
    assert again["expert_hit_rate"] > 0.95 and again["expert_bytes_read"] <= every  # cumulative


def record_routing(path) -> list[dict[int, list[int]]]:
    """The experts each MoE layer used in each pass (prefill chunk, then decode steps)."""
    llm = Model(path)
    passes: list[dict[int, list[int]]] = []
    forward = llm.transformer.forward

    def traced(*args, **kwargs):
        out = forward(*args, **kwargs)
        passes.append({i: sorted(set(t.reshape(-1).tolist())) for i, t in llm.transformer.trace.chosen.items()})
        return out

    llm.transformer.forward = traced
    llm.generate(PROMPT, max_new_tokens=NEW, ignore_eos=True)
    return passes


def test_router_perfect_oracle_gives_recall_one(moe):
    path, expected = moe
    truth = record_routing(path)
    with paged(path, expert_slots=2, expert_predictor="router", expert_gate=False) as llm:
        w = llm.weights
        step = [0]
        w.predictor.from_hidden = lambda layer, hidden, normed_by=None: truth[step[0]][layer][: w.predictor.width]
        end = w.step_end

        def step_end():
            end()
            step[0] += 1

        w.step_end = step_end
        result = llm.generate(PROMPT, max_new_tokens=NEW, ignore_eos=True)
    s = result.stats
    assert result.tokens == expected
    recalls = [s["expert_prediction_recall"], s["expert_first_layer_prediction_recall"]]
    assert [r for r in recalls if r is not None] in ([1.0], [1.0, 1.0])  # qwen2_moe has one MoE layer
    assert s["expert_prefetch_precision"] == 1.0
    assert s["expert_prefetch_recall"] <= s["expert_hit_rate"]


def test_stats_are_in_generate_json(moe, tmp_path):
    import json
    import subprocess
    import sys

    path, expected = moe
    p = subprocess.run([sys.executable, "-m", "flashtier", "generate", str(path), "--prompt-ids",
                        ",".join(map(str, PROMPT)), "--max-new-tokens", str(NEW), "--greedy", "--ignore-eos",
                        "--json", "--max-context", "64", "--dram-budget", "64M", "--expert-slots", "2",
                        "--expert-policy", "lru"], capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["tokens"] == expected
    s = out["stats"]
    for key in ("expert_hit_rate", "expert_prefetch_precision", "expert_prefetch_recall", "bytes_per_token_storage"):
        assert key in s
    assert s["expert_cache"]["policy"] == "lru"


def test_bad_options_are_refused():
    from flashtier.errors import ConfigError

    with pytest.raises(ConfigError, match="least-stale"):
        ExpertCacheConfig(policy="fifo")
    with pytest.raises(ConfigError, match="router"):
        ExpertCacheConfig(predictor="magic")
    with pytest.raises(ConfigError, match=">= 1"):
        ExpertCacheConfig(slots=0)


def test_stand_in_device_tier_gives_the_same_tokens(moe):
    path, expected = moe
    with paged(path, expert_slots=2, expert_device_slots=1) as llm:
        w = llm.weights
        cache = w._caches[next(iter(w._caches))]
        assert all(w.store.compute_tier_of(p) == "device" for ps in cache.pages.values() for p in ps)
        assert w.store.compute_tier == "host"  # the streamed weights' arena has no device pool
        assert llm.generate(PROMPT, max_new_tokens=NEW, ignore_eos=True).tokens == expected


def test_failed_pass_leaves_the_caches_usable(moe):
    path, expected = moe
    with paged(path, expert_slots=2) as llm:
        w = llm.weights
        real = w._acquire_expert
        calls = [0]

        def flaky(layer, e):
            calls[0] += 1
            if calls[0] == 5:
                raise RuntimeError("injected")
            return real(layer, e)

        w._acquire_expert = flaky
        with pytest.raises(RuntimeError, match="injected"):
            llm.generate(PROMPT, max_new_tokens=NEW, ignore_eos=True)
        w._acquire_expert = real
        assert llm.generate(PROMPT, max_new_tokens=NEW, ignore_eos=True).tokens == expected
        w.store.check_invariants()
        for cache in w._caches.values():
            assert all(w.store.location(p).pins == 0 for ps in cache.pages.values() for p in ps)


def test_plan_gives_the_expert_cache_what_the_budget_leaves():
    from flashtier.checkpoint.config import ModelConfig
    from flashtier.checkpoint.make_model import hf_config
    from flashtier.runtime.planner import PlanRequest, make_plan, sizes_from_config

    cfg = ModelConfig.from_hf(hf_config(PRESETS["moe-1.3g"]))
    sizes = sizes_from_config(cfg)
    expert = 3 * 1024 * 2816 * 2  # w1, w3, w2 in bf16
    attention = 8 * (2 * 1024 * 1024 + 2 * 256 * 1024) * 2
    head = 32000 * 1024 * 2
    small = (8 * (2 * 1024 + 8 * 1024) + 1024) * 2  # norms, routers, final norm
    kv = 64 * 2 * 8 * 4 * 64 * 2
    budget = 400 << 20
    plan = make_plan(cfg, sizes, PlanRequest(dram_budget=budget, context=64, expert_cache=True,
                                             expert_cache_min_bytes=8 * expert))
    assert plan.resident_bytes["host"] == small + attention + head  # every non-expert weight
    assert plan.stream_window_bytes == 0  # nothing else streams: the expert cache is the window
    assert plan.expert_cache_bytes == budget - (small + attention + head) - kv
    assert plan.need_bytes == small + kv + 8 * expert
    # The minimum is the least budget that plans (64 KiB steps): attention streams there, so it
    # holds a window besides the expert reserve.
    least = plan.min_dram_budget
    assert least >= plan.need_bytes
    make_plan(cfg, sizes, PlanRequest(dram_budget=least, context=64, expert_cache=True, expert_cache_min_bytes=8 * expert))
    with pytest.raises(BudgetError, match=f"at least {-(-least // (1 << 20))}M"):
        make_plan(cfg, sizes, PlanRequest(dram_budget=least - (64 << 10), context=64, expert_cache=True,
                                          expert_cache_min_bytes=8 * expert))
    assert sum(t == "host" for n, t in plan.placement.items() if ".experts." in n) == 0
    with pytest.raises(BudgetError, match="expert cache"):
        make_plan(cfg, sizes, PlanRequest(dram_budget=100 << 20, context=64, expert_cache=True,
                                          expert_cache_min_bytes=8 * expert))


def test_asking_for_more_slots_than_the_budget_holds_is_refused(moe):
    path, _ = moe
    with pytest.raises(BudgetError, match=r"an expert cache of .*raise the budget to at least"):
        paged(path, 200_000, expert_slots=4)
