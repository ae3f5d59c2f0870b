"""The forward pass on a CUDA GPU (``EngineConfig.device``): weights and KV on the GPU, the same
tokens as on the CPU. Bad device settings are refused on any machine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flashtier.errors import ConfigError
from flashtier.runtime.engine import EngineConfig, open_model

MODELS = Path(__file__).resolve().parents[2] / "models"
PROMPT = "def main():\n    for i in range(10):\n        "


def test_bad_device_settings_are_refused():
    with pytest.raises(ConfigError, match="'cpu', 'cuda' or 'cuda:N'"):
        EngineConfig(device="gpu")
    with pytest.raises(ConfigError, match="'cpu', 'cuda' or 'cuda:N'"):
        EngineConfig(device="cuda:x")
    with pytest.raises(ConfigError, match="needs --device-budget"):
        EngineConfig(device="cuda", dram_budget=1 << 30)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_says_so():
    with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
        EngineConfig(device="cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["tiny-moe", "tiny-dense"])
def test_cuda_forward_gives_the_cpu_tokens(name):
    kwargs = {"compute_dtype": "float32"}  # fp32 on both: only summation order differs
    with open_model(MODELS / name, **kwargs) as cpu, open_model(MODELS / name, device="cuda", **kwargs) as gpu:
        assert next(iter(gpu.weights._tensors.values())).is_cuda
        want = cpu.generate(PROMPT, max_new_tokens=24, ignore_eos=True).tokens
        got = gpu.generate(PROMPT, max_new_tokens=24, ignore_eos=True).tokens
        assert gpu.cache._k[0].is_cuda
        assert got == want
        # a second request reuses the cached prefix on the GPU
        assert gpu.generate(PROMPT, max_new_tokens=24, ignore_eos=True).tokens == want
