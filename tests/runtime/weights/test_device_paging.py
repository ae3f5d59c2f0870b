"""Weights paged onto a device (``--device-budget``): the planner fills the device, then the host,
and streams the rest; every page not on the device is copied into the device window at its use.

On machines without a GPU the device tier is its CPU stand-in (``device='cpu'``): the same
placement, budgets and transfer schedule, checked here; the CUDA test at the end runs the same
scenario on a GPU and skips without one."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flashtier.checkpoint.folder import EMBED
from flashtier.checkpoint.make_model import PRESETS, MakeModelSpec, write_model
from flashtier.errors import BudgetError, ConfigError
from flashtier.prefetch.placement import PlacementCosts
from flashtier.runtime.engine import EngineConfig, Model
from flashtier.tiers.manager import DEFAULT_ARENA

PROMPT = list(range(3, 40))  # longer than one 16-token KV block
KV = 2 * 8 * 2 * 16 * 64 * 4  # K and V, 8 layers, 2 kv heads x 16, 64 positions, fp32: room for the cache


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    cfg = dict(PRESETS["tiny-llama"], num_hidden_layers=8, vocab_size=256, intermediate_size=256)
    return write_model(tmp_path_factory.mktemp("dev") / "m", MakeModelSpec(cfg, "bfloat16", seed=5))


def weight_bytes(path) -> int:
    from flashtier.checkpoint.folder import open_checkpoint

    ck = open_checkpoint(path)
    return sum(t.nbytes for n, t in ck.tensors.items() if n != EMBED)


@pytest.fixture(scope="module")
def reference(made):
    out = {}
    for dtype in ("bfloat16", "float32"):
        with Model(made, EngineConfig.from_options(compute_dtype=dtype)) as llm:
            out[dtype] = llm.generate(PROMPT, max_new_tokens=16, ignore_eos=True).tokens
    return out


def open_on_device(made, device_fraction, dram_fraction, dtype="float32", device="cpu"):
    total = weight_bytes(made)
    options = dict(device_budget=int(total * device_fraction) + KV, max_context=64, kv_block_size=16,
                   compute_dtype=dtype, device=device)
    if dram_fraction is not None:
        options["dram_budget"] = int(total * dram_fraction)
    return Model(made, EngineConfig.from_options(**options))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("fractions", [(0.25, 0.3), (0.4, None), (0.15, 0.8), (2.0, None)])
def test_device_paging_gives_the_in_memory_tokens(made, reference, fractions, dtype):
    with open_on_device(made, *fractions, dtype=dtype) as llm:
        result = llm.generate(PROMPT, max_new_tokens=16, ignore_eos=True)
        llm.weights.store.check_invariants()
    assert result.tokens == reference[dtype]


def test_placement_fills_the_device_then_the_host_then_streams(made):
    with open_on_device(made, 0.25, 0.3) as llm:
        w = llm.weights
        placement = w.plan.placement
        tiers = {t: [n for n, p in placement.items() if p == t and n != EMBED] for t in ("device", "host", "storage")}
        assert all(tiers.values()), tiers  # this budget puts weights in every tier
        # norms, then attention layer by layer, on the device; FFN weights only once attention fits
        assert all(p == "device" for n, p in placement.items() if "norm" in n)
        assert all(placement[f"model.layers.0.self_attn.{t}_proj.weight"] == "device" for t in "qkvo")
        assert not any(".mlp." in n for n in tiers["device"] + tiers["host"])
        assert any("self_attn" in n for n in tiers["host"])
        # device-placed weights are working pages of the device pool; the others are pages
        report = llm.memory_report()["store"]
        assert report["device"]["resident"]["used_bytes"] >= sum(
            w.checkpoint.tensors[n].nbytes * 2 for n in tiers["device"])  # fp32 copies of bf16 weights
        llm.generate(PROMPT, max_new_tokens=2, ignore_eos=True)
        for name in tiers["host"]:
            assert w.store.location(name).held == "host"
        for name in tiers["storage"]:
            assert w.store.location(name).held is None


def test_each_step_reads_only_the_streamed_pages_and_copies_every_non_device_page(made):
    """The schedule: host-placed pages are read from storage once (at open) and held; each decode
    step reads the storage-placed pages again and copies every page that is not device-resident
    into the device window once."""
    with open_on_device(made, 0.25, 0.3) as llm:
        w = llm.weights
        ck = w.checkpoint
        placement = w.plan.placement
        host = sum(ck.tensors[n].nbytes for n, t in placement.items() if t == "host" and n in w._descs)
        streamed = sum(ck.tensors[n].nbytes for n, t in placement.items() if t == "storage" and n in w._descs)
        assert host > 0 and streamed > 0
        llm.generate(PROMPT, max_new_tokens=2, ignore_eos=True)
        before = w.stats()
        steps = 6
        llm.generate(PROMPT, max_new_tokens=steps, ignore_eos=True)  # prompt reused: only decode passes... and one
        after = w.stats()
        passes = steps  # the last prompt token's pass + steps - 1 decode steps
        row = ck.tensors[EMBED].nbytes // ck.config.vocab_size
        read = after["bytes_read_storage"] - before["bytes_read_storage"]
        copied = after["bytes_host_to_device"] - before["bytes_host_to_device"]
        # the window holds a few pages, so every non-device page is copied once per use: fewer
        # when a step boundary finds some still in the window, a page or two more per pass when a
        # slow copy makes a demand evict one prefetched for later (on a loaded machine)
        largest = max(ck.tensors[n].nbytes for n in w._descs)
        assert copied <= passes * (host + streamed + 2 * largest)
        assert copied >= passes * (host + streamed) - passes * w.plan.stream_window_bytes
        # storage: the streamed pages once per pass, give or take the read-ahead of a pass
        # (the host stage keeps at most a window of them), + embedding rows; never the held pages
        assert read <= (passes + 1) * streamed + 64 * row
        assert read >= (passes - 1) * streamed
        assert after["resident_bytes"]["host"] == host
        for name, tier in placement.items():
            if tier == "host":  # held: the host copy stays whatever the device window does
                where = w.store.location(name)
                assert where.held == "host" and "host" in where.copies, (name, where)


def slack(held_pages: int) -> int:
    """The stated overhead over --dram-budget: two idle 4 KiB blocks, 64-byte rounding of resident
    tensors, and per page held in host memory the alignment of its O_DIRECT span (< 8 KiB)."""
    return 2 * 4096 + 64 * 100 + 8192 * held_pages


def test_budgets_hold_and_too_small_ones_are_refused(made):
    total = weight_bytes(made)
    with open_on_device(made, 0.25, 0.3) as llm:
        report = llm.memory_report()["store"]
        device = sum(r["capacity_bytes"] for a, r in report["device"].items() if a != "total")
        assert device <= int(total * 0.25) + KV
        host = report["host"]
        held = sum(1 for n, t in llm.weights.plan.placement.items() if t == "host")
        assert host["total"]["tier_budget_bytes"] <= int(total * 0.3) + slack(held)
        assert sum(r["capacity_bytes"] for a, r in host.items() if a != "total") <= host["total"]["tier_budget_bytes"]
    with pytest.raises(BudgetError, match="KV cache"):
        Model(made, EngineConfig(device_budget=KV // 4, dram_budget=total, max_context=64, kv_block_size=16))
    with pytest.raises(BudgetError, match=r"at least \d+[MK]"):
        Model(made, EngineConfig(device_budget=total // 5 + KV, dram_budget=1000, max_context=64))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(device=st.floats(0.12, 1.2), dram=st.one_of(st.none(), st.floats(0.2, 1.0)), tokens=st.integers(1, 6))
def test_pools_never_exceed_their_budgets(made, device, dram, tokens):
    """Property: whatever the budgets, the store's pools stay within them after every pass, and the
    pages in use are never evicted (check_invariants)."""
    total = weight_bytes(made)
    try:
        llm = open_on_device(made, device, dram)
    except BudgetError:
        return  # refused with the minimum: also a kept promise
    with llm:
        llm.generate(PROMPT[:20], max_new_tokens=tokens, ignore_eos=True)
        w = llm.weights
        w.store.check_invariants()
        report = llm.memory_report()["store"]
        assert sum(r["capacity_bytes"] for a, r in report["device"].items() if a != "total") <= int(total * device) + KV
        if dram is not None:
            host = report["host"]
            held = sum(1 for n, t in w.plan.placement.items() if t == "host")
            assert host["total"]["tier_budget_bytes"] <= int(total * dram) + slack(held)
            # (kv.blocks: the stand-in's device KV, a heap arena accounted outside the host budget)
            assert sum(r["used_bytes"] for a, r in host.items() if a not in ("total", "kv.blocks")) <= \
                host["total"]["tier_budget_bytes"]
        stats = w.store.stats([DEFAULT_ARENA])
        assert stats.tiers["device"].bytes_written >= 0


def test_bad_device_combinations_are_refused():
    with pytest.raises(ConfigError, match="needs --device-budget"):
        EngineConfig(device="cuda", dram_budget=1 << 30)
    with pytest.raises(ConfigError, match="sparse FFN runs on the CPU"):
        EngineConfig.from_options(device="cuda", device_budget=1 << 30, sparse_ffn=True)
    with pytest.raises(ConfigError, match="positive size"):
        EngineConfig(device_budget=0)


def test_a_host_budget_below_the_plans_host_share_is_refused(made_moe):
    with pytest.raises(BudgetError, match="below what this plan keeps in host memory"):
        Model(made_moe, EngineConfig(device_budget=1 << 30, dram_budget=1024, max_context=64))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fractions", [(0.25, 0.3), (0.4, None)])
def test_cuda_device_paging_gives_the_cpu_tokens(made, reference, fractions):
    with open_on_device(made, *fractions, device="cuda") as llm:
        result = llm.generate(PROMPT, max_new_tokens=16, ignore_eos=True)
        assert llm.weights.device.type == "cuda"
        assert llm.weights.stats()["bytes_host_to_device"] > 0
    assert result.tokens == reference["float32"]


# ---------------------------------------------------------------- MoE experts with a device

@pytest.fixture(scope="module")
def made_moe(tmp_path_factory):
    cfg = dict(PRESETS["tiny-mixtral"], num_hidden_layers=4, vocab_size=256)
    return write_model(tmp_path_factory.mktemp("devmoe") / "m", MakeModelSpec(cfg, "bfloat16", seed=7))


@pytest.fixture(scope="module")
def moe_reference(made_moe):
    with Model(made_moe, EngineConfig.from_options(compute_dtype="float32")) as llm:
        return llm.generate(PROMPT, max_new_tokens=12, ignore_eos=True).tokens


def open_moe(made_moe, placement, costs=None, host_slots=2, device_slots=1):
    from flashtier.runtime.weights.experts import ExpertWeights
    from flashtier.runtime.weights.paged import budget_options

    def factory(checkpoint, config):
        return ExpertWeights(checkpoint, **budget_options(checkpoint, config, "expert caches"),
                             experts=config.experts, placement_costs=costs)

    config = EngineConfig.from_options(device_budget=weight_bytes(made_moe), max_context=64, kv_block_size=16,
                                       compute_dtype="float32", expert_placement=placement,
                                       expert_slots=host_slots, expert_device_slots=device_slots)
    return Model(made_moe, config, weights_factory=factory)


CPU_WINS = PlacementCosts(link_bytes_per_s=1.0, cpu_bytes_per_s=1e15, overhead_s=0.0)
COPY_WINS = PlacementCosts(link_bytes_per_s=1e15, cpu_bytes_per_s=1.0)


@pytest.mark.parametrize("placement,costs", [("auto", CPU_WINS), ("auto", COPY_WINS), ("auto", None),
                                             ("gpu", None), ("cpu", None)])
def test_moe_on_a_device_gives_the_in_memory_tokens_wherever_experts_run(made_moe, moe_reference, placement, costs):
    with open_moe(made_moe, placement, costs) as llm:
        result = llm.generate(PROMPT, max_new_tokens=12, ignore_eos=True)
        placed = llm.weights.stats()["expert_placement"]
        llm.weights.store.check_invariants()
    assert result.tokens == moe_reference
    ran = placed["device_hit"] + placed["copied"] + placed["cpu"]
    assert ran > 0
    if costs is CPU_WINS or placement == "cpu":
        assert placed["copied"] == 0 and placed["cpu"] > 0  # misses ran where their host copy is
    if costs is COPY_WINS or placement == "gpu":
        assert placed["cpu"] == 0 and placed["copied"] > 0
    if placement == "cpu":
        assert placed["device_hit"] == 0


def test_moe_device_cache_fits_the_device_budget_or_is_refused(made_moe):
    with open_moe(made_moe, "gpu", device_slots=0) as llm:  # as many as the budget leaves
        w = llm.weights
        slots = w._device_slots
        assert 1 <= slots <= llm.config.num_experts
        report = llm.memory_report()["store"]["device"]
        assert sum(r["capacity_bytes"] for a, r in report.items() if a != "total") <= weight_bytes(made_moe)
    with pytest.raises(BudgetError, match="experts per layer on the device"):
        open_moe(made_moe, "gpu", device_slots=8, host_slots=8).close()


def test_moe_with_non_expert_weights_on_the_host_copies_them_through_a_device_window(made_moe, moe_reference):
    """A device budget too small for every non-expert weight places some on the host; they pass
    through a device window at each use (the window is not the expert cache's)."""
    from flashtier.checkpoint.folder import open_checkpoint

    ck = open_checkpoint(made_moe)
    non_expert = sum(t.nbytes for n, t in ck.tensors.items() if n != EMBED and ".experts." not in n)
    config = EngineConfig.from_options(device_budget=non_expert // 3 + KV, max_context=64, kv_block_size=16,
                                       compute_dtype="float32", expert_placement="cpu")
    with Model(made_moe, config) as llm:
        plan = llm.weights.plan
        assert "host" in plan.placement.values() and plan.stream_window_bytes > 0
        result = llm.generate(PROMPT, max_new_tokens=12, ignore_eos=True)
        assert llm.weights.stats()["bytes_host_to_device"] > 0
        llm.weights.store.check_invariants()
    assert result.tokens == moe_reference


def test_placement_cost_model_prefers_the_faster_byte_stream():
    costs = PlacementCosts(link_bytes_per_s=25e9, cpu_bytes_per_s=50e9, overhead_s=50e-6)
    big = 64 << 20  # a 64 MiB expert: 2.7 ms over the link, 1.3 ms + 50 us on the CPU
    assert costs.choose("auto", big, rows=1) == "host"
    assert costs.choose("auto", big, rows=4) == "host"  # one pass of the CPU's 4-row tile
    assert costs.choose("auto", big, rows=512) == "device"  # a prefill chunk: the CPU would pass 128 times
    assert costs.choose("auto", 64 << 10, rows=1) == "device"  # small: the CPU's fixed cost dominates
    assert costs.choose("gpu", big, rows=1) == "device" and costs.choose("cpu", big, rows=512) == "host"
    with pytest.raises(ConfigError, match="placement"):
        EngineConfig.from_options(expert_placement="gpus")


# ---------------------------------------------------------------- long context with a device

RETRIEVAL = dict(attention="retrieval", window=32, sink_tokens=4, max_context=256, kv_block_size=16,
                 prefill_chunk=64, compute_dtype="float32")
LONG_PROMPT = [3 + i % 200 for i in range(200)]


def test_retrieval_attention_with_a_device_gives_the_host_tokens(made):
    """Sinks + the window on the device, older blocks and their index on the host (searched and
    attended there, merged on the device): the same tokens as the host-only cache."""
    with Model(made, EngineConfig.from_options(**RETRIEVAL)) as llm:
        want = llm.generate(LONG_PROMPT, max_new_tokens=8, ignore_eos=True)
    assert want.stats["kv_bytes_per_tier"]["host"] > 0  # blocks were demoted: the search ran
    with Model(made, EngineConfig.from_options(device_budget=weight_bytes(made) // 3 + KV, **RETRIEVAL)) as llm:
        got = llm.generate(LONG_PROMPT, max_new_tokens=8, ignore_eos=True)
        assert llm.weights.plan.kv_bytes["device"] < llm.weights.plan.kv_bytes["host"]  # planned as retrieval
    assert got.tokens == want.tokens


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_retrieval_attention_gives_the_cpu_tokens(made):
    with Model(made, EngineConfig.from_options(**RETRIEVAL)) as llm:
        want = llm.generate(LONG_PROMPT, max_new_tokens=8, ignore_eos=True).tokens
    for options in ({}, {"device_budget": weight_bytes(made) // 3 + KV}):
        with Model(made, EngineConfig.from_options(device="cuda", **options, **RETRIEVAL)) as llm:
            assert llm.cache.device_tier.device.type == "cuda"
            assert llm.generate(LONG_PROMPT, max_new_tokens=8, ignore_eos=True).tokens == want


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("placement", ["auto", "gpu", "cpu"])
def test_cuda_moe_placements_give_the_cpu_tokens(made_moe, moe_reference, placement):
    with open_moe(made_moe, placement) as llm:
        assert llm.weights.device.type == "cpu"  # (the stand-in; the GPU run below)
    config = EngineConfig.from_options(device="cuda", device_budget=weight_bytes(made_moe), max_context=64,
                                       kv_block_size=16, compute_dtype="float32", expert_placement=placement,
                                       expert_slots=2, expert_device_slots=1)
    with Model(made_moe, config) as llm:
        assert llm.generate(PROMPT, max_new_tokens=12, ignore_eos=True).tokens == moe_reference


# ---------------------------------------------------------------- quantized GGUF blocks with a device

@pytest.fixture(scope="module")
def gguf_q4(tmp_path_factory):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from gguf_models import make_gguf

    path, _ = make_gguf("llama", tmp_path_factory.mktemp("gguf"), "q4_k_m")
    return path


def test_quantized_blocks_travel_to_the_device_and_give_the_cpu_tokens(gguf_q4):
    """A Q4_K_M file with a device budget: pages are the quantized bytes on the device (the
    planner counts them so), and the tokens equal the CPU run's."""
    opts = dict(compute_dtype="float32", max_context=64, kv_block_size=16)
    with Model(gguf_q4, EngineConfig.from_options(**opts)) as llm:
        want = llm.generate(PROMPT, max_new_tokens=8, ignore_eos=True).tokens
        file_bytes = llm.checkpoint.total_bytes()
    with Model(gguf_q4, EngineConfig.from_options(device_budget=file_bytes // 2, **opts)) as llm:
        w = llm.weights
        got = llm.generate(PROMPT, max_new_tokens=8, ignore_eos=True).tokens
        copied = w.stats()["bytes_host_to_device"]
        moved = sum(w.checkpoint.tensors[n].nbytes for n in w._descs)
    assert got == want
    # what crosses to the device per pass is the pages' quantized bytes (8 passes: prompt + 7 steps),
    # not dequantized weights (~7x more for Q4_K)
    assert moved < file_bytes and moved <= copied <= 8 * moved * 1.1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_quantized_gguf_gives_the_cpu_tokens(gguf_q4):
    opts = dict(compute_dtype="float32", max_context=64, kv_block_size=16)
    with Model(gguf_q4, EngineConfig.from_options(**opts)) as llm:
        want = llm.generate(PROMPT, max_new_tokens=8, ignore_eos=True).tokens
        file_bytes = llm.checkpoint.total_bytes()
    for extra in ({}, {"device_budget": file_bytes // 2}):
        with Model(gguf_q4, EngineConfig.from_options(device="cuda", **extra, **opts)) as llm:
            assert llm.generate(PROMPT, max_new_tokens=8, ignore_eos=True).tokens == want
