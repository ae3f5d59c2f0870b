"""``flashtier quantize``: a Hugging Face checkpoint -> a GGUF file that llama.cpp and flashtier run.

Tensors get llama.cpp's names and, per file type (``q4_k_m``, ``q8_0``...), llama.cpp's choice of
block format per tensor (:mod:`flashtier.checkpoint.quant_mix`). For the ``llama`` architecture
(Llama, Mistral, Mixtral) the q and k rows are permuted as llama.cpp's converter does, so that its
"norm" rope computes the original model; flashtier reads such files with interleaved rope (see
``gguf_checkpoint``). MoE experts are stacked into ``ffn_{gate,up,down}_exps`` ``[E, rows, cols]``.
The tokenizer (byte-level BPE ``tokenizer.json``) and chat template go into the metadata.

One tensor is held in memory at a time; the file is written to a temporary sibling and renamed
(an existing output needs ``force``), with a crc32 of every tensor in its metadata.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flashtier.checkpoint.ggml_types import GGMLType
from flashtier.checkpoint.gguf_format import TensorToWrite, write_gguf
from flashtier.errors import CheckpointError, ConfigError, UnsupportedModelError
from flashtier.checkpoint.folder import EMBED, FINAL_NORM, Checkpoint, layer_names
from flashtier.checkpoint.config import ModelConfig

FILE_TYPE_IDS = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "q4_k_s": 14, "q4_k_m": 15, "q5_k_s": 16, "q5_k_m": 17,
                 "q6_k": 18, "bf16": 32}
"""llama.cpp's ``general.file_type`` (``enum llama_ftype``) of each file type flashtier writes."""

ARCH = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "MixtralForCausalLM": "llama",
        "Qwen2ForCausalLM": "qwen2", "Qwen2MoeForCausalLM": "qwen2moe"}


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order for ``n_head`` heads: within each head, row ``2i`` is the original
    row ``i`` and row ``2i+1`` the original row ``i + D/2`` (``w`` ``[n_head*D, ...]``)."""
    shape = w.shape
    return w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _metadata(cfg: ModelConfig, name: str, file_type: str) -> dict[str, Any]:
    a = ARCH[cfg.architecture]
    md: dict[str, Any] = {
        "general.architecture": a,
        "general.name": name,
        "general.file_type": FILE_TYPE_IDS[file_type],
        "general.quantization_version": 2,
        f"{a}.context_length": cfg.max_position_embeddings,
        f"{a}.embedding_length": cfg.hidden_size,
        f"{a}.block_count": cfg.num_layers,
        f"{a}.feed_forward_length": cfg.intermediate_size,
        f"{a}.attention.head_count": cfg.num_heads,
        f"{a}.attention.head_count_kv": cfg.num_kv_heads,
        f"{a}.attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps),
        f"{a}.rope.freq_base": float(cfg.rope.theta),
        f"{a}.rope.dimension_count": cfg.head_dim,
        f"{a}.vocab_size": cfg.vocab_size,
    }
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size:
        md[f"{a}.attention.key_length"] = cfg.head_dim
        md[f"{a}.attention.value_length"] = cfg.head_dim
    if cfg.rope.rope_type == "linear":
        md[f"{a}.rope.scaling.type"] = "linear"
        md[f"{a}.rope.scaling.factor"] = float(cfg.rope.factor)
    if cfg.is_moe:
        md[f"{a}.expert_count"] = cfg.num_experts
        md[f"{a}.expert_used_count"] = cfg.num_experts_per_tok
        if a == "qwen2moe":
            md[f"{a}.expert_feed_forward_length"] = cfg.moe_intermediate_size
            md[f"{a}.expert_shared_feed_forward_length"] = cfg.shared_expert_intermediate_size
            md[f"{a}.expert_weights_norm"] = bool(cfg.norm_topk_prob)
        else:
            md[f"{a}.feed_forward_length"] = cfg.moe_intermediate_size
    if cfg.hidden_act != "silu":
        # llama.cpp's llama / qwen2 graphs always use SiLU; flashtier honours this key (llama.cpp
        # still loads the file, but computes another function: `quantize` says so).
        md[HIDDEN_ACT_KEY] = cfg.hidden_act
    if cfg.sliding_window:
        md[f"{a}.attention.sliding_window"] = cfg.sliding_window
    return md


GPT2_REGEX_PRE = "gpt-2"
HIDDEN_ACT_KEY = "flashtier.hidden_act"
"""Activation of a model whose FFN is not SiLU (the shipped tiny models use ReLU)."""


def tokenizer_metadata(model_dir: Path, cfg: ModelConfig) -> tuple[dict[str, Any], dict[str, int]]:
    """``tokenizer.*`` metadata (and value types) from a folder's ``tokenizer.json``; empty when it
    has none. Byte-level BPE tokenizers with GPT-2's pre-tokenizer are supported."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return placeholder_vocabulary(cfg), {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        model = doc["model"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a readable tokenizer ({e})") from e
    pre = doc.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True):
        raise UnsupportedModelError(
            f"{path}: only byte-level BPE tokenizers with GPT-2's pre-tokenizer can be written to GGUF "
            f"(this one is {model.get('type')} with {pre.get('type')}); pass --no-tokenizer to write the weights alone")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in doc.get("added_tokens", [])}
    for t in added.values():
        vocab[t["content"]] = int(t["id"])
    size = max(cfg.vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [TOKEN_UNUSED] * size
    for t, i in vocab.items():
        tokens[i] = t
        types[i] = 3 if t in added and added[t].get("special", False) else (4 if t in added else 1)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    md: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": GPT2_REGEX_PRE,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": np.asarray(types, dtype="<i4"),
        "tokenizer.ggml.merges": merges,
    }
    cfg_path = model_dir / "tokenizer_config.json"
    tcfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    for key, field in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("pad_token", "padding_token_id")):
        tok = tcfg.get(key)
        tok = tok.get("content") if isinstance(tok, dict) else tok
        if isinstance(tok, str) and tok in vocab:
            md[f"tokenizer.ggml.{field}"] = vocab[tok]
    if "tokenizer.ggml.eos_token_id" not in md and cfg.eos_token_ids:
        md["tokenizer.ggml.eos_token_id"] = cfg.eos_token_ids[0]
    if "tokenizer.ggml.bos_token_id" not in md and cfg.bos_token_id is not None:
        md["tokenizer.ggml.bos_token_id"] = cfg.bos_token_id
    md["tokenizer.ggml.add_bos_token"] = bool(tcfg.get("add_bos_token", False))
    if isinstance(tcfg.get("chat_template"), str):
        md["tokenizer.chat_template"] = tcfg["chat_template"]
    return md, {}


TOKEN_UNUSED = 5
PLACEHOLDER_KEY = "flashtier.placeholder_vocabulary"
"""Set on files written from a checkpoint without a tokenizer: llama.cpp needs a vocabulary to
load a file, so one of the right size is written, and flashtier treats the file as having no
tokenizer (prompts are token ids)."""


def placeholder_vocabulary(cfg: ModelConfig) -> dict[str, Any]:
    """A SentencePiece-style vocabulary of ``cfg.vocab_size`` tokens that carries no meaning."""
    n = cfg.vocab_size
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    types = [2, 3, 3] + [6] * 256
    tokens = (tokens + [f"\u2581t{i}" for i in range(max(0, n - len(tokens)))])[:n]
    types = (types + [1] * max(0, n - len(types)))[:n]
    md: dict[str, Any] = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
                          "tokenizer.ggml.scores": np.zeros(n, dtype="<f4"),
                          "tokenizer.ggml.token_type": np.asarray(types, dtype="<i4"), PLACEHOLDER_KEY: True}
    if cfg.bos_token_id is not None:
        md["tokenizer.ggml.bos_token_id"] = cfg.bos_token_id
    if cfg.eos_token_ids:
        md["tokenizer.ggml.eos_token_id"] = cfg.eos_token_ids[0]
    return md


def _plan_tensors(ck: Checkpoint, file_type: str) -> list[tuple[str, tuple[int, ...], int, Callable[[], np.ndarray]]]:
    """(gguf name, shape, layer, fp32 loader) of every tensor to write, in file order."""
    cfg = ck.config
    perm = ARCH[cfg.architecture] == "llama"

    def load(name: str, heads: int = 0) -> Callable[[], np.ndarray]:
        def f() -> np.ndarray:
            w = ck.read_tensor(name).float().numpy()
            return permute_rows(w, heads) if heads else w
        return f

    def stack(names: list[str]) -> Callable[[], np.ndarray]:
        return lambda: np.stack([ck.read_tensor(n).float().numpy() for n in names])

    out = [("token_embd.weight", ck.tensors[EMBED].shape, -1, load(EMBED))]
    for i in range(cfg.num_layers):
        n, b = layer_names(cfg, i), f"blk.{i}."
        sh = lambda name: ck.tensors[name].shape  # noqa: E731
        out.append((b + "attn_norm.weight", sh(n.input_norm), i, load(n.input_norm)))
        out.append((b + "attn_q.weight", sh(n.q), i, load(n.q, cfg.num_heads if perm else 0)))
        out.append((b + "attn_k.weight", sh(n.k), i, load(n.k, cfg.num_kv_heads if perm else 0)))
        out.append((b + "attn_v.weight", sh(n.v), i, load(n.v)))
        if n.q_bias:
            out.append((b + "attn_q.bias", sh(n.q_bias), i, load(n.q_bias, cfg.num_heads if perm else 0)))
            out.append((b + "attn_k.bias", sh(n.k_bias), i, load(n.k_bias, cfg.num_kv_heads if perm else 0)))
            out.append((b + "attn_v.bias", sh(n.v_bias), i, load(n.v_bias)))
        out.append((b + "attn_output.weight", sh(n.o), i, load(n.o)))
        out.append((b + "ffn_norm.weight", sh(n.post_attn_norm), i, load(n.post_attn_norm)))
        if n.gate:
            out += [(b + "ffn_gate.weight", sh(n.gate), i, load(n.gate)), (b + "ffn_up.weight", sh(n.up), i, load(n.up)),
                    (b + "ffn_down.weight", sh(n.down), i, load(n.down))]
        if n.router:
            out.append((b + "ffn_gate_inp.weight", sh(n.router), i, load(n.router)))
            for part, gg in enumerate(("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")):
                names = [n.expert(e)[part] for e in range(cfg.num_experts)]
                out.append((f"{b}{gg}.weight", (cfg.num_experts, *sh(names[0])), i, stack(names)))
        if n.shared_gate:
            out += [(b + "ffn_gate_inp_shexp.weight", (cfg.hidden_size,), i,
                     lambda nm=n.shared_expert_gate: ck.read_tensor(nm).float().numpy().reshape(-1)),
                    (b + "ffn_gate_shexp.weight", sh(n.shared_gate), i, load(n.shared_gate)),
                    (b + "ffn_up_shexp.weight", sh(n.shared_up), i, load(n.shared_up)),
                    (b + "ffn_down_shexp.weight", sh(n.shared_down), i, load(n.shared_down))]
    out.append(("output_norm.weight", ck.tensors[FINAL_NORM].shape, -1, load(FINAL_NORM)))
    if ck.lm_head != EMBED:
        out.append(("output.weight", ck.tensors[ck.lm_head].shape, -1, load(ck.lm_head)))
    if cfg.rope.rope_type == "llama3":
        from flashtier.checkpoint.config import RopeConfig, rope_inv_freq

        plain = rope_inv_freq(cfg.head_dim, RopeConfig(theta=cfg.rope.theta))
        factors = (plain / rope_inv_freq(cfg.head_dim, cfg.rope)).numpy().astype(np.float32)
        out.append(("rope_freqs.weight", (cfg.head_dim // 2,), -1, lambda: factors))
    return out


def quantize_checkpoint(model_dir: str | Path, out: str | Path, file_type: str = "q4_k_m", force: bool = False,
                        with_tokenizer: bool = True, progress: Callable[[int, int], None] | None = None) -> Path:
    """Write ``model_dir`` (a Hugging Face folder) as a GGUF of ``file_type`` at ``out``."""
    from flashtier.checkpoint.quant_mix import FILE_TYPES, choose_type
    from flashtier.checkpoint.quants import quantize

    if file_type not in FILE_TYPES or file_type not in FILE_TYPE_IDS:
        raise ConfigError(f"--type {file_type!r} is unknown; choose one of {', '.join(t for t in FILE_TYPE_IDS if t in FILE_TYPES)}")
    model_dir = Path(model_dir)
    ck = Checkpoint(model_dir)
    cfg = ck.config
    out = Path(out)
    if out.is_dir():
        raise CheckpointError(f"{out} is a folder; give the path of the .gguf file to write")
    md = _metadata(cfg, model_dir.name, file_type)
    types: dict[str, int] = {}
    if with_tokenizer:
        tmd, types = tokenizer_metadata(model_dir, cfg)
        md.update(tmd)
    plan = _plan_tensors(ck, file_type)

    def writer(name: str, shape: tuple[int, ...], gtype: GGMLType, load: Callable[[], np.ndarray]) -> TensorToWrite:
        def data() -> np.ndarray:
            w = np.ascontiguousarray(load(), dtype=np.float32)
            return quantize(w.reshape(-1, shape[-1]), gtype)  # [rows, row_bytes] (experts stacked)
        return TensorToWrite(name, tuple(shape), gtype, data)

    tied = ck.lm_head == EMBED
    tensors = [writer(name, shape, choose_type(file_type, name, tuple(shape), layer, cfg.num_layers,
                                               n_expert=cfg.num_experts, tied_embeddings=tied), load)
               for name, shape, layer, load in plan]
    return write_gguf(out, md, tensors, metadata_types=types, force=force, progress=progress)
