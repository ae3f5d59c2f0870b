"""The placement plan and cost model, checked against hand calculations."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from flashtier.errors import BudgetError, ConfigError
from flashtier.checkpoint.config import ModelConfig
from flashtier.checkpoint.make_model import PRESETS, hf_config
from flashtier.runtime.planner import PlanRequest, make_plan, sizes_from_config

FIXTURE = Path(__file__).parent / "fixtures" / "llama-3.1-8b-config.json"
GiB = 1 << 30

# Llama-3.1-8B by hand: per layer q,o 4096x4096; k,v 1024x4096; gate,up,down 14336x4096; 2 norms.
LAYER_PARAMS = 2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 14336 * 4096 + 2 * 4096
EMBED_PARAMS = 128256 * 4096
TOTAL_PARAMS = 32 * LAYER_PARAMS + 2 * EMBED_PARAMS + 4096  # + lm_head + final norm
KV_PER_TOKEN = 2 * 32 * 8 * 128 * 2  # K and V, layers, kv heads, head dim, bf16 bytes


def llama8b() -> ModelConfig:
    return ModelConfig.from_hf(json.loads(FIXTURE.read_text()))


def test_8b_retrieval_fits_a_24g_device_under_0_2_s():
    cfg = llama8b()
    sizes = sizes_from_config(cfg)
    assert sum(sizes.values()) == 2 * TOTAL_PARAMS
    plan = make_plan(cfg, sizes, PlanRequest(device_budget=24 * GiB, dram_budget=64 * GiB, context=131072, attention="retrieval"))
    # Everything but the embedding table (read by rows) is on the device ...
    assert plan.resident_bytes["device"] == 2 * (TOTAL_PARAMS - EMBED_PARAMS)
    # ... with the sink + window KV: (4 + 512) tokens.
    assert plan.kv_bytes["device"] == (4 + 512) * KV_PER_TOKEN
    assert plan.kv_bytes["host"] == (131072 - 516) * KV_PER_TOKEN
    assert plan.resident_bytes["device"] + plan.kv_bytes["device"] < 24 * GiB
    assert plan.fits
    assert plan.predicted_decode_s < 0.2


def test_8b_full_attention_is_bound_by_the_host_link():
    cfg = llama8b()
    plan = make_plan(cfg, sizes_from_config(cfg), PlanRequest(device_budget=24 * GiB, dram_budget=64 * GiB, context=131072, attention="full"))
    assert plan.kv_bytes["host"] == 131072 * KV_PER_TOKEN  # 16 GiB: cannot stay on the device
    assert plan.bound_by == "host_to_device"
    assert plan.bytes_per_token["host_to_device"] >= 131072 * KV_PER_TOKEN
    assert plan.predicted_decode_s > 0.5  # 16 GiB over 25 GB/s


def test_dense_cpu_plan_keeps_attention_resident_first():
    cfg = ModelConfig.from_hf(hf_config(PRESETS["dense-1.7g"]))
    sizes = sizes_from_config(cfg)
    plan = make_plan(cfg, sizes, PlanRequest(dram_budget=700 << 20, context=256))
    attn = [n for n in sizes if "self_attn" in n]
    ffn = [n for n in sizes if ".mlp." in n]
    assert all(plan.placement[n] == "host" for n in attn)
    assert any(plan.placement[n] == "storage" for n in ffn)
    assert plan.resident_bytes["host"] + plan.kv_bytes["host"] + plan.stream_window_bytes <= 700 << 20
    streamed = sum(sizes[n] for n, t in plan.placement.items() if t == "storage" and n != "model.embed_tokens.weight")
    assert plan.bytes_per_token["storage"] == streamed + sizes["model.embed_tokens.weight"] // cfg.vocab_size


@pytest.mark.parametrize("budget_mib", [450, 600, 700, 900])
def test_per_tensor_residency_uses_the_budget_a_whole_layer_would_leave(budget_mib):
    cfg = ModelConfig.from_hf(hf_config(PRESETS["dense-1.7g"]))
    sizes = sizes_from_config(cfg)
    budget = budget_mib << 20
    by_tensor = make_plan(cfg, sizes, PlanRequest(dram_budget=budget, context=64))
    by_layer = make_plan(cfg, sizes, PlanRequest(dram_budget=budget, context=64, streamed_unit="layer"))
    for plan in (by_tensor, by_layer):  # the budget is a promise either way
        assert plan.resident_bytes["host"] + plan.kv_bytes["host"] + plan.stream_window_bytes <= budget
    ffn_tensor = max(sizes[n] for n in sizes if ".mlp." in n)
    # the window holds two of the largest streamed tensors (tensor unit) or two layers' FFN (layer unit)
    assert by_tensor.stream_window_bytes <= by_layer.stream_window_bytes
    assert by_tensor.stream_window_bytes >= 2 * ffn_tensor
    # tensor unit: nothing the budget could hold is streamed; layer unit: FFN layers all or nothing
    assert by_tensor.bytes_per_token["storage"] <= by_layer.bytes_per_token["storage"]
    free = budget - by_tensor.resident_bytes["host"] - by_tensor.kv_bytes["host"] - by_tensor.stream_window_bytes
    assert free < ffn_tensor
    for i in range(cfg.num_layers):
        tiers = {by_layer.placement[f"model.layers.{i}.mlp.{p}_proj.weight"] for p in ("gate", "up", "down")}
        assert len(tiers) == 1


def test_budget_below_minimum_names_the_minimum():
    cfg = ModelConfig.from_hf(hf_config(PRESETS["dense-1.7g"]))
    with pytest.raises(BudgetError, match=r"below the minimum.*at least \d+[MK]"):
        make_plan(cfg, sizes_from_config(cfg), PlanRequest(dram_budget=50 << 20))


def test_plan_cli_json_from_config_alone():
    r = subprocess.run([sys.executable, "-m", "flashtier", "plan", str(FIXTURE), "--device-budget", "24G",
                        "--dram-budget", "64G", "--context", "131072", "--attention", "retrieval", "--json",
                        "--bench-cache", "/nonexistent", "--retrieval-probe", "off"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["fits"] is True and out["predicted_decode_tok_s"] > 5
    assert {"resident_bytes", "bytes_per_token", "bandwidths"} <= set(out)


def test_retrieval_host_reads_follow_the_scan_cap():
    cfg = llama8b()
    sizes = sizes_from_config(cfg, 2)
    base = PlanRequest(device_budget=24 << 30, dram_budget=64 << 30, context=131072, attention="retrieval")
    top_k_rows = 2048 * KV_PER_TOKEN  # the retrieved rows, read as stored
    capped = make_plan(cfg, sizes, base)  # 2% of ~130K keys > 1024: the cap binds
    assert capped.bytes_per_token["kv_host_read"] == 1024 * KV_PER_TOKEN // 2 + top_k_rows
    share = make_plan(cfg, sizes, replace(base, retrieval_scan_max_keys=None))
    offloaded = 131072 - 516
    assert share.bytes_per_token["kv_host_read"] == int(offloaded * 0.02 * KV_PER_TOKEN / 2) + top_k_rows
    assert capped.predicted_decode_s <= share.predicted_decode_s
    with pytest.raises(ConfigError, match="retrieval_scan_max_keys"):
        PlanRequest(retrieval_scan_max_keys=0)


def test_quantised_offloaded_kv_shrinks_the_host_tier_by_the_codec_ratio():
    cfg = llama8b()
    sizes = sizes_from_config(cfg, 2)
    base = PlanRequest(device_budget=24 << 30, dram_budget=64 << 30, context=131072, attention="retrieval")
    raw = make_plan(cfg, sizes, base)
    quant = make_plan(cfg, sizes, replace(base, kv_host_fraction=0.375))
    assert quant.kv_bytes["host"] == int(raw.kv_bytes["host"] * 0.375)
    assert quant.kv_bytes["device"] == raw.kv_bytes["device"]  # sinks + window stay exact
    with pytest.raises(ConfigError, match="kv_host_fraction"):
        PlanRequest(kv_host_fraction=0.0)


@pytest.mark.parametrize("preset", ["tiny-llama", "dense-1.7g", "moe-1.3g"])
def test_the_minimum_budget_is_the_least_that_plans(preset):
    """``plan``'s minimum and the refusal's minimum are one number: the least budget (64 KiB steps)
    whose own placement fits. Below it, the refusal names it; at it, planning succeeds. (A refused
    small budget streams more weights and needs a larger window than the true minimum does, so
    the refused placement's need overstates the minimum.)"""
    from flashtier.errors import BudgetError
    from flashtier.checkpoint.config import ModelConfig
    from flashtier.checkpoint.make_model import PRESETS, hf_config
    from flashtier.runtime.planner import PlanRequest, make_plan, sizes_from_config

    over = dict(PRESETS[preset])
    if preset == "tiny-llama":
        over["vocab_size"] = 32000  # a table large enough that the window matters
    cfg = ModelConfig.from_hf(hf_config(over))
    sizes = sizes_from_config(cfg)
    generous = make_plan(cfg, sizes, PlanRequest(dram_budget=sum(sizes.values()), context=256))
    least = generous.min_dram_budget
    assert make_plan(cfg, sizes, PlanRequest(dram_budget=least, context=256)).min_dram_budget == least
    for below in (least - (64 << 10), least // 2):
        with pytest.raises(BudgetError, match=r"at least (\d+)([MK])") as e:
            make_plan(cfg, sizes, PlanRequest(dram_budget=below, context=256))
        import re

        number, unit = re.search(r"at least (\d+)([MK])", str(e.value)).groups()
        named = int(number) << (20 if unit == "M" else 10)
        assert least <= named < least + (1 << 20)
        make_plan(cfg, sizes, PlanRequest(dram_budget=named, context=256))  # what it names plans


def test_plan_cli_plans_the_kv_of_several_sequences():
    """``plan --kv-sequences N`` reserves the KV of N contexts (what generate's --kv-sequences and
    serve's --max-batch make the engine reserve), with either attention; 0 is one clear error."""
    def plan(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "flashtier", "plan", str(FIXTURE), "--dram-budget", "64G",
                               "--context", "1024", "--json", "--bench-cache", "/nonexistent", *extra],
                              capture_output=True, text=True, timeout=120)

    one, four = plan(), plan("--kv-sequences", "4")
    assert one.returncode == 0 and four.returncode == 0, one.stderr + four.stderr
    kv1, kv4 = json.loads(one.stdout)["kv_bytes"], json.loads(four.stdout)["kv_bytes"]
    assert kv4["host"] == 4 * kv1["host"] > 0
    r1, r2 = (plan("--kv-sequences", n, "--attention", "retrieval", "--retrieval-probe", "off") for n in ("1", "2"))
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    p2 = json.loads(r2.stdout)
    assert p2["kv_bytes"]["host"] == 2 * json.loads(r1.stdout)["kv_bytes"]["host"] > 0
    assert any("2 sequences" in n for n in p2["notes"])
    bad = plan("--kv-sequences", "0")
    assert bad.returncode != 0 and "--kv-sequences" in bad.stderr and "Traceback" not in bad.stderr
