"""flashtier's forward equals transformers' for every supported architecture (fp32, random weights)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from flashtier.runtime import SamplingConfig
from flashtier.checkpoint.folder import Checkpoint
from flashtier.runtime.engine import Model

HERE = Path(__file__).parent
spec = importlib.util.spec_from_file_location("hf_models", HERE / "hf_models.py")
hf_models = importlib.util.module_from_spec(spec)
spec.loader.exec_module(hf_models)


@pytest.fixture(scope="module", params=hf_models.ARCHS)
def pair(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    ref = hf_models.make_hf_model(request.param, out)
    return request.param, ref, out


def test_logits_match_reference(pair):
    kind, ref, path = pair
    ids = torch.randint(0, 211, (70,), generator=torch.Generator().manual_seed(1))  # > one 16-token block
    with torch.no_grad():
        expected = ref(ids[None]).logits[0]
    llm = Model(path)
    cache = llm.transformer.new_cache(16)
    with torch.inference_mode():
        ours = llm.transformer.forward(ids, cache, 0, all_logits=True)
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max().item() < 1e-4, kind


def test_chunked_prefill_matches_one_pass(pair):
    _, ref, path = pair
    ids = torch.randint(0, 211, (50,), generator=torch.Generator().manual_seed(2))
    llm = Model(path)
    with torch.inference_mode():
        whole = llm.transformer.forward(ids, llm.transformer.new_cache(16), 0, all_logits=True)
        cache = llm.transformer.new_cache(16)
        parts = [llm.transformer.forward(ids[a:b], cache, a, all_logits=True) for a, b in ((0, 17), (17, 33), (33, 50))]
    assert (torch.cat(parts) - whole).abs().max().item() < 1e-5


def test_greedy_tokens_match_reference(pair):
    kind, ref, path = pair
    prompt = torch.randint(0, 211, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.no_grad():
        expected = ref.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, min_new_tokens=32,
                                eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    llm = Model(path)
    result = llm.generate(prompt, max_new_tokens=32, sampling=SamplingConfig(), ignore_eos=True)
    assert result.tokens == expected, kind


def test_config_parsing_sees_architecture_features(pair):
    kind, _, path = pair
    cfg = Checkpoint(path).config
    if kind == "llama":
        assert cfg.rope.rope_type == "llama3" and cfg.rope.factor == 8.0
    if kind == "qwen2":
        assert cfg.attention_bias and cfg.tie_word_embeddings
    if kind == "qwen2_moe":
        assert cfg.moe_layers == (True, False) and cfg.shared_expert_intermediate_size == 80
    if kind == "mixtral":
        assert cfg.num_experts == 4 and cfg.num_experts_per_tok == 2
    if kind == "llama_tied_relu":
        assert cfg.hidden_act == "relu" and cfg.tie_word_embeddings


def test_sharded_checkpoint_loads_the_same(tmp_path):
    from flashtier.checkpoint.make_model import PRESETS, MakeModelSpec, write_model

    one = write_model(tmp_path / "one", MakeModelSpec(PRESETS["tiny-mixtral"], "float32"))
    many = write_model(tmp_path / "many", MakeModelSpec(PRESETS["tiny-mixtral"], "float32", max_shard_bytes=100_000))
    assert len(list(many.glob("model-*.safetensors"))) > 1 and (many / "model.safetensors.index.json").is_file()
    a = Model(one).generate([1, 2, 3], max_new_tokens=10, ignore_eos=True)
    b = Model(many).generate([1, 2, 3], max_new_tokens=10, ignore_eos=True)
    assert a.tokens == b.tokens


def test_made_model_loads_in_transformers(tmp_path):
    import transformers

    from flashtier.checkpoint.make_model import PRESETS, MakeModelSpec, write_model

    for preset in ("tiny-llama", "tiny-mixtral"):
        path = write_model(tmp_path / preset, MakeModelSpec(PRESETS[preset], "float32"))
        ref = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
        ids = torch.tensor([[5, 6, 7, 8]])
        with torch.no_grad():
            expected = ref(ids).logits[0]
        llm = Model(path)
        with torch.inference_mode():
            ours = llm.transformer.forward(ids[0], llm.transformer.new_cache(16), 0, all_logits=True)
        assert (ours - expected).abs().max().item() < 1e-4
