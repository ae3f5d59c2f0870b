"""Checks on the shipped tiny checkpoints (models/tiny-moe, models/tiny-moe-16k, models/tiny-dense).

They must load with transformers, their files must agree with their configs, the tokenizer
and chat template must work, greedy decoding must be stable and produce Python-looking
text, and a small slice of the held-out set must show that the weights are trained and
ReLU-sparse. Everything runs on CPU in a few seconds.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MODELS = Path(os.environ.get("FLASHTIER_TINY_MODELS", ROOT / "models"))
MOE, DENSE, MOE_16K = MODELS / "tiny-moe", MODELS / "tiny-dense", MODELS / "tiny-moe-16k"
ALL = [pytest.param(MOE, id="tiny-moe"), pytest.param(DENSE, id="tiny-dense"), pytest.param(MOE_16K, id="tiny-moe-16k")]
REQUIRED = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"]
SPECIALS = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}


def _config(d: Path) -> dict:
    return json.loads((d / "config.json").read_text())


@pytest.fixture(scope="module")
def loaded():
    cache = {}

    def get(d: Path):
        if d not in cache:
            m = transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
            m.eval()
            cache[d] = m
        return cache[d]

    return get


def _measure_module():
    path = ROOT / "benchmarks" / "measure_tiny.py"
    spec = importlib.util.spec_from_file_location("flashtier_measure_tiny", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("d", ALL)
def test_files_present(d):
    for f in REQUIRED:
        assert (d / f).is_file(), f"{d.name}/{f} missing"


def test_architectures():
    moe, dense = _config(MOE), _config(DENSE)
    # the long-context fine-tune of tiny-moe: same architecture; each declares the positions it was trained on
    assert {**_config(MOE_16K), "max_position_embeddings": 256} == moe
    assert _config(MOE_16K)["max_position_embeddings"] == 16384
    assert moe["max_position_embeddings"] == dense["max_position_embeddings"] == 256
    assert moe["architectures"] == ["MixtralForCausalLM"]
    assert moe["num_local_experts"] == 8 and moe["num_experts_per_tok"] == 2
    assert dense["architectures"] == ["LlamaForCausalLM"]
    for c in (moe, dense):
        assert c["hidden_act"] == "relu"
        assert c["num_key_value_heads"] < c["num_attention_heads"]
        assert c["num_attention_heads"] % c["num_key_value_heads"] == 0


def test_size_on_disk():
    total = sum((d / "model.safetensors").stat().st_size for d in (MOE, DENSE, MOE_16K))
    assert total < 64 * 1024 * 1024, total


def _expected_tensors(c: dict) -> dict[str, tuple[int, ...]]:
    H, V = c["hidden_size"], c["vocab_size"]
    hd = c.get("head_dim") or H // c["num_attention_heads"]
    nq, nkv, inter = c["num_attention_heads"], c["num_key_value_heads"], c["intermediate_size"]
    exp = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    if not c.get("tie_word_embeddings", False):
        exp["lm_head.weight"] = (V, H)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        exp[p + "input_layernorm.weight"] = (H,)
        exp[p + "post_attention_layernorm.weight"] = (H,)
        exp[p + "self_attn.q_proj.weight"] = (nq * hd, H)
        exp[p + "self_attn.k_proj.weight"] = (nkv * hd, H)
        exp[p + "self_attn.v_proj.weight"] = (nkv * hd, H)
        exp[p + "self_attn.o_proj.weight"] = (H, nq * hd)
        if c.get("num_local_experts"):
            exp[p + "block_sparse_moe.gate.weight"] = (c["num_local_experts"], H)
            for e in range(c["num_local_experts"]):
                q = p + f"block_sparse_moe.experts.{e}."
                exp[q + "w1.weight"] = (inter, H)
                exp[q + "w2.weight"] = (H, inter)
                exp[q + "w3.weight"] = (inter, H)
        else:
            exp[p + "mlp.gate_proj.weight"] = (inter, H)
            exp[p + "mlp.up_proj.weight"] = (inter, H)
            exp[p + "mlp.down_proj.weight"] = (H, inter)
    return exp


@pytest.mark.parametrize("d", ALL)
def test_tensor_names_shapes_dtype(d):
    c = _config(d)
    exp = _expected_tensors(c)
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert keys == set(exp), (sorted(keys - set(exp))[:5], sorted(set(exp) - keys)[:5])
        for k in keys:
            sl = f.get_slice(k)
            assert tuple(sl.get_shape()) == exp[k], k
            assert sl.get_dtype() == "BF16", (k, sl.get_dtype())


@pytest.mark.parametrize("d", ALL)
def test_tokenizer_consistent(d):
    from tokenizers import Tokenizer

    c = _config(d)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    assert tok.get_vocab_size() == c["vocab_size"]
    for s, i in SPECIALS.items():
        assert tok.token_to_id(s) == i
    src = "def add(a, b):\n    return a + b  # ünïcode\n"
    assert tok.decode(tok.encode(src).ids) == src
    gen = json.loads((d / "generation_config.json").read_text())
    eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    assert 0 in eos and 2 in eos
    assert c["bos_token_id"] == 0 and c["eos_token_id"] == 0


@pytest.mark.parametrize("d", ALL)
def test_auto_tokenizer_and_chat_template(d):
    tok = transformers.AutoTokenizer.from_pretrained(str(d))
    assert tok.eos_token == "<|endoftext|>" and tok.bos_token == "<|endoftext|>"
    msgs = [{"role": "system", "content": "You write Python."},
            {"role": "user", "content": "Sort a list."}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou write Python.<|im_end|>\n"
                    "<|im_start|>user\nSort a list.<|im_end|>\n<|im_start|>assistant\n")
    ids = tok(text)["input_ids"]
    assert ids[0] == 1 and ids.count(2) == 2


@pytest.mark.parametrize("d", ALL)
def test_greedy_generation_stable(d, loaded):
    model = loaded(d)
    tok = transformers.AutoTokenizer.from_pretrained(str(d))
    prompt = "def main():\n    for i in range(10):\n        "
    ids = torch.tensor([tok(prompt)["input_ids"]])
    outs = []
    for _ in range(2):
        with torch.no_grad():
            o = model.generate(ids, max_new_tokens=24, do_sample=False,
                               pad_token_id=0, eos_token_id=None)
        outs.append(o[0, ids.shape[1]:].tolist())
    assert outs[0] == outs[1]
    assert len(set(outs[0])) >= 5, outs[0]  # not a single repeated token
    text = tok.decode(outs[0])
    assert any(w in text for w in ("return", "with ", "open(", "for ", "if ", "self", " = ")), text


def test_heldout_quality_slice():
    """A small slice of the held-out set (the full numbers are in models/README.md)."""
    mt = _measure_module()
    moe = mt.measure(str(MOE), seq=256, max_windows=8)
    dense = mt.measure(str(DENSE), seq=256, max_windows=8)
    for r in (moe, dense):  # an untrained model scores ~1-6% / loss > 6
        assert r["top1_acc"] > 0.20, r["top1_acc"]
        assert r["loss"] < 4.8, r["loss"]
        assert r["sparsity_mean"] >= 0.80, r["sparsity_per_layer"]
    rt = moe["routing"]
    assert len(rt["repeat_rate"]) == _config(MOE)["num_hidden_layers"]
    # routing is informative one layer ahead (random top-2 of 8 would give 0.25)
    assert rt["next_router_pred_mean"] > 0.6, rt["next_router_pred"]
    # most experts are used in every layer (the shipped model has at most 2 near-dead ones)
    for row in rt["expert_load"]:
        assert sum(v > 0.01 for v in row) >= 6, row


def test_long_context_model_uses_long_contexts():
    """tiny-moe-16k was fine-tuned on 16K-token windows: far into a held-out window it predicts
    about as well as near its start, where tiny-moe (trained on 256-token windows) falls apart
    (model card: loss 7.5 at positions 4K-16K before the fine-tune, 3.2 after)."""
    mt = _measure_module()
    ids = mt.heldout_ids(str(MOE_16K))[: 4096 + 1]
    x, y = torch.from_numpy(ids[:-1])[None], torch.from_numpy(ids[1:])
    losses = {}
    for d in (MOE, MOE_16K):
        with torch.no_grad():
            logits = transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)(x).logits[0]
        losses[d.name] = torch.nn.functional.cross_entropy(logits[2048:], y[2048:]).item()
    assert losses["tiny-moe-16k"] < 4.0, losses
    assert losses["tiny-moe"] > losses["tiny-moe-16k"] + 1.5, losses
