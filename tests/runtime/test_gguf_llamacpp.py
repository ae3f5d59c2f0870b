"""GGUF files against llama.cpp itself (llama-cpp-python; installed by scripts/test.sh, skipped with
a reason where it could not be built): files flashtier writes load in llama.cpp and compute the
same model; files llama.cpp's quantizer writes run in flashtier exactly (vs. the dequantized
network)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from flashtier.runtime.engine import Model

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (bash scripts/install_llamacpp.sh)")
from flashtier.benchmarks.peers import llamacpp  # noqa: E402

HERE = Path(__file__).parent
spec = importlib.util.spec_from_file_location("gguf_models", HERE / "gguf_models.py")
gm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gm)

PROMPT = [5, 77, 19, 230, 101, 3, 64, 64, 12, 299, 150, 42, 8, 200, 17, 90]


def _ours(path: Path) -> np.ndarray:
    llm = Model(path)
    with torch.inference_mode():
        return llm.transformer.forward(torch.tensor(PROMPT), llm.transformer.new_cache(16), 0, all_logits=True).numpy()


@pytest.mark.parametrize("kind,ftype", [("llama", "f32"), ("llama", "q8_0"), ("qwen2", "q8_0"), ("mixtral", "q8_0")])
def test_llamacpp_loads_our_files_and_computes_the_same_model(tmp_path, kind, ftype):
    """F32: llama.cpp's logits equal ours up to its f16 KV cache (measured 4.6e-4 of the largest
    logit; a wrong q/k permutation or rope would be off by O(1)); Q8_0: llama.cpp quantizes activations to 8 bits in its dot products (an
    approximation flashtier does not make), so the logits agree to ~1% and the argmax nearly always."""
    path, _ = gm.make_gguf(kind, tmp_path, ftype)
    ref = llamacpp.logits(path, PROMPT)
    ours = _ours(path)
    scale = np.abs(ours).max()
    diff = np.abs(ref - ours).max() / scale
    if ftype == "f32":
        assert diff < 2e-3, diff
    else:
        assert diff < 0.05, diff
        assert (ref.argmax(-1) == ours.argmax(-1)).mean() >= 0.85


@pytest.mark.parametrize("kind,ftype", [("llama", "q4_k_m"), ("mixtral", "q4_k_m"), ("qwen2", "q6_k")])
def test_files_from_llamacpps_quantizer_run_exactly(tmp_path, kind, ftype):
    f16, _ = gm.make_gguf(kind, tmp_path, "f16")
    out = llamacpp.quantize(f16, tmp_path / f"{kind}-{ftype}-llamacpp.gguf", ftype)
    ref = gm.dequantized_reference(out, tmp_path / "hf", tmp_path / "deq")
    with torch.no_grad():
        expected = ref(torch.tensor([PROMPT])).logits[0].numpy()
    ours = _ours(out)
    assert np.abs(ours - expected).max() < 1e-4 * np.abs(expected).max()
    theirs = llamacpp.logits(out, PROMPT)
    assert (theirs.argmax(-1) == ours.argmax(-1)).mean() >= 0.85
