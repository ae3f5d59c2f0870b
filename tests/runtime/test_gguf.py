"""GGUF files: flashtier's forward on quantized blocks equals the dequantized network; greedy
tokens equal transformers loading the same file; paged = in memory; tokenizer and chat template
come from the metadata; every bad file gets a one-line error."""

from __future__ import annotations

import importlib.util
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from flashtier.errors import CheckpointError, IntegrityError, UnsupportedModelError
from flashtier.runtime import SamplingConfig
from flashtier.runtime.engine import EngineConfig, Model

HERE = Path(__file__).parent
spec = importlib.util.spec_from_file_location("gguf_models", HERE / "gguf_models.py")
gm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gm)

CASES = [("llama", "q4_k_m"), ("llama", "q8_0"), ("qwen2", "q4_k_m"), ("qwen2", "q6_k"), ("mixtral", "q4_k_m"),
         ("qwen2_moe", "q5_k_m"), ("llama", "q4_0"), ("llama", "f16")]


@pytest.fixture(scope="module", params=CASES, ids=[f"{a}-{t}" for a, t in CASES])
def case(request, tmp_path_factory):
    kind, ftype = request.param
    folder = tmp_path_factory.mktemp(f"{kind}-{ftype}")
    path, model = gm.make_gguf(kind, folder, ftype)
    ref = gm.dequantized_reference(path, folder / "hf", folder / "deq")
    return kind, ftype, path, ref


def test_logits_equal_the_dequantized_network(case):
    kind, ftype, path, ref = case
    ids = torch.randint(0, 320, (40,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids[None]).logits[0]
    llm = Model(path)
    assert llm.transformer.dtype == torch.float32
    with torch.inference_mode():
        prefill = llm.transformer.forward(ids, llm.transformer.new_cache(16), 0, all_logits=True)
        cache = llm.transformer.new_cache(16)
        llm.transformer.forward(ids[:-1], cache, 0)
        decode = llm.transformer.forward(ids[-1:], cache, len(ids) - 1)  # one row: the block kernels
    scale = expected.abs().max().item()
    assert (prefill - expected).abs().max().item() < 1e-4 * scale, (kind, ftype)
    assert (decode[0] - expected[-1]).abs().max().item() < 1e-4 * scale, (kind, ftype)
    if ftype not in ("f16",):
        assert llm.linear.calls_quantized > 0


def test_greedy_tokens_equal_the_dequantized_network(case):
    kind, ftype, path, ref = case
    prompt = torch.randint(0, 320, (12,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.no_grad():
        expected = ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                max_new_tokens=24, do_sample=False, min_new_tokens=24, eos_token_id=None,
                                pad_token_id=0)[0, len(prompt):].tolist()
    result = Model(path).generate(prompt, max_new_tokens=24, sampling=SamplingConfig(), ignore_eos=True)
    assert result.tokens == expected, (kind, ftype)


def test_paged_and_in_memory_runs_give_the_same_tokens(case):
    kind, ftype, path, _ = case
    prompt = list(range(5, 25))
    alone = Model(path).generate(prompt, max_new_tokens=16, sampling=SamplingConfig(), ignore_eos=True).tokens
    paged = Model(path, EngineConfig(dram_budget=1 << 20, max_context=64))
    got = paged.generate(prompt, max_new_tokens=16, sampling=SamplingConfig(), ignore_eos=True)
    assert got.tokens == alone
    assert got.stats.get("bytes_read_storage", 1) > 0
    paged.close()


def test_q8_activations_are_an_opt_in_approximation(tmp_path):
    """``activations="q8"`` changes decode logits only by the int8 rounding of the activations
    (measured, bounded); the default stays exact; a bad value is one clear error."""
    from flashtier.errors import ConfigError

    path, _ = gm.make_gguf("llama", tmp_path, "q4_k_m")
    ids = torch.randint(0, 320, (24,), generator=torch.Generator().manual_seed(4))
    out = {}
    for act in ("f32", "q8"):
        llm = Model(path, EngineConfig(activations=act))
        with torch.inference_mode():
            cache = llm.transformer.new_cache(16)
            llm.transformer.forward(ids[:-1], cache, 0)
            out[act] = llm.transformer.forward(ids[-1:], cache, len(ids) - 1)[0]  # [V], one-row products
    rel = ((out["q8"] - out["f32"]).norm() / out["f32"].norm()).item()
    assert 0 < rel < 0.05, rel  # not identical (the approximation ran), but close
    with pytest.raises(ConfigError, match="activations"):
        EngineConfig(activations="int4")


@pytest.mark.parametrize("slots", [1, 2])
def test_expert_caches_hold_extents_of_different_sizes(tmp_path, slots):
    """Q4_K_M stores some layers' ffn_down as Q6_K (larger than the Q4_K gate and up): with one
    or two expert slots per layer the cache must still take every routed expert (a single pool
    per layer fragmented and refused one) and give the in-memory tokens."""
    path, _ = gm.make_gguf("mixtral", tmp_path, "q4_k_m")
    from flashtier.checkpoint.gguf_checkpoint import GGUFCheckpoint

    types = {t.dtype for n, t in GGUFCheckpoint(path).tensors.items() if "experts" in n}
    assert {"Q4_K", "Q6_K"} <= types, types  # the case this test is about
    prompt = list(range(5, 25))
    alone = Model(path).generate(prompt, max_new_tokens=16, sampling=SamplingConfig(), ignore_eos=True).tokens
    with Model(path, EngineConfig.from_options(dram_budget=1 << 20, max_context=64, expert_slots=slots)) as llm:
        got = llm.generate(prompt, max_new_tokens=16, sampling=SamplingConfig(), ignore_eos=True)
        caches = llm.weights._caches
        assert all(len(c.arenas) == 3 for c in caches.values())
    assert got.tokens == alone


def test_a_budget_that_holds_every_expert_pins_them(tmp_path):
    """When the plan's expert cache holds all experts (slots sized per layer: Q6_K down layers are
    larger), every expert is read once at open and kept: no storage reads while decoding, each use
    a hit, the in-memory tokens. ``expert_pin=off`` runs the caches on the same budget, same tokens."""
    path, _ = gm.make_gguf("mixtral", tmp_path, "q4_k_m")
    prompt = list(range(5, 25))
    alone = Model(path).generate(prompt, max_new_tokens=12, sampling=SamplingConfig(), ignore_eos=True).tokens
    runs = {}
    for pin in ("on", "off"):
        with Model(path, EngineConfig.from_options(dram_budget=64 << 20, max_context=64, expert_pin=pin)) as llm:
            caches = llm.weights._caches
            assert all(c.slots == len(c.pages) for c in caches.values())  # the budget holds every expert
            before = llm.weights.stats()["bytes_read_storage"]
            got = llm.generate(prompt, max_new_tokens=12, sampling=SamplingConfig(), ignore_eos=True)
            runs[pin] = (got.tokens, got.stats["expert_cache"]["pinned"], got.stats["expert_hit_rate"],
                         llm.weights.stats()["bytes_read_storage"] - before)
    assert runs["on"][0] == runs["off"][0] == alone
    assert runs["on"][1] is True and runs["off"][1] is False
    assert runs["on"][2] == 1.0
    assert runs["on"][3] <= 64 * 1024  # embedding rows only


@pytest.mark.parametrize("ftype", ["q8_0", "q4_k_m"])
def test_greedy_tokens_equal_transformers_reading_the_gguf(tmp_path, ftype):
    """The issue's reference: transformers' own GGUF loader (it undoes llama.cpp's q/k permutation
    and dequantizes with the gguf package)."""
    import transformers as tf

    path, _ = gm.make_gguf("llama", tmp_path, ftype, seed=5)
    ref = tf.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    prompt = [3, 17, 99, 250, 7, 41, 8, 8, 120]
    with torch.no_grad():
        expected = ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                max_new_tokens=24, do_sample=False, min_new_tokens=24, eos_token_id=None,
                                pad_token_id=0)[0, len(prompt):].tolist()
    got = Model(path).generate(prompt, max_new_tokens=24, sampling=SamplingConfig(), ignore_eos=True).tokens
    assert got == expected


# ------------------------------------------------------------------------- the shipped model
@pytest.fixture(scope="module")
def tiny_moe_q8(tmp_path_factory):
    from flashtier.checkpoint.quantize import quantize_checkpoint

    root = Path(__file__).resolve().parents[2] / "models" / "tiny-moe"
    return root, quantize_checkpoint(root, tmp_path_factory.mktemp("tm") / "tiny-moe-q8_0.gguf", "q8_0")


def test_tokenizer_and_chat_template_come_from_the_metadata(tiny_moe_q8):
    from flashtier.runtime.tokenizer import Tokenizer

    root, path = tiny_moe_q8
    hf = Tokenizer(root)
    ours = Model(path).tokenizer
    assert ours is not None
    for text in ["def fibonacci(n):\n    return n", "  import os, sys\n\n\tx = 'é✓' + \"日本\"", "<|im_start|>user\nhi<|im_end|>"]:
        assert ours.encode(text) == hf.encode(text), text
        assert ours.decode(hf.encode(text)) == hf.decode(hf.encode(text))
    msgs = [{"role": "user", "content": "hello"}]
    assert ours.render_chat(msgs) == hf.render_chat(msgs)


def test_shipped_model_as_q8_0_writes_the_same_code(tiny_moe_q8):
    """Q8_0 of the default model keeps its greedy answer close: same first tokens as bf16."""
    root, path = tiny_moe_q8
    prompt = "def fibonacci(n):"
    bf16 = Model(root, EngineConfig(compute_dtype="float32")).generate(prompt, max_new_tokens=8, sampling=SamplingConfig())
    q8 = Model(path).generate(prompt, max_new_tokens=8, sampling=SamplingConfig())
    assert q8.tokens[:4] == bf16.tokens[:4]


def test_server_answers_from_a_gguf_as_the_library_does(tiny_moe_q8):
    """``flashtier serve FILE.gguf``: the OpenAI endpoint's greedy answer equals the library's."""
    from fastapi.testclient import TestClient

    from flashtier.apps.server import ServerConfig, create_app
    from flashtier.runtime import open_model

    _, path = tiny_moe_q8
    messages = [{"role": "user", "content": "Write a function that adds two numbers."}]
    with open_model(path) as llm:
        expected = llm.generate(messages=messages, max_new_tokens=12, sampling=SamplingConfig()).text
    app = create_app(lambda: open_model(path), ServerConfig("tiny-moe-q8_0"))
    with TestClient(app, base_url="http://localhost") as client:  # the Host allow-list refuses "testserver"
        for _ in range(100):
            if client.get("/health").status_code == 200:
                break
            import time

            time.sleep(0.1)
        r = client.post("/v1/chat/completions", json={"model": "tiny-moe-q8_0", "messages": messages,
                                                      "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == expected


def test_compress_and_convert_refuse_gguf_with_one_line(small_gguf):
    for cmd, out in (("compress", []), ("convert", [str(small_gguf.parent / "out")])):
        rc, err = _cli(cmd, str(small_gguf), *out)
        assert rc == 1 and "not GGUF files" in err and "Traceback" not in err, (cmd, err)


# ------------------------------------------------------------------------- bad files
def _cli(*args: str) -> tuple[int, str]:
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "flashtier.apps.cli", *args], capture_output=True, text=True, timeout=300)
    return p.returncode, p.stderr


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("small")
    path, _ = gm.make_gguf("llama", folder, "q8_0")
    return path


def test_truncated_file_is_refused_with_one_line(small_gguf, tmp_path):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(small_gguf.read_bytes()[: small_gguf.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        Model(bad)
    rc, err = _cli("generate", str(bad), "--prompt-ids", "1,2", "--max-new-tokens", "2")
    assert rc == 1 and err.count("\n") == 1 and "truncated" in err and "Traceback" not in err


def test_corrupt_header_and_non_gguf_files(small_gguf, tmp_path):
    raw = bytearray(small_gguf.read_bytes())
    bad = tmp_path / "count.gguf"
    raw2 = raw.copy()
    raw2[8:16] = struct.pack("<Q", 1 << 40)  # tensor count
    bad.write_bytes(bytes(raw2))
    with pytest.raises(CheckpointError, match="corrupt"):
        Model(bad)
    notg = tmp_path / "x.gguf"
    notg.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        Model(notg)


def test_flipped_weight_byte_is_caught_by_the_checksum(small_gguf, tmp_path):
    from flashtier.checkpoint.gguf_format import read_gguf

    g = read_gguf(small_gguf)
    t = g.tensors["blk.0.ffn_up.weight"]
    raw = bytearray(small_gguf.read_bytes())
    raw[t.offset + 100] ^= 0x40
    bad = tmp_path / "flip.gguf"
    bad.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="crc32"):
        Model(bad).generate([1, 2, 3], max_new_tokens=2)
    paged = Model(bad, EngineConfig(dram_budget=1 << 20, max_context=64))  # the tensor is streamed: checked on read
    with pytest.raises(IntegrityError, match="ffn_up|up_proj"):
        paged.generate([1, 2, 3], max_new_tokens=2)
    paged.close()


def test_flipped_expert_byte_is_caught_in_memory_and_when_paged(tmp_path):
    """Paging reads one expert's slice of a stacked ``ffn_*_exps`` tensor: flashtier's files carry
    a crc32 per slice, so a flipped bit in an expert is caught on that read too."""
    from flashtier.checkpoint.gguf_format import read_gguf

    path, _ = gm.make_gguf("mixtral", tmp_path, "q8_0")
    t = read_gguf(path).tensors["blk.1.ffn_down_exps.weight"]
    assert t.slice_crc32 is not None and len(t.slice_crc32) == t.shape[0]
    raw = bytearray(path.read_bytes())
    raw[t.offset + 2 * (t.nbytes // t.shape[0]) + 7] ^= 0x40  # expert 2
    bad = tmp_path / "flip.gguf"
    bad.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="crc32"):
        Model(bad)
    paged = Model(bad, EngineConfig.from_options(dram_budget=1 << 20, max_context=64, expert_slots=1))
    with pytest.raises(IntegrityError, match="expert 2 of layer 1"):
        for _ in range(4):  # until a token routes to expert 2 of layer 1
            paged.generate(list(range(1, 50)), max_new_tokens=8, sampling=SamplingConfig(), ignore_eos=True)
    paged.close()


def test_unsupported_type_and_architecture_are_named(small_gguf, tmp_path):
    from flashtier.checkpoint.gguf_format import read_gguf

    g = read_gguf(small_gguf)
    raw = bytearray(small_gguf.read_bytes())
    # Rewrite one tensor's type id to Q2_K (10) in the header: same name, an unsupported type.
    name = b"blk.0.attn_v.weight"
    at = raw.index(name) + len(name)
    n_dims = struct.unpack_from("<I", raw, at)[0]
    struct.pack_into("<I", raw, at + 4 + 8 * n_dims, 10)
    bad = tmp_path / "q2k.gguf"
    bad.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="checksum mismatch in the GGUF header"):
        Model(bad)  # as flashtier wrote it (same size): the edit is corruption
    bad.write_bytes(bytes(raw) + bytes(32))  # another size: a file some other tool rewrote
    with pytest.raises(UnsupportedModelError, match=r"Q2_K.*supported: .*Q4_K"):
        Model(bad)
    raw = bytearray(small_gguf.read_bytes())
    at = raw.index(b"llama", raw.index(b"general.architecture"))
    raw[at: at + 5] = b"gemma"
    bad2 = tmp_path / "arch.gguf"
    bad2.write_bytes(bytes(raw) + bytes(32))
    with pytest.raises(UnsupportedModelError, match="gemma.*supported: llama, qwen2, qwen2moe"):
        Model(bad2)
    assert g.tensors  # the original still parses


def test_folder_with_one_gguf_loads_and_two_are_refused(small_gguf, tmp_path):
    shutil.copy(small_gguf, tmp_path / "a.gguf")
    assert Model(tmp_path).config.num_layers == 2
    shutil.copy(small_gguf, tmp_path / "b.gguf")
    with pytest.raises(CheckpointError, match="2 GGUF files"):
        Model(tmp_path)


def test_quantize_refuses_to_overwrite_without_force(small_gguf, tmp_path):
    from flashtier.checkpoint.quantize import quantize_checkpoint

    hf = small_gguf.parent / "hf"
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    rc, err = _cli("quantize", str(hf), str(out), "--type", "q8_0")
    assert rc == 1 and "--force" in err and out.read_bytes() == b"keep me"
    quantize_checkpoint(hf, out, "q8_0", force=True)
    assert Model(out).config.hidden_size == 256
    assert not list(tmp_path.glob(".*tmp*"))


def test_quantized_file_is_smaller_and_plan_counts_quantized_bytes(small_gguf):
    from flashtier.checkpoint.gguf_checkpoint import GGUFCheckpoint

    ck = GGUFCheckpoint(small_gguf)
    bf16_bytes = sum(int(np.prod(t.shape)) * 2 for t in ck.tensors.values())
    assert ck.total_bytes() < 0.6 * bf16_bytes  # Q8_0: 1.0625 bytes per weight (norms stay F32)
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "flashtier", "plan", str(small_gguf), "--dram-budget", "10M", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert "GGUF" in doc["source"]
