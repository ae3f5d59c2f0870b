"""Compressed weight copies: a lossless codec, whole-tensor reads from side files, exact outputs,
and every way the copy can be wrong refused with a clear error."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flashtier.errors import ConfigError, IntegrityError
from flashtier.checkpoint.folder import Checkpoint, read_tensor
from flashtier.runtime.engine import EngineConfig, Model
from flashtier.checkpoint.make_model import PRESETS, MakeModelSpec, write_model
from flashtier.storage_backends.aligned import allocate_aligned
from flashtier.storage_backends.compressed import CompressedBackend
from flashtier.storage_backends.compressed_layout import (
    MANIFEST_NAME,
    SEGMENT_BYTES,
    compress_checkpoint,
    load_index,
    side_folder,
)
from flashtier.storage_backends.direct_file import DirectFileBackend, DirectFileConfig
from flashtier.storage_backends.memory import MemoryBackend
from flashtier.storage_backends.weight_codec import RAW, SPLIT16, decode_into, encode

PROMPT = list(range(3, 40))


# ---------------------------------------------------------------------------- codec
@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=0, max_size=5000).filter(lambda b: len(b) % 2 == 0), st.sampled_from([RAW, SPLIT16]))
def test_codec_round_trip_is_exact_for_any_bytes(data, codec):
    record = encode(data, codec)
    out = bytearray(len(data))
    decode_into(memoryview(bytearray(record)), codec, memoryview(out), "test")
    assert bytes(out) == data


def test_split16_stores_bf16_weights_in_about_two_thirds():
    w = (torch.randn(256, 1024) * 0.02).to(torch.bfloat16)
    raw = w.view(torch.uint8).numpy().tobytes()
    record = encode(raw, SPLIT16)
    assert 0.6 < len(record) / len(raw) < 0.75  # low bytes raw (0.5) + exponents in ~2.7 bits
    out = bytearray(len(raw))
    decode_into(memoryview(bytearray(record)), SPLIT16, memoryview(out), "w")
    assert torch.equal(torch.frombuffer(out, dtype=torch.bfloat16).view(256, 1024), w)


def test_corrupt_split16_record_is_an_integrity_error():
    raw = (torch.randn(4096) * 0.02).to(torch.bfloat16).view(torch.uint8).numpy().tobytes()
    record = bytearray(encode(raw, SPLIT16))
    record[-20] ^= 0xFF  # inside the zstd frame of the high bytes
    with pytest.raises(IntegrityError, match="where-label"):
        decode_into(memoryview(record), SPLIT16, memoryview(bytearray(len(raw))), "where-label")
    with pytest.raises(IntegrityError, match="cannot hold"):
        decode_into(memoryview(bytearray(10)), SPLIT16, memoryview(bytearray(len(raw))), "x")


# ---------------------------------------------------------------------------- folder + backend
@pytest.fixture(scope="module", params=["tiny-llama", "tiny-mixtral"])
def made(request, tmp_path_factory):
    cfg = dict(PRESETS[request.param], num_hidden_layers=4, vocab_size=512)
    path = write_model(tmp_path_factory.mktemp(request.param) / "m", MakeModelSpec(cfg, "bfloat16", seed=5))
    compress_checkpoint(path)
    return path


def test_every_tensor_reads_back_bit_identical(made):
    ck = Checkpoint(made)
    index = load_index(made)
    assert index is not None and 0.6 < index.stored_fraction() < 0.8
    inner = DirectFileBackend(DirectFileConfig())
    backend = CompressedBackend(inner, index, max_in_flight=2)  # a queue of segment reads
    try:
        jobs = []
        for info in ck.tensors.values():
            plan = backend.plan(info.offset, info.nbytes)
            dest = allocate_aligned(plan.span)  # the store's in-place layout
            jobs.append((info, backend.submit_read(str(info.path), info.offset, info.nbytes, dest)))
        for info, job in jobs:
            assert bytes(job.wait()) == read_tensor(info).contiguous().view(torch.uint8).numpy().tobytes(), info.name
        assert inner.stats().bytes_read < sum(i.nbytes for i in ck.tensors.values())  # fewer bytes from disk
    finally:
        inner.close()


def test_large_tensors_are_cut_into_segments_and_a_range_of_tensors_is_one_run(tmp_path):
    cfg = dict(PRESETS["tiny-llama"], num_hidden_layers=1, vocab_size=512, hidden_size=1024,
               intermediate_size=4096, num_attention_heads=8, num_key_value_heads=8)
    path = write_model(tmp_path / "m", MakeModelSpec(cfg, "bfloat16", seed=1))  # 8 MiB FFN tensors
    compress_checkpoint(path)
    index = load_index(path)
    shard = next(iter(index.shards.values()))
    ck = Checkpoint(path)
    gate = ck.tensors["model.layers.0.mlp.gate_proj.weight"]
    run = shard.run(gate.offset, gate.nbytes)
    assert run is not None and len(run) == -(-gate.nbytes // SEGMENT_BYTES) > 1
    assert shard.run(gate.offset + 2, gate.nbytes - 2) is None  # not a segment boundary: read the shard
    ordered = sorted(ck.tensors.values(), key=lambda t: t.offset)
    a, b = ordered[3], ordered[4]
    if a.offset + a.nbytes == b.offset:
        assert shard.run(a.offset, a.nbytes + b.nbytes) is not None  # neighbours: one run
    backend = CompressedBackend(MemoryBackend(), index)
    # a range that is not a run passes through to the inner backend (here: unknown to it)
    with pytest.raises(Exception):
        backend.submit_read(str(gate.path), gate.offset + 2, 100).wait()


def test_paged_outputs_with_compressed_copy_equal_in_memory(made):
    ref = Model(made).generate(PROMPT, max_new_tokens=16, ignore_eos=True).tokens
    total = sum(f.stat().st_size for f in made.glob("*.safetensors"))
    budget = int(total * 0.5) + 64 * 128 * 16
    with Model(made, EngineConfig(dram_budget=budget, max_context=64, kv_block_size=16)) as llm:
        result = llm.generate(PROMPT, max_new_tokens=16, ignore_eos=True)
    assert result.tokens == ref
    assert result.stats["weights_at_rest"] == "compressed"
    assert result.stats["weights_decoded_bytes"] > 0
    with Model(made, EngineConfig.from_options(dram_budget=budget, max_context=64, kv_block_size=16,
                                               compressed="off")) as llm:
        raw = llm.generate(PROMPT, max_new_tokens=16, ignore_eos=True)
    assert raw.tokens == ref and raw.stats["weights_at_rest"] == "raw"
    assert result.stats["bytes_read_storage"] < 0.85 * raw.stats["bytes_read_storage"]


# ---------------------------------------------------------------------------- bad copies
def _copy(made, tmp_path):
    return shutil.copytree(made, tmp_path / "copy")


def test_corrupt_record_fails_the_read_and_the_next_request_works(made, tmp_path):
    path = _copy(made, tmp_path)
    side = next(side_folder(path).glob("*.ftz"))
    good = side.read_bytes()
    total = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    cfg = EngineConfig(dram_budget=int(total * 0.5) + 64 * 128 * 16, max_context=64, kv_block_size=16)
    manifest = json.loads((side_folder(path) / MANIFEST_NAME).read_text())
    segs = next(iter(manifest["files"].values()))["segments"]
    bad = bytearray(good)
    for seg in segs:  # every compressed record: whichever tensors stream, their reads fail
        if seg[2] == "split16":
            bad[seg[3] + 10] ^= 0x55
    side.write_bytes(bytes(bad))
    with Model(path, cfg) as llm:
        with pytest.raises(IntegrityError, match=r"checksum mismatch.*flashtier compress"):
            for _ in range(3):
                llm.generate(PROMPT, max_new_tokens=4, ignore_eos=True)
    side.write_bytes(good)
    with Model(path, cfg) as llm:
        assert llm.generate(PROMPT, max_new_tokens=4, ignore_eos=True).tokens == \
            Model(made).generate(PROMPT, max_new_tokens=4, ignore_eos=True).tokens


def test_stale_truncated_or_malformed_copies_are_refused(made, tmp_path):
    path = _copy(made, tmp_path)
    folder = side_folder(path)
    manifest = folder / MANIFEST_NAME
    text = manifest.read_text()
    side = next(folder.glob("*.ftz"))
    data = side.read_bytes()
    side.write_bytes(data[:-7])
    with pytest.raises(IntegrityError, match=r"size .* the manifest says"):
        load_index(path)
    side.write_bytes(data)
    manifest.write_text("{not json")
    with pytest.raises(IntegrityError, match="malformed manifest"):
        load_index(path)
    manifest.write_text(text)
    shard = next(path.glob("*.safetensors"))
    with open(shard, "ab") as f:  # the checkpoint changed after compression
        f.write(b"\0" * 8)
    with pytest.raises(IntegrityError, match="changed after it was compressed"):
        load_index(path)
    with pytest.raises(IntegrityError, match="--compressed off"):
        Model(path, EngineConfig(dram_budget=1 << 30, max_context=64))


def test_compressed_on_without_a_copy_is_a_clear_error(tmp_path):
    cfg = dict(PRESETS["tiny-llama"], num_hidden_layers=2, vocab_size=512)
    path = write_model(tmp_path / "m", MakeModelSpec(cfg, "bfloat16", seed=2))
    total = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    with pytest.raises(ConfigError, match="flashtier compress"):
        Model(path, EngineConfig.from_options(dram_budget=total // 2, max_context=64, compressed="on"))
    with pytest.raises(ConfigError, match="--compressed 'sometimes' is unknown"):
        Model(path, EngineConfig.from_options(dram_budget=total // 2, max_context=64, compressed="sometimes"))


def test_torch_fallback_decodes_the_same_bytes(monkeypatch):
    from flashtier.storage_backends import weight_codec

    raw = (torch.randn(3000) * 0.02).to(torch.bfloat16).view(torch.uint8).numpy().tobytes()
    record = bytearray(encode(raw, SPLIT16))
    fast, slow = bytearray(len(raw)), bytearray(len(raw))
    decode_into(memoryview(record), SPLIT16, memoryview(fast), "native")
    monkeypatch.setattr(weight_codec, "_interleave16", None)  # an install without the C extension
    decode_into(memoryview(record), SPLIT16, memoryview(slow), "torch")
    assert bytes(fast) == bytes(slow) == raw


def test_native_interleave_rejects_mismatched_buffers():
    native = pytest.importorskip("flashtier._native")
    with pytest.raises(ValueError, match="cannot fill"):
        native.interleave16(b"ab", b"c", bytearray(4))
    out = bytearray(5)
    native.interleave16(b"ab", b"cd", memoryview(out)[1:])  # an odd address: the byte-wise path
    assert bytes(out[1:]) == b"acbd"
