"""Long-context KV cache: equals full attention when top-k covers the context, chunked prefill is
exact and bounded, demoted blocks survive storage bit for bit, corrupt spills are refused, budgets
hold, truncation re-indexes. (The log-sum-exp merge itself is tested in tests/retrieval/test_merge.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import flashtier.retrieval.blockwise as blockwise
from flashtier.errors import BudgetError, ConfigError, IntegrityError
from flashtier.retrieval.attention import RetrievalConfig
from flashtier.runtime.engine import Model, open_model
from flashtier.runtime.kv.layout import KVBlockLayout
from flashtier.runtime.kv.retrieval import RetrievalKVCache
from flashtier.runtime.kv.retrieval_config import RetrievalCacheConfig
from flashtier.runtime.kv.spill import KVSpillStore
from flashtier.checkpoint.make_model import PRESETS, MakeModelSpec, write_model
from flashtier.runtime.sampling import SamplingConfig

PROMPT = torch.randint(3, 250, (700,), generator=torch.Generator().manual_seed(0)).tolist()
EVERYTHING = 10**6  # top-k larger than any context here: retrieval must equal full attention


@pytest.fixture(autouse=True)
def single_torch_thread() -> Iterator[None]:
    """Small matmuls on a shared 2-core machine run faster (and steadier) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny-llama (2 layers, 4 query / 2 kv heads of 16 dims: GQA), float32."""
    return write_model(tmp_path_factory.mktemp("kvr") / "tiny", MakeModelSpec(PRESETS["tiny-llama"], "float32"))


def layout(layers: int = 2, heads: int = 2, dim: int = 8, block: int = 16, dtype: torch.dtype = torch.float32) -> KVBlockLayout:
    return KVBlockLayout(layers, heads, dim, block, dtype)


def cache_config(block: int = 16, chunk: int = 64, **retrieval: object) -> RetrievalCacheConfig:
    options = {"sink_tokens": 4, "window": 32, "top_k": EVERYTHING, "index": "flat", **retrieval}
    return RetrievalCacheConfig(RetrievalConfig(**options), block_size=block, prefill_chunk=chunk, prefill_key_block=2 * block)


def causal_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Exact causal GQA attention ``[H_q, T, D]`` of all positions from 0."""
    return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, enable_gqa=True)[0]


def greedy(model_dir, n: int = 12, **options: object) -> tuple[list[int], dict]:
    llm = open_model(model_dir, kv_block_size=16, prefill_chunk=128, **options)
    result = llm.generate(PROMPT, max_new_tokens=n, sampling=SamplingConfig(temperature=0.0), ignore_eos=True)
    return result.tokens, result.stats


# ---------------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("index", ["flat", "cluster", "ivf"])
def test_top_k_of_the_whole_context_gives_the_tokens_of_full_attention(tiny, index):
    full, _ = greedy(tiny)
    tokens, stats = greedy(tiny, attention="retrieval", top_k_keys=EVERYTHING, window=64, kv_index=index,
                           check_attention=1)
    assert tokens == full
    assert stats["attention"] == "retrieval" and stats["attention_decode_steps"] == 11
    assert stats["attention_mass_recall"] == pytest.approx(1.0) and stats["attention_mass_covered"] == pytest.approx(1.0)
    assert stats["kv_bytes_per_tier"]["host"] > 0 and stats["index_build_s"] > 0


def decode_logits_pairs(tiny, config: RetrievalCacheConfig, steps: int) -> tuple[RetrievalKVCache, list]:
    """Prefill PROMPT into a full cache and a retrieval cache with ``config`` through the same
    forward, then decode ``steps`` tokens in both: the retrieval cache and the (retrieval, full)
    logits of each step."""
    model = Model(tiny)
    c = model.config
    full = model.transformer.new_cache(16)
    ret = RetrievalKVCache(KVBlockLayout(c.num_layers, c.num_kv_heads, c.head_dim, 16, model.transformer.dtype), config)
    ids = torch.tensor(PROMPT)
    pairs = []
    with torch.inference_mode():
        for cache in (full, ret):
            cache.reserve(800)
            model.transformer.forward(ids, cache, 0)
        for step in range(steps):
            tok = torch.tensor([PROMPT[step]])
            a = model.transformer.forward(tok, full, 700 + step)
            b = model.transformer.forward(tok, ret, 700 + step)
            pairs.append((b, a))
    return ret, pairs


def test_retrieval_logits_match_full_attention_to_fp_tolerance(tiny):
    """Same forward, two caches: decode logits agree to rounding when every key is retrieved."""
    ret, pairs = decode_logits_pairs(tiny, cache_config(window=48, index="cluster"), steps=6)
    for b, a in pairs:
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert ret.counters.keys_retrieved > 0


@pytest.mark.parametrize("bits, tolerance", [(8, 1e-3), (4, 2e-2)])
def test_quantised_host_kv_logits_stay_close_to_full_attention(tiny, bits, tolerance):
    """Top-k of the whole context over KIVI-quantised host KV: decode logits within ``tolerance``
    of full attention (measured max |diff| on this model, logits up to ~0.4: 1.6e-4 at 8 bits,
    4.8e-3 at 4 bits, 2.4e-2 at 2 bits; the raw codec 9e-8)."""
    ret, pairs = decode_logits_pairs(tiny, replace(cache_config(window=48), kv_quant_bits=bits), steps=4)
    for b, a in pairs:
        torch.testing.assert_close(b, a, rtol=0, atol=tolerance)
    assert ret.stats()["kv_host_codec"] == f"kivi{bits}-g16"  # default group capped by the head dim (16)
    ret.close()


def test_chunked_prefill_equals_one_pass_and_never_scores_the_whole_context(monkeypatch):
    g = torch.Generator().manual_seed(1)
    h_q, h_kv, t, d = 4, 2, 300, 8
    q, k, v = torch.randn(h_q, t, d, generator=g), torch.randn(h_kv, t, d, generator=g), torch.randn(h_kv, t, d, generator=g)
    widest = []
    real = blockwise.partial_attention
    monkeypatch.setattr(blockwise, "partial_attention", lambda q_, k_, *a, **kw: widest.append(k_.shape[-2]) or real(q_, k_, *a, **kw))
    cache = RetrievalKVCache(layout(layers=1), cache_config(chunk=40))
    out = cache.attend(0, q, k, v, 0)  # one pass of 300 tokens: cut into chunks of 40 queries inside
    torch.testing.assert_close(out, causal_reference(q, k, v), rtol=1e-5, atol=1e-5)
    # Chunk-by-chunk from the caller's side gives the same result.
    step = RetrievalKVCache(layout(layers=1), cache_config(chunk=40))
    parts = [step.attend(0, q[:, s : s + 70], k[:, s : s + 70], v[:, s : s + 70], s) for s in range(0, t, 70)]
    torch.testing.assert_close(torch.cat(parts, dim=1), out, rtol=1e-5, atol=1e-5)
    # Scores were never wider than one key batch (host) or the device tier (sinks + ring).
    assert max(widest) <= max(cache.config.prefill_key_block, 4 + cache.config.ring_tokens) < t


# ---------------------------------------------------------------------------------------------------- tiers
def fill(cache: RetrievalKVCache, length: int, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Write random K/V ``[L, H, length, D]`` into every layer; return them."""
    lay = cache.layout
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(lay.num_layers, lay.num_kv_heads, length, lay.head_dim, generator=g).to(lay.dtype)
    v = torch.randn(lay.num_layers, lay.num_kv_heads, length, lay.head_dim, generator=g).to(lay.dtype)
    for layer in range(lay.num_layers):
        cache.write(layer, k[layer], v[layer], 0)
    return k, v


def test_blocks_demoted_to_storage_read_back_bit_identical(tmp_path):
    lay = layout(dtype=torch.bfloat16)
    budget = 6 * lay.block_bytes + 96 * 1024  # a few blocks beside the flat index (~90 KiB planned)
    cache = RetrievalKVCache(lay, RetrievalCacheConfig(cache_config().retrieval, block_size=16, prefill_chunk=64,
                                                       prefill_key_block=32, host_budget=budget, spill_dir=str(tmp_path)))
    cache.reserve(400)
    k, v = fill(cache, 400)
    assert cache.spill.counters.blocks_written > 0 and len(cache.spill) > 0
    for layer in range(lay.num_layers):
        n = cache.host.num_blocks(layer)
        blocks = cache.host.read_blocks(layer, 0, n)  # [n, 2, H, B, D], spilled ones through storage
        kb = blocks[:, 0].permute(1, 0, 2, 3).reshape(lay.num_kv_heads, -1, lay.head_dim)
        vb = blocks[:, 1].permute(1, 0, 2, 3).reshape(lay.num_kv_heads, -1, lay.head_dim)
        assert torch.equal(kb.view(torch.int16), k[layer, :, : n * 16].view(torch.int16))
        assert torch.equal(vb.view(torch.int16), v[layer, :, : n * 16].view(torch.int16))
        # Retrieval's gather goes through the same path (bringing spilled blocks back when it can).
        pos = torch.arange(4, n * 16, 7)
        gk, gv = cache._offloaded[layer].heads[1].store.gather(pos)
        assert torch.equal(gk.view(torch.int16), k[layer, 1, pos].view(torch.int16))
        assert torch.equal(gv.view(torch.int16), v[layer, 1, pos].view(torch.int16))
    assert cache.spill.counters.blocks_read > 0
    cache.close()
    assert not any(tmp_path.iterdir())  # the spill folder is removed


def test_corrupted_spill_block_is_detected_and_not_used(tmp_path):
    lay = layout()
    store = KVSpillStore(lay, str(tmp_path))
    block = torch.randn(lay.block_shape)
    store.write((1, 5), block)
    assert torch.equal(store.read([(1, 5)])[0], block)
    path = store.path_of((1, 5))
    data = bytearray(open(path, "rb").read())
    data[100] ^= 0x01  # one flipped bit
    open(path, "wb").write(bytes(data))
    with pytest.raises(IntegrityError, match=r"layer 1, block 5.*checksum|checksum.*layer 1, block 5"):
        store.read([(1, 5)])
    store.close()


def test_decode_over_a_corrupted_spill_raises_instead_of_attending(tmp_path):
    lay = layout(layers=1)
    cfg = RetrievalCacheConfig(cache_config().retrieval, block_size=16, prefill_chunk=64, prefill_key_block=32,
                               host_budget=4 * lay.block_bytes + 40 * 1024, spill_dir=str(tmp_path))
    cache = RetrievalKVCache(lay, cfg)
    cache.reserve(300)
    fill(cache, 300)
    victim = cache.spill.keys()[0]
    path = cache.spill.path_of(victim)
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 0xFF
    open(path, "wb").write(bytes(data))
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(4, 1, 8, generator=g), torch.randn(2, 1, 8, generator=g), torch.randn(2, 1, 8, generator=g)
    with pytest.raises(IntegrityError, match=f"block {victim[1]}"):
        cache.attend(0, q, k, v, 300)  # top-k covers everything: the corrupt block is needed
    cache.close()


def test_budgets_are_honoured_and_the_device_tier_does_not_grow(tmp_path):
    lay = layout(layers=2, heads=2, dim=8)
    budget = 600 * 1024  # the cluster index of 1200 tokens is planned at ~480 KiB
    cfg = RetrievalCacheConfig(cache_config(index="cluster", top_k=8).retrieval, block_size=16, prefill_chunk=64,
                               prefill_key_block=32, host_budget=budget, spill_dir=str(tmp_path))
    cache = RetrievalKVCache(lay, cfg)
    cache.reserve(1200)
    device = cache.kv_bytes_per_tier()["device"]
    g = torch.Generator().manual_seed(4)
    for start in range(0, 1200, 100):
        for layer in range(2):
            cache.write(layer, torch.randn(2, 100, 8, generator=g), torch.randn(2, 100, 8, generator=g), start)
        tiers = cache.kv_bytes_per_tier()
        assert tiers["host"] <= budget
        assert tiers["device"] == device
    assert tiers["storage"] > 0
    with pytest.raises(BudgetError, match="kv-dram-budget"):
        RetrievalKVCache(lay, RetrievalCacheConfig(cfg.retrieval, block_size=16, host_budget=64)).reserve(1200)
    with pytest.raises(BudgetError, match="device KV tier"):
        RetrievalKVCache(lay, RetrievalCacheConfig(cfg.retrieval, block_size=16, device_budget=1024))
    cache.close()


def test_truncating_into_the_demoted_part_equals_a_fresh_prefill():
    g = torch.Generator().manual_seed(5)
    h_q, h_kv, t, d = 4, 2, 400, 8
    q, k, v = torch.randn(h_q, t, d, generator=g), torch.randn(h_kv, t, d, generator=g), torch.randn(h_kv, t, d, generator=g)
    cache = RetrievalKVCache(layout(layers=1), cache_config(index="cluster"))
    cache.attend(0, q, k, v, 0)
    cache.truncate(150)  # positions 150.. go; 0..149 were mostly demoted and indexed
    assert cache.length == 150
    again = cache.attend(0, q[:, 150:], k[:, 150:], v[:, 150:], 150)
    torch.testing.assert_close(again, causal_reference(q, k, v)[:, 150:], rtol=1e-5, atol=1e-5)
    positions = cache._offloaded[0].heads[0].index.positions()
    assert torch.equal(positions, torch.arange(4, positions.numel() + 4))  # re-indexed, no duplicates


# ---------------------------------------------------------------------------------------------------- config / CLI
def test_presets_and_explicit_options():
    balanced = RetrievalCacheConfig.from_engine(64, 512, {}).retrieval
    assert balanced.index == "cluster" and balanced.estimate_rest and balanced.group_search.value == "rows"
    assert balanced.index_options["cluster_size"] == 4 and balanced.scan_budget_fraction == 0.045
    assert balanced.index_options["super_size"] == 256 and balanced.index_options["scan_max_keys"] == 1024
    capped = RetrievalCacheConfig.from_engine(64, 512, {"scan_max_keys": 300}).retrieval
    assert capped.index_options["scan_max_keys"] == 300 and capped.index_options["super_size"] == 256
    fast = RetrievalCacheConfig.from_engine(64, 512, {"retrieval_preset": "fast", "scan_budget": 0.02}).retrieval
    assert fast.index_options["cluster_size"] == 16 and not fast.estimate_rest and fast.scan_budget_fraction == 0.02
    ivf = RetrievalCacheConfig.from_engine(64, 512, {"kv_index": "ivf"}).retrieval
    assert dict(ivf.index_options) == {} and not ivf.estimate_rest  # cluster-only parts of the preset dropped
    with pytest.raises(ConfigError, match="estimate_rest"):
        RetrievalCacheConfig.from_engine(64, 512, {"kv_index": "ivf", "estimate_rest": True})
    with pytest.raises(ConfigError, match="choose one of"):
        RetrievalCacheConfig.from_engine(64, 512, {"retrieval_preset": "turbo"})


def test_bad_options_are_refused_with_what_to_do():
    with pytest.raises(ConfigError, match="choose one of"):
        RetrievalCacheConfig.from_engine(64, 512, {"kv_index": "hnsw"})
    with pytest.raises(ConfigError, match="top_k"):
        RetrievalCacheConfig.from_engine(64, 512, {"top_k_keys": 0})
    with pytest.raises(ConfigError, match="scan_budget_fraction"):
        RetrievalCacheConfig.from_engine(64, 512, {"scan_budget": 2})
    with pytest.raises(ConfigError, match="scan_max_keys must be a positive"):
        RetrievalCacheConfig.from_engine(64, 512, {"scan_max_keys": 0})
    with pytest.raises(ConfigError, match="whole number of keys"):
        RetrievalCacheConfig.from_engine(64, 512, {"scan_max_keys": "many"})
    with pytest.raises(ConfigError, match="--kv-index cluster"):
        RetrievalCacheConfig.from_engine(64, 512, {"kv_index": "ivf", "scan_max_keys": 512})


def test_cli_flags_reach_the_cache_and_its_stats(tiny):
    ids = ",".join(map(str, PROMPT[:300]))
    cmd = [sys.executable, "-m", "flashtier", "generate", str(tiny), "--prompt-ids", ids, "--max-new-tokens", "4",
           "--greedy", "--json", "--ignore-eos", "--attention", "retrieval", "--window", "64", "--top-k-keys", "16",
           "--kv-index", "flat", "--sink-tokens", "2", "--check-attention", "--kv-dram-budget", "8M"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)["stats"]
    assert stats["attention_window"] == 64 and stats["attention_top_k_keys"] == 16 and stats["kv_index"] == "flat"
    assert stats["attention_sink_tokens"] == 2 and stats["attention_keys_scanned_fraction"] == 1.0
    assert 0 < stats["attention_mass_covered"] <= stats["attention_mass_recall"] + 1e-9 <= 1.0 + 1e-9
    for tier in ("device", "host", "storage"):
        assert tier in stats["kv_bytes_per_tier"]
    r = subprocess.run(cmd[:9] + ["--window", "64"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "only apply with --attention retrieval" in r.stderr


def test_cli_kv_quant_flags_reach_the_host_tier_and_bad_ones_are_refused(tiny):
    ids = ",".join(map(str, PROMPT[:300]))
    cmd = [sys.executable, "-m", "flashtier", "generate", str(tiny), "--prompt-ids", ids, "--max-new-tokens", "2",
           "--greedy", "--json", "--ignore-eos", "--attention", "retrieval", "--window", "64", "--kv-index", "flat",
           "--kv-quant-bits", "4", "--kv-quant-group", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)["stats"]
    assert stats["kv_host_codec"] == "kivi4-g8"
    assert 0 < stats["kv_host_block_bytes"] <= stats["kv_bytes_per_tier"]["host"]
    r = subprocess.run(cmd[:-4] + ["--kv-quant-bits", "3"], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode != 0 and "--kv-quant-bits" in r.stderr
    r = subprocess.run(cmd[:-1] + ["12"], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode != 0 and "--kv-quant-group" in r.stderr and "must divide the KV block size" in r.stderr


# ---------------------------------------------------------------------------------------------------- one store
def test_paged_weights_and_host_kv_blocks_share_one_store(tmp_path):
    """A budgeted MoE model with retrieval attention: the streamed weights, each layer's expert
    cache and the demoted KV blocks are arenas of one tiered store (one page table, one memory
    report); tokens equal the model's own with a private KV store; closing the model forgets the KV
    arena and its spill folder."""
    path = write_model(tmp_path / "moe", MakeModelSpec(dict(PRESETS["tiny-mixtral"], num_hidden_layers=2), "float32"))
    prompt = [5 + i % 200 for i in range(330)]
    options = dict(attention="retrieval", top_k_keys=EVERYTHING, window=64, kv_index="flat", sink_tokens=4,
                   kv_block_size=16, prefill_chunk=128, kv_dram_budget="160K", kv_spill_dir=str(tmp_path / "spill"))
    alone = RetrievalKVCache  # the cache's own store when the weights have none (in memory)
    with open_model(path, **options) as llm:
        assert llm.weights.__class__.__name__ == "InMemoryWeights" or not hasattr(llm.weights, "store")
        assert isinstance(llm.cache, alone) and llm.cache.host._own_store
        reference = llm.generate(prompt, max_new_tokens=6, sampling=SamplingConfig(), ignore_eos=True).tokens
    with open_model(path, dram_budget="4M", expert_slots=2, **options) as llm:
        store = llm.weights.store
        assert llm.cache.host.store is store and not llm.cache.host._own_store
        result = llm.generate(prompt, max_new_tokens=6, sampling=SamplingConfig(), ignore_eos=True)
        assert result.tokens == reference
        assert result.stats["kv_blocks_spilled"] > 0  # the KV arena's budget made blocks go to storage
        report = llm.memory_report()["store"]["host"]
        arenas = set(report) - {"total"}
        assert {"default", "resident", llm.cache.host.arena} <= arenas
        assert report["resident"]["used_bytes"] - result.stats["resident_bytes"]["host"] < 64 * len(llm.weights._resident)
        assert any(a.startswith("experts.") for a in arenas)
        kv = report[llm.cache.host.arena]
        assert kv["used_bytes"] == llm.cache.host.host_block_bytes() <= 160 * 1024
        assert report["total"]["used_bytes"] == sum(r["used_bytes"] for a, r in report.items() if a != "total")
        store.check_invariants()
        arena = llm.cache.host.arena
    assert arena not in store.arenas
    assert not any((tmp_path / "spill").iterdir())


def test_decode_steps_search_with_the_models_kernel_threads(monkeypatch):
    """Decode steps run torch with one thread around the one-row kernels; the native search and
    attention of a retrieval cache use the model's kernel threads (each kv head on one thread, so
    the results are the same), not torch's count of the moment."""
    import flashtier.retrieval.attention as attention
    from pathlib import Path

    seen = []
    search = attention.search_heads

    def spy(*args, **kwargs):
        seen.append((torch.get_num_threads(), kwargs.get("threads")))
        return search(*args, **kwargs)

    monkeypatch.setattr(attention, "search_heads", spy)
    model = Path(__file__).parents[3] / "models" / "tiny-moe-16k"
    with open_model(model, attention="retrieval", window=64, kv_block_size=16, prefill_chunk=32, threads=2) as llm:
        llm.generate(list(range(1, 200)), max_new_tokens=4, ignore_eos=True)
    assert seen and all(threads == 2 for _, threads in seen)
    assert any(now == 1 for now, _ in seen)  # (the decode steps' torch count, which the search no longer follows)


def test_a_cache_filled_under_inference_mode_is_truncated_and_closed_outside_it(tmp_path):
    """The forward runs under ``torch.inference_mode``, where the host pool's block tables grow; a
    truncate (the next turn of a conversation) or a close (a batched sequence leaving, the end of a
    benchmark) happens outside it and updates those tables: they must not be inference tensors
    (this raised "Inplace update to inference tensor outside InferenceMode")."""
    from pathlib import Path

    model = Path(__file__).parents[3] / "models" / "tiny-moe-16k"
    with open_model(model, attention="retrieval", window=64, kv_block_size=16, prefill_chunk=32,
                    kv_spill_dir=str(tmp_path)) as llm:
        ids = [(7 * j) % 1000 + 1 for j in range(4400)]  # > 256 blocks of 16: the tables grow in the forward
        first = llm.generate(ids, max_new_tokens=4, ignore_eos=True).tokens
        assert not torch.is_inference_mode_enabled()
        llm.cache.truncate(200)  # forgets demoted blocks: the pool's tables change here
        again = llm.generate(ids, max_new_tokens=4, ignore_eos=True)  # reuses the 200 kept positions
        assert again.tokens == first
        llm.cache.close()
