"""KIVI-quantised host KV: codec error bounds, row decoding, budgets buying more blocks, quantised
spill records bit-identical and checked, end-to-end closeness, and clear errors for bad options."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flashtier.errors import ConfigError, IntegrityError
from flashtier.retrieval.attention import RetrievalConfig
from flashtier.runtime.engine import open_model
from flashtier.runtime.kv.codec import KiviCodec, RawCodec, default_group, kv_codec
from flashtier.runtime.kv.host import HostKVPool
from flashtier.runtime.kv.layout import KVBlockLayout
from flashtier.runtime.kv.retrieval import RetrievalKVCache
from flashtier.runtime.kv.retrieval_config import RetrievalCacheConfig
from flashtier.runtime.kv.spill import KVSpillStore
from flashtier.checkpoint.make_model import PRESETS, MakeModelSpec, write_model
from flashtier.runtime.sampling import SamplingConfig

EVERYTHING = 10**6


def _blocks(lay: KVBlockLayout, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *lay.block_shape, generator=g)
    x[:, 0, :, :, 1] *= 8  # a key outlier channel, as KIVI expects
    return x.to(lay.dtype)


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), heads=st.integers(1, 3), dim_groups=st.integers(1, 3),
       block=st.sampled_from([8, 16, 32]), group=st.sampled_from([4, 8]), seed=st.integers(0, 1000))
def test_every_element_is_within_half_a_step(bits, heads, dim_groups, block, group, seed):
    lay = KVBlockLayout(1, heads, group * dim_groups, block, torch.float32)
    codec = KiviCodec(lay, bits, group)
    x = _blocks(lay, 2, seed)
    out = codec.decode(codec.encode(x))
    k, v = x[:, 0], x[:, 1]  # [n, H, B, D]
    kg = k.reshape(2, heads, block // group, group, -1)
    kstep = ((kg.amax(3) - kg.amin(3)) / (2**bits - 1)).repeat_interleave(group, dim=2)  # [n, H, B, D]
    vg = v.reshape(2, heads, block, -1, group)
    vstep = ((vg.amax(4) - vg.amin(4)) / (2**bits - 1)).repeat_interleave(group, dim=3)
    assert ((out[:, 0] - k).abs() <= kstep / 2 + 1e-5).all()
    assert ((out[:, 1] - v).abs() <= vstep / 2 + 1e-5).all()


@pytest.mark.parametrize("bits", [None, 2, 4, 8])
def test_rows_decode_alone_to_the_rows_of_a_full_decode(bits):
    lay = KVBlockLayout(1, 4, 64, 64, torch.bfloat16)
    codec = kv_codec(lay, bits, 32)
    records = codec.encode(_blocks(lay, 5))
    full = codec.decode(records)  # [n, 2, H, B, D]
    slots = torch.tensor([[0, 3, 4, 4], [1, 1, 2, 0]])
    heads = torch.tensor([[2], [0]])
    offsets = torch.tensor([[0, 33, 63, 31], [5, 6, 40, 32]])
    k, v = codec.rows(records, slots, heads, offsets)
    assert torch.equal(k, full[slots, 0, heads, offsets]) and torch.equal(v, full[slots, 1, heads, offsets])


def test_record_sizes_and_the_raw_codec_is_exact():
    lay = KVBlockLayout(1, 8, 128, 64, torch.bfloat16)  # an 8B-class head layout
    x = _blocks(lay, 3)
    raw = RawCodec(lay)
    assert raw.record_bytes == lay.block_bytes and torch.equal(raw.decode(raw.encode(x)), x)
    ratios = {bits: lay.block_bytes / kv_codec(lay, bits, 32).record_bytes for bits in (2, 4, 8)}
    assert ratios[4] == pytest.approx(8 / 3) and ratios[2] == pytest.approx(4.0) and ratios[8] == pytest.approx(1.6)


def test_a_quantised_pool_holds_more_blocks_in_the_same_budget(tmp_path):
    lay = KVBlockLayout(1, 2, 32, 32, torch.bfloat16)
    budget = 10 * lay.block_bytes
    held = {}
    for bits in (None, 4):
        codec = kv_codec(lay, bits, 16)
        spill = KVSpillStore(lay, str(tmp_path / str(bits)), record_bytes=codec.record_bytes)
        pool = HostKVPool(lay, budget, spill, codec)
        pool.put(0, 0, _blocks(lay, 40))
        pool.enforce(0)
        assert pool.host_block_bytes() <= budget
        held[bits] = (pool.blocks_on_host(), budget // codec.record_bytes)
        back = pool.read_blocks(0, 0, 40)  # host and spilled blocks alike
        assert back.shape == (40, *lay.block_shape)
        expected = codec.decode(codec.encode(_blocks(lay, 40)))
        assert torch.equal(back, expected)  # spilled records come back bit-identical
        spill.close()
    assert held[None] == (10, 10)
    assert held[4][0] == held[4][1] >= 2 * 10  # the budget buys record_bytes-sized slots


def test_a_corrupted_quantised_spill_record_is_detected(tmp_path):
    lay = KVBlockLayout(1, 2, 32, 32, torch.bfloat16)
    codec = kv_codec(lay, 2, 16)
    store = KVSpillStore(lay, str(tmp_path), record_bytes=codec.record_bytes)
    record = codec.encode(_blocks(lay, 1))[0]
    store.write((0, 3), record)
    assert torch.equal(store.read([(0, 3)])[0], record)
    path = store.path_of((0, 3))
    data = bytearray(open(path, "rb").read())
    data[7] ^= 0x10
    open(path, "wb").write(bytes(data))
    with pytest.raises(IntegrityError, match="layer 0, block 3"):
        store.read([(0, 3)])
    store.close()


def test_bad_quantisation_options_are_clear_errors(tmp_path):
    lay = KVBlockLayout(1, 2, 32, 32, torch.bfloat16)
    with pytest.raises(ConfigError, match="kv_quant_bits must be one of 2, 4, 8"):
        KiviCodec(lay, 3, 16)
    with pytest.raises(ConfigError, match=r"kv_quant_bits \(--kv-quant-bits\) must be one of 2, 4, 8"):
        RetrievalCacheConfig.from_engine(16, 64, {"kv_quant_bits": 3})  # before the group is looked at
    with pytest.raises(ConfigError, match="head dim .32 channels.*try 32"):
        KiviCodec(lay, 4, 64)
    with pytest.raises(ConfigError, match="must divide the KV block size"):
        RetrievalCacheConfig(RetrievalConfig(), block_size=16, kv_quant_bits=4, kv_quant_group=12)
    with pytest.raises(ConfigError, match="whole number"):
        RetrievalCacheConfig.from_engine(16, 64, {"kv_quant_bits": "four"})


def test_the_default_group_divides_block_size_and_head_dim():
    assert default_group(KVBlockLayout(1, 8, 128, 64, torch.bfloat16)) == 32  # KIVI's 32 when it fits
    assert kv_codec(KVBlockLayout(1, 2, 16, 64, torch.bfloat16), 4).name == "kivi4-g16"  # tiny heads
    assert kv_codec(KVBlockLayout(1, 2, 80, 16, torch.bfloat16), 2).name == "kivi2-g16"
    assert RetrievalCacheConfig.from_engine(16, 64, {"kv_quant_bits": 4}).kv_quant_group is None


def test_cache_with_8_bit_host_kv_is_close_to_full_attention(tmp_path):
    lay = KVBlockLayout(1, 2, 16, 16, torch.float32)
    retrieval = RetrievalConfig(sink_tokens=4, window=32, top_k=EVERYTHING, index="flat")
    exact = RetrievalKVCache(lay, RetrievalCacheConfig(retrieval, block_size=16, prefill_chunk=64, prefill_key_block=32))
    quant = RetrievalKVCache(lay, RetrievalCacheConfig(retrieval, block_size=16, prefill_chunk=64, prefill_key_block=32,
                                                       kv_quant_bits=8, kv_quant_group=16))
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(2, 300, 16, generator=g), torch.randn(2, 300, 16, generator=g)
    for cache in (exact, quant):
        cache.write(0, k, v, 0)
    q, k1, v1 = torch.randn(4, 1, 16, generator=g), torch.randn(2, 1, 16, generator=g), torch.randn(2, 1, 16, generator=g)
    a, b = exact.attend(0, q, k1, v1, 300), quant.attend(0, q, k1, v1, 300)
    assert (a - b).abs().max() < 0.02  # 8-bit codes: steps of ~1/40 of a unit-normal range
    assert quant.stats()["kv_host_codec"] == "kivi8-g16"
    assert quant.kv_bytes_per_tier()["host"] < exact.kv_bytes_per_tier()["host"]
    exact.close()
    quant.close()


def test_generation_with_quantised_host_kv_runs_and_reports_its_codec(tmp_path):
    model = write_model(tmp_path / "m", MakeModelSpec(dict(PRESETS["tiny-llama"], num_hidden_layers=2), "float32"))
    prompt = torch.randint(3, 250, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    outs = {}
    for bits in (None, 8):
        llm = open_model(model, kv_block_size=16, prefill_chunk=128, attention="retrieval", window=64,
                         top_k_keys=EVERYTHING, kv_index="flat", kv_quant_bits=bits, kv_quant_group=16)
        r = llm.generate(prompt, max_new_tokens=8, sampling=SamplingConfig(temperature=0.0), ignore_eos=True)
        outs[bits] = r
    assert outs[8].stats["kv_host_codec"] == "kivi8-g16" and outs[None].stats["kv_host_codec"] == "raw"
    agree = sum(a == b for a, b in zip(outs[8].tokens, outs[None].tokens)) / len(outs[None].tokens)
    assert agree >= 0.75  # 8-bit KIVI barely moves a random model's logits


def _half_spilled_pool(tmp_path, dtype: torch.dtype) -> tuple[KVBlockLayout, KVSpillStore, HostKVPool]:
    """A raw host pool of 2 layers x 10 blocks (3 kv heads x 32, blocks of 16) of which 6 stay in
    memory and the rest are spilled to ``tmp_path``; layer ``l`` holds ``_blocks(lay, 10, seed=l)``."""
    lay = KVBlockLayout(2, 3, 32, 16, dtype)
    spill = KVSpillStore(lay, str(tmp_path), record_bytes=RawCodec(lay).record_bytes)
    pool = HostKVPool(lay, 6 * lay.block_bytes, spill, RawCodec(lay))
    for layer in range(2):
        pool.put(layer, 0, _blocks(lay, 10, seed=layer))
    pool.enforce(0)
    return lay, spill, pool


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_native_gather_reads_the_rows_of_the_general_path(tmp_path, monkeypatch, dtype):
    """HostKVPool.gather's one native call (raw records, blocks in host memory) returns the rows the
    general torch path returns, bit for bit, and touches the same slots; a row on a spilled block
    (or a position never demoted) takes the general path, which brings it back (or names it)."""
    import flashtier.runtime.kv.host as host_mod
    from flashtier.errors import InputError

    if host_mod._kv_gather is None:
        pytest.skip("the C extension is not built")
    lay, spill, pool = _half_spilled_pool(tmp_path, dtype)
    g = torch.Generator().manual_seed(3)
    heads = torch.tensor([2, 0, 1, 2])
    on_host = [b for b in range(10) if int(pool._tables[1].view()[b]) >= 0]
    hot = torch.tensor(on_host)[torch.randint(len(on_host), (4, 9), generator=g)] * 16 + torch.randint(16, (4, 9), generator=g)
    calls = []
    native = host_mod._kv_gather
    monkeypatch.setattr(host_mod, "_kv_gather", lambda *a: calls.append(1) or native(*a))
    fast = pool.gather(1, heads, hot)
    monkeypatch.setattr(host_mod, "_kv_gather", None)
    slow = pool.gather(1, heads, hot)
    assert calls and torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])
    full = RawCodec(lay).decode(RawCodec(lay).encode(_blocks(lay, 10, seed=1)))  # [n, 2, H, B, D]
    assert torch.equal(fast[0], full[hot // 16, 0, heads[:, None], hot % 16])
    monkeypatch.setattr(host_mod, "_kv_gather", native)
    cold = [b for b in range(10) if b not in on_host]
    assert cold  # some blocks were spilled
    mixed = torch.tensor([[cold[0] * 16 + 5, on_host[0] * 16]])
    k, v = pool.gather(1, torch.tensor([1]), mixed)  # read back through storage by the general path
    assert torch.equal(k[0], full[mixed[0] // 16, 0, 1, mixed[0] % 16])
    with pytest.raises(InputError, match="never demoted"):
        pool.gather(1, torch.tensor([0]), torch.tensor([[10 * 16 + 1]]))
    spill.close()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_rest", [True, False])
def test_attention_over_rows_read_in_place_equals_it_over_the_gathered_rows(tmp_path, dtype, with_rest):
    """The decode step's fused attention reading the resident rows as views (sinks and a ring's two
    spans) and the retrieved rows where the host pool keeps them (retrieval_attend_pool) gives the
    output of the same attention over concatenated and gathered rows, bit for bit, and marks the
    slots it read as used; with a row on a spilled block it computes nothing (None: the caller
    gathers through the general path)."""
    from flashtier.retrieval.cluster_batch import attend_rows, attend_rows_in_place
    from flashtier.retrieval.merge import PartialAttention
    from flashtier.runtime.kv.host_views import PagedLayerKV

    if attend_rows_in_place.__globals__["_retrieval_attend_pool"] is None:
        pytest.skip("the C extension is not built")
    lay, spill, pool = _half_spilled_pool(tmp_path, dtype)
    view = PagedLayerKV(pool, 1, RetrievalConfig())
    g = torch.Generator().manual_seed(5)
    on_host = [b for b in range(10) if int(pool._tables[1].view()[b]) >= 0]
    rows = torch.tensor(on_host)[torch.randint(len(on_host), (3, 2, 7), generator=g)] * 16 + \
        torch.randint(16, (3, 2, 7), generator=g)  # [H, G, n]
    q = torch.randn(3, 2, 32, generator=g)  # [H, G, D]
    res_k, res_v = (torch.randn(3, 5, 32, generator=g).to(dtype) for _ in range(2))  # [H, S, D]
    rest = PartialAttention(torch.randn(3, 2, 32, generator=g), torch.randn(3, 2, generator=g)) if with_rest else None
    lru = pool.store._manager.policies[(pool.arena, "host")]  # SlotLRU: last use of each slot
    ring_k, ring_v = (torch.randn(3, 9, 32, generator=g).to(dtype) for _ in range(2))  # a ring buffer's views
    parts_k, parts_v = [res_k, ring_k[:, 6:], ring_k[:, :2]], [res_v, ring_v[:, 6:], ring_v[:, :2]]  # sinks + spans
    fused = view.attend_rows(q, parts_k, parts_v, rows, rest, 0.2)
    read = {int(pool._tables[1].view()[b]) for b in (rows // 16).unique().tolist()}
    assert {int(s) for s in (lru._last == lru._clock).nonzero()[0]} == read
    k, v = view.gather_rows(rows.reshape(3, -1))  # [H, G * n, D]
    gathered = attend_rows(q, torch.cat(parts_k, dim=1), torch.cat(parts_v, dim=1), k.view(3, 2, 7, 32),
                           v.view(3, 2, 7, 32), rest, 0.2)
    assert fused is not None and torch.equal(fused, gathered)
    cold = [b for b in range(10) if b not in on_host]
    rows[1, 0, 3] = cold[0] * 16 + 2  # one row on a spilled block
    assert view.attend_rows(q, parts_k, parts_v, rows, rest, 0.2) is None
    spill.close()
