"""A GGUF file as a checkpoint: metadata -> :class:`ModelConfig`, llama.cpp tensor names ->
the Hugging Face names the forward asks for, tensors read in place by offset.

:class:`GGUFCheckpoint` has the interface of :class:`~flashtier.checkpoint.folder.Checkpoint`
(``config``, ``tensors``, ``read_tensor``...), so every weight accessor, the planner and the expert
caches work on it unchanged. Tensors in a quantized block format keep their bytes: their
:class:`TensorInfo` has ``ggml_type`` set, and ``read_tensor`` returns a
:class:`~flashtier.runtime.quantized.QuantizedTensor`. A stacked expert tensor
(``blk.N.ffn_gate_exps.weight``, ``[E, I, H]``) becomes ``E`` tensors, each a contiguous slab of
it, named like the experts of a Hugging Face Mixtral / Qwen2-MoE checkpoint.

Rotary embeddings: llama.cpp's converter permutes the q and k rows of ``llama`` models for its
"norm" rope mode (adjacent pairs). Instead of undoing the permutation, the config says
``rope.interleaved``: rotating adjacent pairs of permuted rows is the original rotation of the
original rows, and q.k products are unchanged by applying the same permutation to both, so the
function computed is the original model's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flashtier.checkpoint.ggml_types import GGMLType, type_info
from flashtier.checkpoint.gguf_format import GGUFFile, GGUFTensor, read_gguf
from flashtier.errors import CheckpointError, UnsupportedModelError
from flashtier.checkpoint.folder import EMBED, FINAL_NORM, LM_HEAD, expected_shapes, layer_names, lm_head_name
from flashtier.checkpoint.config import SUPPORTED_ACTIVATIONS, ModelConfig, RopeConfig
from flashtier.storage_backends.safetensors_format import TensorInfo

GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen2moe": "Qwen2MoeForCausalLM"}
"""GGUF ``general.architecture`` values flashtier runs (a ``llama`` file with experts is Mixtral)."""

PLAIN = {GGMLType.F32: "F32", GGMLType.F16: "F16", GGMLType.BF16: "BF16"}


def _meta(g: GGUFFile, key: str, default: Any = None, *, required: bool = False) -> Any:
    if key in g.metadata:
        return g.metadata[key]
    if required:
        raise CheckpointError(f"{g.path}: metadata key {key!r} is missing; the GGUF file is incomplete")
    return default


def _int(g: GGUFFile, key: str, default: int | None = None, *, required: bool = False) -> int | None:
    v = _meta(g, key, default, required=required)
    if v is None:
        return None
    if isinstance(v, np.ndarray):  # per-layer arrays (e.g. head_count_kv): flashtier needs one value
        if len(set(int(x) for x in v)) != 1:
            raise UnsupportedModelError(f"{g.path}: {key} differs between layers ({list(v)[:8]}...); not supported")
        v = v[0]
    try:
        return int(v)
    except (TypeError, ValueError):
        raise CheckpointError(f"{g.path}: metadata {key}={v!r} is not an integer; the GGUF file is corrupt") from None


def config_from_gguf(g: GGUFFile) -> ModelConfig:
    """The model config of GGUF file ``g`` (raises naming the file and key for anything wrong)."""
    arch = _meta(g, "general.architecture", required=True)
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{g.path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(GGUF_ARCHITECTURES)} "
            "(llama covers Llama, Mistral and Mixtral files)")
    a = arch
    hidden = _int(g, f"{a}.embedding_length", required=True)
    layers = _int(g, f"{a}.block_count", required=True)
    heads = _int(g, f"{a}.attention.head_count", required=True)
    kv_heads = _int(g, f"{a}.attention.head_count_kv", heads)
    head_dim = _int(g, f"{a}.attention.key_length", None) or (hidden // heads if heads else 0)
    embd = g.tensors.get("token_embd.weight")
    if embd is None:
        raise CheckpointError(f"{g.path}: tensor 'token_embd.weight' is missing"
                              + (f" (it is of unsupported type {g.unsupported['token_embd.weight']})"
                                 if "token_embd.weight" in g.unsupported else ""))
    vocab = _int(g, f"{a}.vocab_size", None) or embd.shape[0]
    experts = _int(g, f"{a}.expert_count", 0) or 0
    used = _int(g, f"{a}.expert_used_count", 0) or 0
    ff = _int(g, f"{a}.feed_forward_length", 0) or 0
    moe_ff = _int(g, f"{a}.expert_feed_forward_length", 0) or 0
    shared_ff = _int(g, f"{a}.expert_shared_feed_forward_length", 0) or 0
    if arch == "llama":
        architecture = "MixtralForCausalLM" if experts else "LlamaForCausalLM"
        if experts:
            moe_ff = moe_ff or ff
    else:
        architecture = GGUF_ARCHITECTURES[arch]
    if arch == "qwen2moe" and not shared_ff and "blk.0.ffn_gate_shexp.weight" in g.tensors:
        shared_ff = g.tensors["blk.0.ffn_gate_shexp.weight"].shape[0]
    if arch == "qwen2moe" and not moe_ff and "blk.0.ffn_gate_exps.weight" in g.tensors:
        moe_ff = g.tensors["blk.0.ffn_gate_exps.weight"].shape[1]
    if head_dim % 2:
        raise CheckpointError(f"{g.path}: head dimension {head_dim} is odd; the GGUF file is corrupt")
    rope_dims = _int(g, f"{a}.rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise UnsupportedModelError(f"{g.path}: partial rotary embeddings ({rope_dims} of {head_dim} dims) are not supported")
    scaling = str(_meta(g, f"{a}.rope.scaling.type", "none"))
    factor = float(_meta(g, f"{a}.rope.scaling.factor", 1.0) or 1.0)
    if scaling not in ("none", "linear") and not (scaling == "yarn" and factor == 1.0):
        raise UnsupportedModelError(f"{g.path}: rope scaling {scaling!r} is not supported; supported: none, linear, "
                                    "llama3 (as rope_freqs.weight)")
    freq_factors: tuple[float, ...] = ()
    if "rope_freqs.weight" in g.tensors:
        t = g.tensors["rope_freqs.weight"]
        if t.ggml_type != GGMLType.F32 or t.shape != (head_dim // 2,):
            raise CheckpointError(f"{g.path}: rope_freqs.weight must be F32 [{head_dim // 2}], got {t.ggml_type.name} {list(t.shape)}")
        freq_factors = tuple(float(v) for v in _read_plain(t).numpy())
    rope = RopeConfig(
        theta=float(_meta(g, f"{a}.rope.freq_base", 10000.0)),
        rope_type="linear" if scaling == "linear" and factor != 1.0 else "default",
        factor=factor if scaling == "linear" else 1.0,
        original_max_position_embeddings=_int(g, f"{a}.rope.scaling.original_context_length", 8192) or 8192,
        interleaved=arch == "llama",
        freq_factors=freq_factors,
    )
    eos = [_int(g, k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in g.metadata]
    bos = _int(g, "tokenizer.ggml.bos_token_id", None)
    if experts and not 0 < used <= experts:
        raise CheckpointError(f"{g.path}: {a}.expert_used_count={used} must be in 1..{experts}")
    act = str(_meta(g, "flashtier.hidden_act", "silu"))
    if act not in SUPPORTED_ACTIVATIONS:
        raise UnsupportedModelError(f"{g.path}: flashtier.hidden_act {act!r} is not supported; supported: {', '.join(SUPPORTED_ACTIVATIONS)}")
    window = _int(g, f"{a}.attention.sliding_window", None)
    cfg = ModelConfig(
        architecture=architecture,
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=ff if not (arch == "llama" and experts) else moe_ff,
        max_position_embeddings=_int(g, f"{a}.context_length", 4096) or 4096,
        rms_norm_eps=float(_meta(g, f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
        hidden_act=act,
        rope=rope,
        tie_word_embeddings="output.weight" not in g.tensors and "output.weight" not in g.unsupported,
        attention_bias="blk.0.attn_q.bias" in g.tensors,
        sliding_window=window or None,
        num_experts=experts,
        num_experts_per_tok=used,
        moe_intermediate_size=moe_ff if experts else 0,
        norm_topk_prob=bool(_meta(g, f"{a}.expert_weights_norm", arch != "qwen2moe")),
        shared_expert_intermediate_size=shared_ff,
        moe_layers=tuple(experts > 0 and f"blk.{i}.ffn_gate_inp.weight" in g.tensors for i in range(layers)),
        bos_token_id=bos,
        eos_token_ids=tuple(dict.fromkeys(e for e in eos if e is not None)),
    )
    cfg.validate(str(g.path))
    return cfg


def _read_plain(t: GGUFTensor) -> torch.Tensor:
    """A small plain (F32/F16/BF16) tensor read into memory."""
    from flashtier.checkpoint.folder import read_tensor

    return read_tensor(_info(t.name, t, t.offset, t.nbytes, t.shape))


def _info(hf_name: str, t: GGUFTensor, offset: int, nbytes: int, shape: tuple[int, ...]) -> TensorInfo:
    plain = PLAIN.get(t.ggml_type)
    crc = t.crc32 if (offset, nbytes) == (t.offset, t.nbytes) else None
    if crc is None and t.slice_crc32 and nbytes * len(t.slice_crc32) == t.nbytes and (offset - t.offset) % nbytes == 0:
        crc = t.slice_crc32[(offset - t.offset) // nbytes]  # one expert of a stacked tensor
    return TensorInfo(hf_name, plain or t.ggml_type.name, tuple(shape), t.path, offset, nbytes,
                      None if plain else int(t.ggml_type), crc)


def hf_tensor_map(g: GGUFFile, cfg: ModelConfig) -> dict[str, TensorInfo]:
    """Hugging Face name -> where its bytes are in ``g`` (expert slabs of stacked tensors included)."""
    out: dict[str, TensorInfo] = {}
    t = g.tensors

    def put(hf: str, gg: str, shape: tuple[int, ...] | None = None) -> None:
        if gg not in t:
            return
        src = t[gg]
        out[hf] = _info(hf, src, src.offset, src.nbytes, shape or src.shape)

    put(EMBED, "token_embd.weight")
    put(FINAL_NORM, "output_norm.weight")
    put(LM_HEAD, "output.weight")
    for i in range(cfg.num_layers):
        n, b = layer_names(cfg, i), f"blk.{i}."
        put(n.input_norm, b + "attn_norm.weight")
        put(n.post_attn_norm, b + "ffn_norm.weight")
        if cfg.architecture == "Qwen2MoeForCausalLM" or (n.post_attn_norm not in out and b + "post_attention_norm.weight" in t):
            put(n.post_attn_norm, b + "post_attention_norm.weight")
        for hf, gg in ((n.q, "attn_q"), (n.k, "attn_k"), (n.v, "attn_v"), (n.o, "attn_output")):
            put(hf, b + gg + ".weight")
        for hf, gg in ((n.q_bias, "attn_q"), (n.k_bias, "attn_k"), (n.v_bias, "attn_v")):
            if hf:
                put(hf, b + gg + ".bias")
        if n.gate:
            put(n.gate, b + "ffn_gate.weight")
            put(n.up, b + "ffn_up.weight")
            put(n.down, b + "ffn_down.weight")
        if n.router:
            put(n.router, b + "ffn_gate_inp.weight")
            for part, gg in enumerate(("ffn_gate", "ffn_up", "ffn_down")):
                stacked = t.get(f"{b}{gg}_exps.weight")
                for e in range(cfg.num_experts):
                    hf = n.expert(e)[part]
                    if stacked is None:
                        put(hf, f"{b}{gg}.{e}.weight")  # older files: one tensor per expert
                        continue
                    if len(stacked.shape) != 3 or stacked.shape[0] != cfg.num_experts:
                        raise CheckpointError(f"{g.path}: {stacked.name} has shape {list(stacked.shape)}, "
                                              f"expected [{cfg.num_experts}, rows, cols]")
                    shape = stacked.shape[1:]
                    size = type_info(stacked.ggml_type).nbytes(shape)
                    out[hf] = _info(hf, stacked, stacked.offset + e * size, size, shape)
        if n.shared_gate:
            put(n.shared_gate, b + "ffn_gate_shexp.weight")
            put(n.shared_up, b + "ffn_up_shexp.weight")
            put(n.shared_down, b + "ffn_down_shexp.weight")
            src = t.get(b + "ffn_gate_inp_shexp.weight")
            if src is not None:
                out[n.shared_expert_gate] = _info(n.shared_expert_gate, src, src.offset, src.nbytes, (1, cfg.hidden_size))
    return out


def _gguf_name(hf: str) -> str:
    """Best-effort llama.cpp name of a Hugging Face tensor name (for error messages)."""
    parts = hf.split(".")
    if hf == EMBED:
        return "token_embd.weight"
    if hf == FINAL_NORM:
        return "output_norm.weight"
    if hf == LM_HEAD:
        return "output.weight"
    if len(parts) > 2 and parts[1] == "layers":
        return f"blk.{parts[2]}.({'.'.join(parts[3:])})"
    return hf


class GGUFCheckpoint:
    """A validated GGUF file with the interface of ``Checkpoint`` (see module doc).

    ``model_dir`` is the folder holding the file (for messages and side files); ``path`` the file.
    Construction reads only the header (and ``rope_freqs.weight`` when present)."""

    is_gguf = True

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.model_dir = self.path.parent
        self.gguf = read_gguf(self.path)
        self.config = config_from_gguf(self.gguf)
        self.tensors = hf_tensor_map(self.gguf, self.config)
        self._validate()

    def _validate(self) -> None:
        g = self.gguf
        for name, shape in expected_shapes(self.config).items():
            info = self.tensors.get(name)
            if info is None:
                gname = _gguf_name(name)
                bad = [k for k in g.unsupported if k.startswith(gname.split("(")[0])] if "(" in gname else (
                    [gname] if gname in g.unsupported else [])
                if bad:
                    from flashtier.checkpoint.ggml_types import SUPPORTED_NAMES

                    raise UnsupportedModelError(
                        f"{self.path}: tensor {bad[0]!r} is of type {g.unsupported[bad[0]]}, which flashtier does not "
                        f"compute with; supported: {SUPPORTED_NAMES} (Q4_K_M, Q5_K_M, Q6_K and Q8_0 files load)")
                raise CheckpointError(f"{self.path}: tensor {gname!r} is missing ({self.config.architecture} needs it "
                                      f"for {name}); the file is incomplete or of another architecture")
            if info.shape != shape:
                raise CheckpointError(f"{self.path}: tensor for {name} has shape {list(info.shape)}, but the metadata "
                                      f"implies {list(shape)}; the file is inconsistent")
            if info.quantized and len(shape) == 1:
                raise CheckpointError(f"{self.path}: 1-D tensor for {name} is quantized ({info.dtype}); "
                                      "norms and biases must be F32, F16 or BF16")

    @property
    def lm_head(self) -> str:
        return lm_head_name(self.config, set(self.tensors))

    @property
    def weights_dtype(self) -> torch.dtype:
        """Compute dtype by default: fp32, as llama.cpp computes (weights are dequantized in registers)."""
        return torch.float32

    def read_tensor(self, name: str, huge_pages: bool = False) -> Any:
        """The tensor ``name``: a torch tensor for plain types, a ``QuantizedTensor`` for blocks
        (``huge_pages``: see :func:`~flashtier.checkpoint.folder.read_tensor`)."""
        from flashtier.checkpoint.folder import read_tensor

        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} is not in the checkpoint")
        return read_tensor(info, huge_pages)

    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def type_counts(self) -> dict[str, int]:
        """Bytes per weight type (e.g. ``{"Q4_K": ..., "Q6_K": ..., "F32": ...}``)."""
        out: dict[str, int] = {}
        for t in self.tensors.values():
            out[t.dtype] = out.get(t.dtype, 0) + t.nbytes
        return out


def find_gguf(path: Path) -> Path | None:
    """The GGUF file ``path`` names: the file itself, or the one ``*.gguf`` of a folder without
    ``config.json``. None when ``path`` is not a GGUF model; an error for a folder of several."""
    if path.is_file():
        return path if path.suffix == ".gguf" or _has_magic(path) else None
    if path.is_dir() and not (path / "config.json").is_file():
        files = sorted(p for p in path.glob("*.gguf") if p.is_file())
        if len(files) > 1:
            raise CheckpointError(f"{path} holds {len(files)} GGUF files ({', '.join(p.name for p in files[:4])}); "
                                  "pass the file to run")
        return files[0] if files else None
    return None


def _has_magic(path: Path) -> bool:
    from flashtier.checkpoint.gguf_format import is_gguf

    return is_gguf(path)
