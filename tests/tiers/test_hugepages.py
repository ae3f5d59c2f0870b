"""Transparent huge pages for large host buffers: which mappings carry the advice, that small ones
and switched-off ones do not, and that the engine's ``--huge-pages off`` reaches every pool."""

from __future__ import annotations

import gc
import json
import mmap
import subprocess
import sys

import pytest
import torch

from flashtier.retrieval.buffer import GrowableRows
from flashtier.runtime.engine import EngineConfig, Model
from flashtier.checkpoint.make_model import PRESETS, MakeModelSpec, write_model
from flashtier.tiers import StoreConfig, TieredStore, hugepages
from flashtier.tiers.host import HostPool
from flashtier.tiers.slots import SlotPool


def _thp_available() -> bool:
    probe = mmap.mmap(-1, hugepages.HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        return hugepages.advise(probe)
    finally:
        probe.close()


pytestmark = pytest.mark.skipif(not _thp_available(), reason="no transparent huge pages on this kernel")

MB = 1 << 20


def advised_growth(make):
    """(object made, bytes of advised mappings it added) with the object still alive."""
    gc.collect()
    before = hugepages.advised_bytes()
    obj = make()
    return obj, hugepages.advised_bytes() - before


def test_empty_large_is_advised_zeroed_and_freed():
    t, grown = advised_growth(lambda: hugepages.empty((3, 4 * MB), torch.float32, zeroed=True))
    assert t.shape == (3, 4 * MB) and t.dtype == torch.float32
    assert grown >= t.numel() * 4
    assert int(t.count_nonzero()) == 0
    t[2, -1] = 5.0  # writable
    assert float(t.sum()) == 5.0
    del t
    gc.collect()
    _, after = advised_growth(lambda: None)
    assert after <= 0


@pytest.mark.parametrize("shape, huge", [((hugepages.MIN_BYTES // 4 - 1,), True), ((64 * MB,), False)])
def test_empty_small_or_off_is_not_advised(shape, huge):
    t, grown = advised_growth(lambda: hugepages.empty(shape, torch.float32, huge=huge))
    assert t.shape == shape
    assert grown == 0


@pytest.mark.parametrize("huge", [True, False])
def test_host_slab_follows_the_switch(huge):
    pool, grown = advised_growth(lambda: HostPool(16 * MB, pinned=False, huge_pages=huge))
    assert pool.capacity == 16 * MB
    assert (grown >= 16 * MB) if huge else grown == 0


@pytest.mark.parametrize("huge", [True, False])
def test_slot_table_follows_the_switch(huge):
    pool, grown = advised_growth(lambda: SlotPool("kv", 64 * 1024, 256, huge_pages=huge))  # 16 MiB table
    assert (grown >= 16 * MB) if huge else grown == 0


def test_store_passes_its_setting_to_every_arena_pool():
    for huge in (True, False):
        store, grown = advised_growth(lambda: TieredStore(StoreConfig(host_budget=8 * MB, huge_pages=huge), None))
        assert (grown >= 8 * MB) if huge else grown == 0
        _, slots = advised_growth(lambda: store.add_slot_arena("kv", 32 * 1024, 256, None, extends_tier=True))
        assert (slots >= 8 * MB) if huge else slots == 0
        store.close()


def test_growable_rows_advise_only_large_buffers_and_keep_their_rows():
    small, grown = advised_growth(lambda: GrowableRows((128,), torch.float32))
    assert grown == 0
    rows = torch.arange(300_000 * 16, dtype=torch.float32).view(-1, 16)
    buf = GrowableRows((16,), torch.float32)
    _, grown = advised_growth(lambda: buf.append(rows))  # 19 MB: its own advised mapping
    assert grown >= hugepages.GROWABLE_MIN_BYTES
    assert torch.equal(buf.view(), rows)
    off = GrowableRows((16,), torch.float32, huge_pages=False)
    _, grown = advised_growth(lambda: off.append(rows))
    assert grown == 0 and torch.equal(off.view(), rows)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    cfg = dict(PRESETS["tiny-llama"], num_hidden_layers=2, vocab_size=512)
    return write_model(tmp_path_factory.mktemp("hp") / "m", MakeModelSpec(cfg, "bfloat16", seed=5))


def test_engine_switch_reaches_the_store_and_the_retrieval_indexes(made):
    prompt = list(range(3, 60))
    tokens = {}
    for flag in ("on", "off"):
        config = EngineConfig.from_options(dram_budget="64M", max_context=128, kv_block_size=16,
                                           attention="retrieval", window=16, sink_tokens=4, huge_pages=flag == "on")
        with Model(made, config) as llm:
            tokens[flag] = llm.generate(prompt, max_new_tokens=8, ignore_eos=True).tokens
            assert llm.cache.host.store.config.huge_pages is (flag == "on")  # the weights' store
            assert llm.cache.config.retrieval.index_config().huge_pages is (flag == "on")
    assert tokens["on"] == tokens["off"]


def test_bench_huge_pages_runs_pairs_and_reports_both_sides(made, tmp_path):
    out = tmp_path / "hp.json"
    r = subprocess.run([sys.executable, "-m", "flashtier.benchmarks.bench_huge_pages", "--model", str(made),
                        "--pairs", "2", "--tokens", "4", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads(out.read_text())
    assert len(result["pairs"]) == 2
    for row in result["pairs"]:
        assert row["on"] > 0 and row["off"] > 0 and row["ratio"] == round(row["on"] / row["off"], 3)
    assert 0 <= result["pairs_on_faster"] <= 2
