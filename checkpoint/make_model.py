"""Write random-weight checkpoints in Hugging Face layout (for tests and benchmarks).

The files are what ``save_pretrained`` would write: ``config.json``, ``generation_config.json``
and ``model.safetensors`` (or shards + ``model.safetensors.index.json``), loadable by transformers
and by flashtier. Presets name the shapes the benchmarks use.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from flashtier.errors import ConfigError
from flashtier.checkpoint.folder import expected_shapes
from flashtier.checkpoint.config import SUPPORTED_ARCHITECTURES, ModelConfig
from flashtier.storage_backends.safetensors_format import save_safetensors

MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
}

PRESETS: dict[str, dict[str, Any]] = {
    # ~1.7 GB bf16: the dense benchmark of the tiered-store issue.
    "dense-1.7g": dict(architectures=["LlamaForCausalLM"], hidden_size=2048, num_hidden_layers=16,
                       intermediate_size=5632, vocab_size=32000, num_attention_heads=16, num_key_value_heads=4),
    # ~1.3 GB bf16: the MoE benchmark (8 experts, top-2).
    "moe-1.3g": dict(architectures=["MixtralForCausalLM"], hidden_size=1024, num_hidden_layers=8,
                     intermediate_size=2816, vocab_size=32000, num_attention_heads=16, num_key_value_heads=4,
                     num_local_experts=8, num_experts_per_tok=2),
    # Long-context KV shape: 8 layers x 8 KV heads x 128 dims = 32 KiB of bf16 KV per token.
    "kv-long": dict(architectures=["LlamaForCausalLM"], hidden_size=1024, num_hidden_layers=8,
                    intermediate_size=2048, vocab_size=4096, num_attention_heads=8, num_key_value_heads=8,
                    head_dim=128, max_position_embeddings=262144),
    "tiny-llama": dict(architectures=["LlamaForCausalLM"], hidden_size=64, num_hidden_layers=2,
                       intermediate_size=128, vocab_size=256, num_attention_heads=4, num_key_value_heads=2),
    "tiny-mixtral": dict(architectures=["MixtralForCausalLM"], hidden_size=64, num_hidden_layers=2,
                         intermediate_size=96, vocab_size=256, num_attention_heads=4, num_key_value_heads=2,
                         num_local_experts=4, num_experts_per_tok=2),
}


@dataclass(frozen=True, slots=True)
class MakeModelSpec:
    """What to write: an HF config dict, dtype, seed, shard size."""

    config: dict[str, Any]
    dtype: str = "bfloat16"
    seed: int = 0
    max_shard_bytes: int = 2 << 30


def hf_config(overrides: dict[str, Any]) -> dict[str, Any]:
    """A complete HF config for the architecture in ``overrides`` (defaults filled in)."""
    arch = (overrides.get("architectures") or ["LlamaForCausalLM"])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(f"architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    cfg: dict[str, Any] = dict(
        architectures=[arch], model_type=MODEL_TYPES[arch], hidden_act="silu", rms_norm_eps=1e-5,
        max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, initializer_range=0.02,
    )
    if arch == "Qwen2MoeForCausalLM":
        cfg.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=128,
                   decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=False)
    cfg.update(overrides)
    cfg.setdefault("num_key_value_heads", cfg.get("num_attention_heads"))
    return cfg


def write_model(out_dir: str | Path, spec: MakeModelSpec, progress: Callable[[int, int], None] | None = None) -> Path:
    """Write a random checkpoint for ``spec`` into ``out_dir``; returns the folder."""
    out = Path(out_dir)
    cfg = hf_config(spec.config)
    cfg["torch_dtype"] = cfg["dtype"] = spec.dtype
    model_cfg = ModelConfig.from_hf(cfg, source="make-model config")
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(spec.dtype)
    if dtype is None:
        raise ConfigError(f"dtype {spec.dtype!r} unknown; use bfloat16, float16 or float32")
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(spec.seed)
    shapes = expected_shapes(model_cfg)
    std = float(cfg.get("initializer_range", 0.02))

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for i, (name, shape) in enumerate(shapes.items()):
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=dtype)
        elif name.endswith(".bias"):
            t = (torch.randn(shape, generator=gen) * std).to(dtype)
        else:
            t = (torch.randn(shape, generator=gen) * std).to(dtype)
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > spec.max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
        if progress is not None:
            progress(i + 1, len(shapes))

    for old in out.glob("model*.safetensors*"):
        old.unlink()
    if len(shards) == 1:
        save_safetensors(shards[0], out / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        total = 0
        for k, shard in enumerate(shards, 1):
            fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            save_safetensors(shard, out / fname, metadata={"format": "pt"})
            for name, t in shard.items():
                weight_map[name] = fname
                total += t.numel() * t.element_size()
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}, indent=2))
    return out
