"""Model configuration: the fields of a Hugging Face ``config.json`` that the forward needs.

:func:`ModelConfig.from_hf` normalises the five supported architectures (and both the
transformers 4 ``rope_theta``/``rope_scaling`` and transformers 5 ``rope_parameters`` spellings)
into one frozen dataclass, and rejects anything it cannot run with a message that says why.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flashtier.errors import CheckpointError, ConfigError, UnsupportedModelError

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "MixtralForCausalLM",
    "Qwen2MoeForCausalLM",
)
SUPPORTED_ACTIVATIONS = ("silu", "relu", "gelu", "gelu_pytorch_tanh", "gelu_new")
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


@dataclass(frozen=True, slots=True)
class RopeConfig:
    """Rotary embedding parameters (``rope_type`` default, linear or llama3)."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    interleaved: bool = False
    """Rotate adjacent pairs (GPT-J / ggml "norm" mode) instead of the two halves of a head: GGUF
    llama files store q/k rows permuted for it, so this computes the original model's function."""
    freq_factors: tuple[float, ...] = ()
    """Per-frequency divisors of the inverse frequencies (GGUF ``rope_freqs.weight``: llama3
    scaling precomputed by the converter); empty = none."""


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Architecture of a decoder-only transformer, dense or MoE."""

    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    hidden_act: str
    rope: RopeConfig
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    """q/k/v projections carry a bias (Qwen2 always; Llama when ``attention_bias``)."""
    sliding_window: int | None = None
    # --- MoE (num_experts == 0 for dense models) ---
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = 0
    moe_layers: tuple[bool, ...] = field(default=())
    """Per layer: True when the layer's FFN is a mixture of experts."""
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def family(self) -> str:
        """Tensor naming family: 'llama' (Llama/Mistral/Qwen2), 'mixtral' or 'qwen2_moe'."""
        return {"MixtralForCausalLM": "mixtral", "Qwen2MoeForCausalLM": "qwen2_moe"}.get(self.architecture, "llama")

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        """Read ``config.json`` (and ``generation_config.json`` for stop tokens) from a folder."""
        model_dir = Path(model_dir)
        if not model_dir.exists():
            raise CheckpointError(f"model folder {model_dir} does not exist; pass a folder with config.json and *.safetensors")
        if not model_dir.is_dir():
            raise CheckpointError(f"{model_dir} is not a folder; pass the model folder, not a file in it")
        path = model_dir / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{model_dir} has no config.json; is this a Hugging Face model folder?")
        raw = _read_json(path)
        gen_path = model_dir / "generation_config.json"
        gen = _read_json(gen_path) if gen_path.is_file() else {}
        return cls.from_hf(raw, generation=gen, source=str(path))

    @classmethod
    def from_hf(cls, raw: dict[str, Any], generation: dict[str, Any] | None = None, source: str = "config.json") -> "ModelConfig":
        """Build from the parsed JSON of a Hugging Face config."""
        archs = raw.get("architectures") or []
        arch = archs[0] if archs else _arch_from_model_type(raw.get("model_type"))
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"{source}: architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            hidden = _field(raw, "hidden_size", int, _MISSING, source)
            num_heads = _field(raw, "num_attention_heads", int, _MISSING, source)
            num_layers = _field(raw, "num_hidden_layers", int, _MISSING, source)
            vocab = _field(raw, "vocab_size", int, _MISSING, source)
            missing = [k for k, v in (("hidden_size", hidden), ("num_attention_heads", num_heads),
                                      ("num_hidden_layers", num_layers), ("vocab_size", vocab)) if v is _MISSING]
            if missing:
                raise KeyError(", ".join(missing))
            intermediate = _field(raw, "intermediate_size", int, 0, source, null_default=True)
        except KeyError as e:
            raise CheckpointError(f"{source}: missing field {e}; the config is incomplete") from e
        if num_heads <= 0:
            raise CheckpointError(f"{source}: num_attention_heads={num_heads} must be positive")
        num_kv = _field(raw, "num_key_value_heads", int, num_heads, source, null_default=True)
        head_dim = _field(raw, "head_dim", int, hidden // num_heads, source, null_default=True)
        act = raw.get("hidden_act", "silu")
        if act not in SUPPORTED_ACTIVATIONS:
            raise UnsupportedModelError(f"{source}: hidden_act {act!r} is not supported; supported: {', '.join(SUPPORTED_ACTIVATIONS)}")

        num_experts, top_k, moe_inter, shared_inter, norm_topk = 0, 0, 0, 0, True
        moe_layers = tuple(False for _ in range(num_layers))
        if arch == "MixtralForCausalLM":
            num_experts = _field(raw, "num_local_experts", int, 8, source)
            top_k = _field(raw, "num_experts_per_tok", int, 2, source)
            moe_inter = intermediate
            moe_layers = tuple(True for _ in range(num_layers))
        elif arch == "Qwen2MoeForCausalLM":
            num_experts = _field(raw, "num_experts", int, 0, source)
            top_k = _field(raw, "num_experts_per_tok", int, 0, source)
            moe_inter = _field(raw, "moe_intermediate_size", int, 0, source)
            shared_inter = _field(raw, "shared_expert_intermediate_size", int, 0, source)
            norm_topk = _field(raw, "norm_topk_prob", bool, False, source)
            step = _field(raw, "decoder_sparse_step", int, 1, source)
            if step < 1:
                raise CheckpointError(f"{source}: decoder_sparse_step={step} must be >= 1")
            mlp_only = set(raw.get("mlp_only_layers") or [])
            moe_layers = tuple(
                (i not in mlp_only) and num_experts > 0 and (i + 1) % step == 0 for i in range(num_layers)
            )
        if num_experts and not (0 < top_k <= num_experts):
            raise CheckpointError(f"{source}: num_experts_per_tok={top_k} must be in 1..{num_experts}")

        if arch == "Qwen2ForCausalLM":
            bias = True
        elif arch == "Qwen2MoeForCausalLM":
            bias = bool(raw.get("qkv_bias", True))
        else:
            bias = bool(raw.get("attention_bias", False))
        if raw.get("mlp_bias"):
            raise UnsupportedModelError(f"{source}: mlp_bias=true is not supported")

        window = raw.get("sliding_window")
        if arch in ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM") and not raw.get("use_sliding_window", False):
            window = None
        window = int(window) if window else None

        gen = generation or {}
        eos = gen.get("eos_token_id", raw.get("eos_token_id"))
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None)
        bos = gen.get("bos_token_id", raw.get("bos_token_id"))

        cfg = cls(
            architecture=arch,
            vocab_size=vocab,
            hidden_size=hidden,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv,
            head_dim=head_dim,
            intermediate_size=intermediate,
            max_position_embeddings=_field(raw, "max_position_embeddings", int, 4096, source),
            rms_norm_eps=_field(raw, "rms_norm_eps", float, 1e-6, source),
            hidden_act=act,
            rope=_rope(raw, source),
            tie_word_embeddings=_field(raw, "tie_word_embeddings", bool, False, source, null_default=True),
            attention_bias=bias,
            sliding_window=window,
            num_experts=num_experts,
            num_experts_per_tok=top_k,
            moe_intermediate_size=moe_inter,
            norm_topk_prob=norm_topk if arch == "Qwen2MoeForCausalLM" else True,
            shared_expert_intermediate_size=shared_inter,
            moe_layers=moe_layers,
            bos_token_id=int(bos) if isinstance(bos, int) else None,
            eos_token_ids=eos_ids,
        )
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "config") -> None:
        """Reject shapes the forward cannot run (raises ConfigError naming the field)."""
        checks = [
            (self.vocab_size > 0, "vocab_size must be positive"),
            (self.hidden_size > 0 and self.num_layers > 0, "hidden_size and num_hidden_layers must be positive"),
            (self.num_heads > 0 and self.num_kv_heads > 0, "attention head counts must be positive"),
            (self.num_heads % self.num_kv_heads == 0, f"num_attention_heads={self.num_heads} must be a multiple of num_key_value_heads={self.num_kv_heads}"),
            (self.head_dim % 2 == 0, f"head_dim={self.head_dim} must be even for rotary embeddings"),
            (len(self.moe_layers) == self.num_layers, "moe_layers must have one entry per layer"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"{source}: {msg}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e}); restore the file from the model's download") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object; restore the file from the model's download")
    return data


def _arch_from_model_type(model_type: object) -> str:
    return {
        "llama": "LlamaForCausalLM",
        "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "mixtral": "MixtralForCausalLM",
        "qwen2_moe": "Qwen2MoeForCausalLM",
    }.get(str(model_type), str(model_type))



_MISSING = object()


def _field(raw: dict[str, Any], key: str, kind: type, default: Any, source: str, null_default: bool = False) -> Any:
    """``raw[key]`` checked to be a JSON ``kind`` (int: an integer, not a bool; float: any number;
    bool: true/false), or ``default`` when absent (or null, with ``null_default``). A value of
    another type raises CheckpointError naming the field, the value and the type expected."""
    value = raw.get(key, _MISSING)
    if value is _MISSING or (value is None and null_default):
        return default
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        if isinstance(value, float) and value.is_integer():
            value, ok = int(value), True
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, bool)
    if not ok:
        what = {int: "an integer", float: "a finite number", bool: "true or false"}[kind]
        raise CheckpointError(f"{source}: {key} is {json.dumps(value)[:60]}, expected {what}; fix the config file")
    return value

def _rope(raw: dict[str, Any], source: str) -> RopeConfig:
    params = dict(raw.get("rope_parameters") or {})
    scaling = raw.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(f"{source}: rope_type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    return RopeConfig(
        theta=theta,
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )


def rope_inv_freq(head_dim: int, rope: RopeConfig) -> torch.Tensor:
    """Inverse frequencies ``[D/2]`` (fp32), with llama3 / linear scaling as transformers does."""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        old = rope.original_max_position_embeddings
        low_wavelen = old / rope.low_freq_factor
        high_wavelen = old / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    if rope.freq_factors:
        return inv_freq / torch.tensor(rope.freq_factors, dtype=torch.float32)
    return inv_freq
