"""The retrieval step's cost model: bytes from the index config, the probe's fit, its cache, and
how ``plan`` uses it."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from flashtier.checkpoint.config import ModelConfig
from flashtier.runtime.kv import retrieval_cost as rc
from flashtier.runtime.kv.retrieval_config import RetrievalCacheConfig, retrieval_config
from flashtier.runtime.kv.retrieval_cost import HeadShape, RetrievalCost, cached_probe, is_cached, step_bytes
from flashtier.runtime.planner import PlanRequest, make_plan, sizes_from_config

ROOT = Path(__file__).resolve().parents[3]


def test_step_bytes_by_hand_for_the_default_preset() -> None:
    config = retrieval_config({})  # balanced: 4 sinks, window 256, top-100, clusters of 4 under supers of 256
    shape = HeadShape(num_kv_heads=8, queries_per_kv=4, head_dim=128)
    context = 131072
    offloaded = context - 260
    budget = 1024  # 4.5% of the offloaded keys, capped by scan_max_keys
    supers = math.ceil(offloaded / 256)
    clusters = math.ceil(12 * budget / 4)  # the opened super-clusters hold 12x the budget
    per_head = (260 * 2 * 128 * 2  # resident K and V
                + 4 * 100 * 2 * 128 * 2  # each query head's 100 retrieved rows
                # centroids and mean values: int8 rows of 128 codes + a 4-byte scale (summary_dtype auto)
                + supers * (128 + 4 + 40) * 2 + clusters * (128 + 4 + 20) * 2
                + budget * (128 * 2 + 8))  # keys scanned
    assert step_bytes(config, shape, context) == 8 * per_head
    # short contexts scan a share of the keys, and nothing before the window fills
    assert step_bytes(config, shape, 200) == 8 * 200 * 2 * 128 * 2
    assert step_bytes(config, shape, 8192) < step_bytes(config, shape, 65536)


def test_probe_fits_fixed_cost_and_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    config = RetrievalCacheConfig()
    shape = HeadShape(2, 4, 32)
    fixed, rate = 0.0005, 3e9

    def fake(cfg, shp, contexts, steps, seed, dtype, layers, flush):
        assert flush == rc.PROBE_FLUSH_BYTES
        return [fixed + step_bytes(cfg.retrieval, shp, c) / rate for c in contexts]

    monkeypatch.setattr(rc, "_time_layers", fake)
    cost = rc.probe(config, shape)
    assert cost.fixed_s == pytest.approx(fixed, rel=1e-6) and cost.bytes_per_s == pytest.approx(rate, rel=1e-6)
    context = 100_000
    assert cost.step_seconds(config.retrieval, shape, context, 6) == pytest.approx(
        6 * (fixed + step_bytes(config.retrieval, shape, context) / rate))


def test_probe_cache_is_checked_and_rewritten(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_probe(config, shape, *a, **k):
        calls.append(shape)
        return RetrievalCost(0.001, 2e9, 2)

    monkeypatch.setattr(rc, "probe", fake_probe)
    cache = tmp_path / "probe.json"
    config, shape = RetrievalCacheConfig(), HeadShape(2, 4, 32)
    assert not is_cached(config, shape, 6, cache)
    first = cached_probe(config, shape, 6, cache)
    assert is_cached(config, shape, 6, cache) and len(calls) == 1
    again = cached_probe(config, shape, 6, cache)
    assert len(calls) == 1 and again.bytes_per_s == first.bytes_per_s and "cached" in again.source
    other = HeadShape(8, 1, 128)  # another head shape is another probe
    cached_probe(config, other, 6, cache)
    assert len(calls) == 2 and is_cached(config, shape, 6, cache) and is_cached(config, other, 6, cache)
    stored = json.loads(cache.read_text())
    key = next(iter(stored["entries"]))
    stored["entries"][key]["bytes_per_s"] = 1.0  # edited without the crc: not trusted
    cache.write_text(json.dumps(stored))
    assert not is_cached(config, shape, 6, cache)
    assert cached_probe(config, shape, 6, cache).bytes_per_s == 2e9 and len(calls) == 3
    cache.write_text("{cut")
    assert not is_cached(config, shape, 6, cache)
    cached_probe(config, shape, 6, cache)
    assert len(calls) == 4 and is_cached(config, shape, 6, cache)
    assert not is_cached(config, shape, 6, cache, flush=2 << 20)  # a probe flushing less is another probe
    cached_probe(config, shape, 6, cache, flush=2 << 20)
    assert len(calls) == 5 and is_cached(config, shape, 6, cache, flush=2 << 20) and is_cached(config, shape, 6, cache)
    monkeypatch.setattr(rc, "native_fingerprint", lambda: "rebuilt")  # other kernels: measured again
    assert not is_cached(config, shape, 6, cache)
    cached_probe(config, shape, 6, cache)
    assert len(calls) == 6 and is_cached(config, shape, 6, cache)


def test_native_fingerprint_names_the_extension_build() -> None:
    fp = rc.native_fingerprint()
    try:
        from flashtier import _native
    except ImportError:
        assert fp == "none"
        return
    import zlib
    assert fp == format(zlib.crc32(Path(_native.__file__).read_bytes()), "08x")


def test_probe_flush_follows_the_layer_a_step_reads() -> None:
    mib = 1 << 20
    sizes = {"model.embed_tokens.weight": 100 * mib, "lm_head.weight": 100 * mib,
             "model.layers.0.self_attn.q_proj.weight": 2 * mib, "model.layers.1.self_attn.q_proj.weight": 2 * mib,
             "model.layers.0.block_sparse_moe.experts.0.w1.weight": 8 * mib,
             "model.layers.1.block_sparse_moe.experts.0.w1.weight": 8 * mib}
    assert rc.layer_weight_bytes(sizes, 2) == 10 * mib  # embeddings and head are not a layer's
    assert rc.layer_weight_bytes(sizes, 2, active_experts=0.25) == 4 * mib  # top-2 of 8 experts read
    assert rc.layer_weight_bytes({"lm_head.weight": 1}, 2) is None
    assert rc.flush_bytes(None) == rc.PROBE_FLUSH_BYTES
    assert rc.flush_bytes(4 * mib + 1) == 5 * mib  # whole MiB, so nearby models share a cached probe
    assert rc.flush_bytes(10) == mib and rc.flush_bytes(10 << 30) == rc.PROBE_FLUSH_BYTES
    moe = ModelConfig.from_hf(json.loads((ROOT / "models/tiny-moe-16k/config.json").read_text()))
    assert (moe.num_layers, moe.num_experts, moe.num_experts_per_tok) == (6, 8, 2)
    # its 6 layers read 4 MiB of attention and 2 of the 8 experts' 16 MiB: 8/6 MiB, rounded to 2 MiB
    assert rc.model_flush_bytes(moe, sizes) == 2 * mib


def test_plan_uses_the_measured_step() -> None:
    cfg = ModelConfig.from_hf(json.loads((ROOT / "tests/runtime/fixtures/llama-3.1-8b-config.json").read_text()))
    sizes = sizes_from_config(cfg)
    base = PlanRequest(dram_budget=64 << 30, context=131072, attention="retrieval")
    model = make_plan(cfg, sizes, base)
    measured = make_plan(cfg, sizes, PlanRequest(dram_budget=64 << 30, context=131072, attention="retrieval",
                                                 retrieval_step_s=0.5))
    assert model.predicted_retrieval_s is None and measured.predicted_retrieval_s == 0.5
    assert measured.predicted_decode_s >= 0.5 and measured.predicted_decode_s > model.predicted_decode_s
    assert measured.as_json()["predicted_retrieval_s_per_token"] == 0.5
    full = make_plan(cfg, sizes, PlanRequest(dram_budget=64 << 30, context=131072, retrieval_step_s=0.5))
    assert full.predicted_retrieval_s is None  # only retrieval attention uses it
    device = make_plan(cfg, sizes, PlanRequest(device_budget=24 << 30, dram_budget=64 << 30, context=131072,
                                               attention="retrieval", retrieval_step_s=0.5))
    assert device.bound_by == "retrieval_host" and device.predicted_decode_s == pytest.approx(0.5)


def test_plan_cli_probes_once_then_reads_the_cache(tmp_path: Path) -> None:
    cache = tmp_path / "probe.json"
    cmd = [sys.executable, "-m", "flashtier", "plan", str(ROOT / "models/tiny-moe-16k/config.json"), "--context",
           "16384", "--attention", "retrieval", "--json", "--bench-cache", "/nonexistent", "--probe-cache", str(cache)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "probing this machine's retrieval step" in first.stderr
    out = json.loads(first.stdout)
    assert out["predicted_retrieval_s_per_token"] > 0
    assert out["predicted_decode_s_per_token"] >= out["predicted_retrieval_s_per_token"]
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0 and "probing" not in second.stderr
    assert json.loads(second.stdout)["predicted_retrieval_s_per_token"] == out["predicted_retrieval_s_per_token"]
    off = subprocess.run(cmd + ["--retrieval-probe", "off"], capture_output=True, text=True, timeout=120)
    assert off.returncode == 0 and json.loads(off.stdout)["predicted_retrieval_s_per_token"] is None


def test_probe_size_is_bounded_for_models_with_many_kv_heads() -> None:
    assert rc.probe_layers(6, 2) == 6  # small models: every layer (up to 8)
    assert rc.probe_layers(32, 8) == 8
    assert rc.probe_layers(32, 32) == 2  # 64 (layer, kv head) pairs at most
    assert rc.probe_layers(80, 128) == 1  # never zero layers


@pytest.mark.parametrize("args, message", [
    (["--context", "0"], "--context must be a positive number of tokens"),
    (["--probe-cache", "/tmp"], "is a directory"),
])
def test_plan_refuses_bad_probe_arguments_before_probing(args: list[str], message: str) -> None:
    r = subprocess.run([sys.executable, "-m", "flashtier", "plan", str(ROOT / "models/tiny-moe-16k/config.json"),
                        "--attention", "retrieval", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and message in r.stderr and "probing" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
