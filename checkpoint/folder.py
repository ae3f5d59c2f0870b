"""A Hugging Face checkpoint folder: config, tensor locations across shards, validation.

The checkpoint never loads the whole file. It parses the safetensors headers of every shard into a
``name -> TensorInfo`` map (absolute file offsets), checks that every tensor the architecture needs
is present with the right shape, and reads tensors on request. Paging code reads the same byte
ranges through a storage backend instead.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flashtier.errors import CheckpointError, IntegrityError
from flashtier.tiers import hugepages
from flashtier.checkpoint.config import ModelConfig
from flashtier.storage_backends.safetensors_format import PAD_TENSOR_PREFIX, TensorInfo, read_header


@dataclass(frozen=True, slots=True)
class LayerNames:
    """Tensor names of one decoder layer. Empty strings mean "absent in this architecture"."""

    input_norm: str
    post_attn_norm: str
    q: str
    k: str
    v: str
    o: str
    q_bias: str
    k_bias: str
    v_bias: str
    # dense FFN (or Qwen2-MoE's non-MoE layers)
    gate: str
    up: str
    down: str
    # MoE
    router: str
    shared_gate: str
    shared_up: str
    shared_down: str
    shared_expert_gate: str

    def expert(self, e: int) -> tuple[str, str, str]:
        """(gate/w1, up/w3, down/w2) tensor names of expert ``e`` in this layer."""
        prefix = self.router.rsplit(".gate.weight", 1)[0]
        if ".block_sparse_moe" in prefix:
            return (f"{prefix}.experts.{e}.w1.weight", f"{prefix}.experts.{e}.w3.weight", f"{prefix}.experts.{e}.w2.weight")
        return (f"{prefix}.experts.{e}.gate_proj.weight", f"{prefix}.experts.{e}.up_proj.weight", f"{prefix}.experts.{e}.down_proj.weight")


def layer_names(cfg: ModelConfig, i: int) -> LayerNames:
    """The tensor names of layer ``i`` for ``cfg``'s architecture family."""
    p = f"model.layers.{i}."
    a = p + "self_attn."
    bias = cfg.attention_bias
    moe = cfg.moe_layers[i]
    mlp = p + ("block_sparse_moe." if cfg.family == "mixtral" else "mlp.")
    shared = cfg.family == "qwen2_moe" and moe and cfg.shared_expert_intermediate_size > 0
    return LayerNames(
        input_norm=p + "input_layernorm.weight",
        post_attn_norm=p + "post_attention_layernorm.weight",
        q=a + "q_proj.weight",
        k=a + "k_proj.weight",
        v=a + "v_proj.weight",
        o=a + "o_proj.weight",
        q_bias=a + "q_proj.bias" if bias else "",
        k_bias=a + "k_proj.bias" if bias else "",
        v_bias=a + "v_proj.bias" if bias else "",
        gate="" if moe else mlp + "gate_proj.weight",
        up="" if moe else mlp + "up_proj.weight",
        down="" if moe else mlp + "down_proj.weight",
        router=mlp + "gate.weight" if moe else "",
        shared_gate=mlp + "shared_expert.gate_proj.weight" if shared else "",
        shared_up=mlp + "shared_expert.up_proj.weight" if shared else "",
        shared_down=mlp + "shared_expert.down_proj.weight" if shared else "",
        shared_expert_gate=mlp + "shared_expert_gate.weight" if shared else "",
    )


EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"


def lm_head_name(cfg: ModelConfig, available: set[str] | None = None) -> str:
    """The output projection: ``lm_head.weight``, or the embedding when tied and absent."""
    if cfg.tie_word_embeddings and (available is None or LM_HEAD not in available):
        return EMBED
    return LM_HEAD


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the forward needs, with its shape, for ``cfg``."""
    h, v, hd = cfg.hidden_size, cfg.vocab_size, cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {EMBED: (v, h), FINAL_NORM: (h,)}
    if not cfg.tie_word_embeddings:
        shapes[LM_HEAD] = (v, h)
    for i in range(cfg.num_layers):
        n = layer_names(cfg, i)
        shapes[n.input_norm] = (h,)
        shapes[n.post_attn_norm] = (h,)
        shapes[n.q] = (cfg.num_heads * hd, h)
        shapes[n.k] = (cfg.num_kv_heads * hd, h)
        shapes[n.v] = (cfg.num_kv_heads * hd, h)
        shapes[n.o] = (h, cfg.num_heads * hd)
        if n.q_bias:
            shapes[n.q_bias] = (cfg.num_heads * hd,)
            shapes[n.k_bias] = (cfg.num_kv_heads * hd,)
            shapes[n.v_bias] = (cfg.num_kv_heads * hd,)
        if n.gate:
            shapes[n.gate] = (cfg.intermediate_size, h)
            shapes[n.up] = (cfg.intermediate_size, h)
            shapes[n.down] = (h, cfg.intermediate_size)
        if n.router:
            shapes[n.router] = (cfg.num_experts, h)
            for e in range(cfg.num_experts):
                g, u, d = n.expert(e)
                shapes[g] = (cfg.moe_intermediate_size, h)
                shapes[u] = (cfg.moe_intermediate_size, h)
                shapes[d] = (h, cfg.moe_intermediate_size)
        if n.shared_gate:
            si = cfg.shared_expert_intermediate_size
            shapes[n.shared_gate] = (si, h)
            shapes[n.shared_up] = (si, h)
            shapes[n.shared_down] = (h, si)
            shapes[n.shared_expert_gate] = (1, h)
    return shapes


class Checkpoint:
    """A validated checkpoint folder: ``config``, ``tensors`` (name -> TensorInfo), ``model_dir``.

    Construction reads only JSON and safetensors headers. It raises :class:`CheckpointError`
    naming the file or tensor for anything missing, truncated, corrupted or mis-shaped.
    """

    def __init__(self, model_dir: str | os.PathLike[str]) -> None:
        self.model_dir = Path(model_dir)
        self.config = ModelConfig.from_dir(self.model_dir)
        self.tensors = _attach_crcs(self.model_dir, _index_tensors(self.model_dir))
        self._validate()

    def _validate(self) -> None:
        for name, shape in expected_shapes(self.config).items():
            info = self.tensors.get(name)
            if info is None:
                raise CheckpointError(
                    f"{self.model_dir}: tensor {name!r} is missing from the checkpoint "
                    f"({self.config.architecture} needs it); the checkpoint is incomplete or of another architecture"
                )
            if info.shape != shape:
                raise CheckpointError(
                    f"{info.path.name}: tensor {name!r} has shape {list(info.shape)}, but config.json implies "
                    f"{list(shape)}; the weights do not match the config"
                )
            if info.dtype not in ("F32", "F16", "BF16"):
                raise CheckpointError(f"{info.path.name}: tensor {name!r} has dtype {info.dtype}; expected F32, F16 or BF16")

    @property
    def lm_head(self) -> str:
        return lm_head_name(self.config, set(self.tensors))

    @property
    def weights_dtype(self) -> torch.dtype:
        """The dtype of most of the bytes (that of the embedding)."""
        return getattr(torch, self.tensors[EMBED].torch_dtype_name)

    def read_tensor(self, name: str, huge_pages: bool = False) -> torch.Tensor:
        """Read one tensor from its file (no mmap, no page cache left behind); ``huge_pages``: into
        memory advised for transparent huge pages (a weight kept for the model's life)."""
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.model_dir}: tensor {name!r} is not in the checkpoint")
        return read_tensor(info, huge_pages)

    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def open_checkpoint(path: str | os.PathLike[str]) -> "Checkpoint | Any":
    """The checkpoint at ``path``: a Hugging Face folder (:class:`Checkpoint`), or a GGUF file or
    a folder holding one (:class:`~flashtier.checkpoint.gguf_checkpoint.GGUFCheckpoint`)."""
    from flashtier.checkpoint.gguf_checkpoint import GGUFCheckpoint, find_gguf

    p = Path(path)
    gguf = find_gguf(p)
    if gguf is not None:
        return GGUFCheckpoint(gguf)
    if p.is_file():
        raise CheckpointError(f"{p} is a file but not a GGUF file; pass a GGUF file or a Hugging Face model folder")
    return Checkpoint(p)


def read_tensor(info: TensorInfo, huge_pages: bool = False) -> Any:
    """Read the bytes of ``info`` into a new CPU tensor of its dtype and shape (a
    :class:`~flashtier.checkpoint.quantized_tensor.QuantizedTensor` for a quantized GGUF tensor). A
    recorded crc32 is checked. ``huge_pages``: the bytes in memory advised for transparent huge pages."""
    buf = hugepages.empty((info.nbytes,), torch.uint8, huge=huge_pages)
    view = memoryview(buf.numpy())
    try:
        with open(info.path, "rb", buffering=0) as f:
            fd = f.fileno()
            got = 0
            while got < info.nbytes:
                n = os.preadv(fd, [view[got:]], info.offset + got)
                if n <= 0:
                    raise CheckpointError(
                        f"{info.path}: short read of tensor {info.name!r} ({got} of {info.nbytes} bytes); "
                        "the file was truncated or changed while reading"
                    )
                got += n
            os.posix_fadvise(fd, info.offset, info.nbytes, os.POSIX_FADV_DONTNEED)
    except OSError as e:
        raise CheckpointError(f"{info.path}: cannot read tensor {info.name!r}: {e.strerror or e}") from e
    if info.crc32 is not None and zlib.crc32(buf.numpy()) != info.crc32:
        raise IntegrityError(f"{info.path}: tensor {info.name!r} does not match its crc32; the file is corrupt "
                             "(download or write it again)")
    if info.quantized:
        from flashtier.checkpoint.ggml_types import GGMLType
        from flashtier.checkpoint.quantized_tensor import QuantizedTensor

        return QuantizedTensor.from_bytes(buf, GGMLType(info.ggml_type), info.shape)
    return buf.view(getattr(torch, info.torch_dtype_name)).reshape(info.shape)


PREDICTOR_FILE = "sparsity_predictor.safetensors"
"""The sparse FFN's predictor file (:data:`flashtier.prefetch.sparsity.PREDICTOR_FILE`), which
sits next to the shards."""


CONVERTED_MANIFEST = "flashtier_experts.json"
"""Manifest of a folder ``flashtier convert`` wrote (checkpoint/expert_layout.py)."""
TENSOR_CRC_KEY = "tensor_crc32"
"""Its map of non-expert tensor name -> crc32 of the tensor's bytes."""


def _attach_crcs(model_dir: Path, tensors: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
    """``tensors`` with the crc32s a converted folder's manifest records for them (reads of those
    tensors then check them); unchanged for other folders. The manifest's own validity is checked
    with its expert extents (``expert_layout``)."""
    from dataclasses import replace

    path = model_dir / CONVERTED_MANIFEST
    if not path.is_file():
        return tensors
    try:
        crcs = json.loads(path.read_text(encoding="utf-8")).get(TENSOR_CRC_KEY) or {}
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as e:
        raise IntegrityError(f"{path}: unreadable expert manifest of a converted folder ({e}); convert the checkpoint "
                             "again") from e
    if not isinstance(crcs, dict):
        raise IntegrityError(f"{path}: {TENSOR_CRC_KEY} is not a map; convert the checkpoint again")
    out = dict(tensors)
    for name, crc in crcs.items():
        if name not in out or not isinstance(crc, int):
            raise IntegrityError(f"{path}: {TENSOR_CRC_KEY} names {name!r}, which is not a tensor of the folder "
                                 "(or has no crc32); convert the checkpoint again")
        out[name] = replace(out[name], crc32=crc)
    return out


def _index_tensors(model_dir: Path) -> dict[str, TensorInfo]:
    index_path = model_dir / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({e})") from e
        if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) and v
                                                       and "/" not in v and v not in (".", "..")
                                                       for k, v in weight_map.items()):
            raise CheckpointError(f"{index_path}: weight_map must map tensor names to shard file names in this folder "
                                  "(strings such as \"model-00001-of-00002.safetensors\"); the index is malformed")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (model_dir / f).is_file()]
        if missing:
            raise CheckpointError(f"{model_dir}: shard(s) {', '.join(missing)} named in {index_path.name} are missing")
    else:
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{model_dir}: no *.safetensors weights found (only safetensors checkpoints are supported)")
    tensors: dict[str, TensorInfo] = {}
    for fname in files:
        try:
            shard, _ = read_header(model_dir / fname)
        except CheckpointError as e:
            if fname == PREDICTOR_FILE:  # not weights, but a *.safetensors file all the same
                raise CheckpointError(f"{e} ({fname} holds the sparse FFN's predictors: re-run `flashtier calibrate "
                                      f"{model_dir} --text FILE`, or delete it)") from e
            raise
        for name, info in shard.items():
            if name.startswith(PAD_TENSOR_PREFIX):
                continue  # alignment padding of a converted layout (storage_backends.expert_layout)
            if name in tensors:
                raise CheckpointError(f"{model_dir}: tensor {name!r} appears in both {tensors[name].path.name} and {fname}")
            tensors[name] = info
    return tensors
