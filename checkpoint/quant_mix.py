"""Per-tensor type choice of llama.cpp's file types ("Q4_K_M" and friends), for llama/qwen2 models.

A file type names a base tensor type and a mix: ``choose_type`` says which ggml type one tensor of
a GGUF file of that file type gets, following ``llama_tensor_get_type`` in llama.cpp's
``src/llama-quant.cpp`` (``tensor_allows_quantization``, ``llama_tensor_get_type_impl``,
``tensor_type_fallback``), restricted to the file types in :data:`FILE_TYPES` and to the tensors of
dense and MoE llama / qwen2 models (no Falcon or other architecture special cases). In short:

* tensors that are 1-D to ggml (norms, biases, a ``[1, hidden]`` shared-expert gate), ``*_norm.weight``
  and the routers ``ffn_gate_inp`` / ``ffn_gate_inp_shexp`` are never quantized: F32 (as
  ``convert_hf_to_gguf.py`` writes them);
* F32 / F16 / BF16 files store every other tensor in their type;
* quantized file types start every other tensor at the base type, then
  - ``output.weight`` (and ``token_embd.weight`` when it doubles as the output, ``tied_embeddings``)
    becomes Q6_K, or Q8_0 when its row length is not a multiple of the base type's block;
  - ``attn_v`` (and fused ``attn_qkv`` / ``attn_kv_b``): Q4_K_M and Q5_K_M use Q6_K on the
    ``use_more_bits`` layers (the first and last eighth and every third layer between); Q4_K_S uses
    Q5_K on layers 0..3;
  - ``ffn_down`` (dense, ``_exps`` and ``_shexp`` alike, by layer): Q4_K_M and Q5_K_M use Q6_K on the
    ``use_more_bits`` layers; Q4_K_S uses Q5_K on the first eighth;
  - models with exactly 8 experts (``n_expert == 8``, Mixtral-style) get Q8_0 ``attn_v`` and
    ``attn_k``, and Q5_K ``attn_output`` in Q4_K_S / Q4_K_M;
* a row length that the chosen type's block does not divide falls back: a K-type to Q8_0 (llama.cpp
  uses Q5_0 for Q4_K and Q5_1 for Q5_K, which flashtier does not support; Q8_0 is what llama.cpp
  itself picks for Q6_K), and anything whose row length is not a multiple of 32 to F16 (llama.cpp
  uses F16 after a K-type fallback and refuses Q4_0 / Q8_0 outright).

Deviations from llama.cpp, by design: the Q5_0 / Q5_1 fallbacks above; the ``LLM_TYPE_70B`` rule
(Q4_K ``attn_v`` raised to Q5_K in 70B llamas) is not applied, since ``choose_type`` is not told the
model size; llama.cpp counts ``attn_v`` tensors in file order where this module uses the ``layer``
argument, which is the same for these architectures (one ``attn_v`` per layer, sorted by layer).
No importance matrix is assumed (its only effect on these file types is on Q4_0 ``ffn_down``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from flashtier.checkpoint.ggml_types import GGMLType, type_info


@dataclass(frozen=True, slots=True)
class FileType:
    """One llama.cpp file type: its name, base tensor type and ``general.file_type`` id."""

    name: str
    """Lower-case name as on llama-quantize's command line (``q4_k_m``)."""
    base: GGMLType
    """Type of the tensors no rule singles out (``llama_ftype_get_default_type``)."""
    llama_ftype: int
    """``enum llama_ftype`` value, stored as ``general.file_type`` in GGUF metadata."""


FILE_TYPES: dict[str, FileType] = {
    f.name: f
    for f in (
        FileType("f32", GGMLType.F32, 0),
        FileType("f16", GGMLType.F16, 1),
        FileType("bf16", GGMLType.BF16, 32),
        FileType("q8_0", GGMLType.Q8_0, 7),
        FileType("q4_0", GGMLType.Q4_0, 2),
        FileType("q4_k_s", GGMLType.Q4_K, 14),
        FileType("q4_k_m", GGMLType.Q4_K, 15),
        FileType("q5_k_s", GGMLType.Q5_K, 16),
        FileType("q5_k_m", GGMLType.Q5_K, 17),
        FileType("q6_k", GGMLType.Q6_K, 18),
    )
}
"""The file types flashtier writes, by name."""

_K_TYPES = (GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K)


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's layer pick for extra bits: the first and last eighth, and every third between."""
    eighth = n_layers // 8
    return layer < eighth or layer >= 7 * n_layers // 8 or (layer - eighth) % 3 == 2


def _category(name: str) -> str:
    """llama.cpp's ``tensor_get_category``: the first matching substring, in its order."""
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for key, cat in (
        ("attn_qkv.weight", "attn_v"),  # fused projections count as attn_v (category_is_attn_v)
        ("attn_kv_b.weight", "attn_v"),
        ("attn_v.weight", "attn_v"),
        ("attn_k.weight", "attn_k"),
        ("attn_q.weight", "attn_q"),
        ("attn_output.weight", "attn_output"),
        ("ffn_up", "ffn_up"),
        ("ffn_gate", "ffn_gate"),
        ("ffn_down", "ffn_down"),
    ):
        if key in name:
            return cat
    return "other"


def _ggml_n_dims(shape: Sequence[int]) -> int:
    """``ggml_n_dims`` of a tensor given in numpy order (row length last): leading 1s do not count."""
    dims = list(shape)
    while len(dims) > 1 and dims[0] == 1:
        dims.pop(0)
    return len(dims)


def _quantizable(name: str, shape: Sequence[int]) -> bool:
    """llama.cpp's ``tensor_allows_quantization`` for llama / qwen2 tensor names."""
    return (
        _ggml_n_dims(shape) >= 2
        and name.endswith("weight")
        and "_norm.weight" not in name
        and "ffn_gate_inp" not in name  # routers, incl. ffn_gate_inp_shexp: convert_hf_to_gguf keeps F32
    )


def _mix(ft: FileType, cat: str, cols: int, layer: int, n_layers: int, n_expert: int, tied: bool) -> GGMLType:
    """``llama_tensor_get_type_impl`` for the quantized file types of :data:`FILE_TYPES`."""
    name, base = ft.name, ft.base
    if cat == "output" or (tied and cat == "token_embd"):
        if cols % type_info(base).block_size:
            return GGMLType.Q8_0
        return base if base == GGMLType.Q8_0 else GGMLType.Q6_K
    if cat in ("attn_v", "ffn_down") and not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} is outside 0..{n_layers - 1} (n_layers = {n_layers})")
    if cat == "attn_v":
        new = base
        if name in ("q4_k_m", "q5_k_m") and use_more_bits(layer, n_layers):
            new = GGMLType.Q6_K
        elif name == "q4_k_s" and layer < 4:
            new = GGMLType.Q5_K
        return GGMLType.Q8_0 if n_expert == 8 else new  # "for the 8-expert model, bumping this to Q8_0"
    if cat == "attn_k":
        return GGMLType.Q8_0 if n_expert == 8 else base
    if cat == "ffn_down":
        if name in ("q4_k_m", "q5_k_m") and use_more_bits(layer, n_layers):
            return GGMLType.Q6_K
        if name == "q4_k_s" and layer < n_layers // 8:
            return GGMLType.Q5_K
        return base
    if cat == "attn_output" and n_expert == 8 and name in ("q4_k_s", "q4_k_m"):
        return GGMLType.Q5_K
    return base


def _fallback(t: GGMLType, cols: int) -> GGMLType:
    """``tensor_type_fallback`` with flashtier's types: K-type -> Q8_0, then F16 if 32 does not divide."""
    if cols % type_info(t).block_size == 0:
        return t
    if t in _K_TYPES and cols % type_info(GGMLType.Q8_0).block_size == 0:
        return GGMLType.Q8_0
    return GGMLType.F16


def choose_type(
    file_type: str,
    gguf_name: str,
    shape: Sequence[int],
    layer: int,
    n_layers: int,
    *,
    n_expert: int = 0,
    tied_embeddings: bool = False,
) -> GGMLType:
    """The ggml type llama.cpp's ``file_type`` mix gives tensor ``gguf_name`` of ``shape``.

    ``shape`` is in numpy / PyTorch order, row length last (``[out, in]`` for a linear weight,
    ``[n_expert, out, in]`` for stacked experts). ``layer`` is the tensor's block index (ignored for
    tensors outside the blocks) and ``n_layers`` the model's block count. ``n_expert`` is the
    model's routed-expert count (only 8 changes anything); ``tied_embeddings`` says the model has no
    ``output.weight`` and ``token_embd.weight`` serves as the output too.
    """
    ft = FILE_TYPES.get(file_type.lower())
    if ft is None:
        raise ValueError(f"unknown file type {file_type!r}; flashtier writes: {', '.join(FILE_TYPES)}")
    shape = tuple(int(s) for s in shape)
    if not shape or min(shape) < 1:
        raise ValueError(f"tensor {gguf_name!r} has shape {list(shape)}; expected positive dimensions")
    if n_layers < 1:
        raise ValueError(f"n_layers must be at least 1, not {n_layers}")
    if not _quantizable(gguf_name, shape):
        return GGMLType.F32
    if not type_info(ft.base).quantized:
        return ft.base
    cols = shape[-1]
    new = _mix(ft, _category(gguf_name), cols, layer, n_layers, n_expert, tied_embeddings)
    return _fallback(new, cols)


__all__ = ["FILE_TYPES", "FileType", "choose_type", "use_more_bits"]
