"""llama.cpp's per-tensor type mixes: scenario tables for a dense llama, a qwen2 with odd row lengths,
MoE models with and without 8 experts, and the fallbacks for rows blocks do not divide."""

from __future__ import annotations

import pytest

from flashtier.checkpoint.ggml_types import GGMLType
from flashtier.checkpoint.quant_mix import FILE_TYPES, choose_type, use_more_bits

T = GGMLType

# Llama-2-7B-like: 32 layers, hidden 4096, ffn 11008, vocab 32000
N = 32
MORE_BITS_32 = [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
"""use_more_bits for 32 layers: the first and last 4, and (i - 4) % 3 == 2 between."""

LLAMA = {
    "attn_q.weight": (4096, 4096),
    "attn_k.weight": (4096, 4096),
    "attn_v.weight": (4096, 4096),
    "attn_output.weight": (4096, 4096),
    "ffn_gate.weight": (11008, 4096),
    "ffn_up.weight": (11008, 4096),
    "ffn_down.weight": (4096, 11008),  # 11008 = 43 * 256
}


def _layer_types(ft: str, name: str, shape, n_layers: int = N, **kw) -> list[GGMLType]:
    return [choose_type(ft, f"blk.{i}.{name}", shape, i, n_layers, **kw) for i in range(n_layers)]


def test_use_more_bits_layers():
    assert [i for i in range(32) if use_more_bits(i, 32)] == MORE_BITS_32
    # 24 layers (Qwen2-0.5B): first 3, last 3, and layers 5, 8, ... 20
    assert [i for i in range(24) if use_more_bits(i, 24)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 21, 22, 23]


def test_q4_k_m_dense_llama():
    ft = "q4_k_m"
    assert choose_type(ft, "output.weight", (32000, 4096), -1, N) == T.Q6_K
    assert choose_type(ft, "token_embd.weight", (32000, 4096), -1, N) == T.Q4_K  # untied: base type
    assert choose_type(ft, "output_norm.weight", (4096,), -1, N) == T.F32
    for name in ("attn_v.weight", "ffn_down.weight"):
        want = [T.Q6_K if i in MORE_BITS_32 else T.Q4_K for i in range(N)]
        assert _layer_types(ft, name, LLAMA[name]) == want, name
    for name in ("attn_q.weight", "attn_k.weight", "attn_output.weight", "ffn_gate.weight", "ffn_up.weight"):
        assert set(_layer_types(ft, name, LLAMA[name])) == {T.Q4_K}, name
    for name in ("attn_norm.weight", "ffn_norm.weight", "attn_q.bias", "attn_k.bias", "attn_v.bias"):
        assert choose_type(ft, f"blk.3.{name}", (4096,), 3, N) == T.F32, name


def test_other_k_mixes():
    # Q5_K_M: same layers as Q4_K_M, Q5_K elsewhere
    want = [T.Q6_K if i in MORE_BITS_32 else T.Q5_K for i in range(N)]
    assert _layer_types("q5_k_m", "attn_v.weight", LLAMA["attn_v.weight"]) == want
    assert _layer_types("q5_k_m", "ffn_down.weight", LLAMA["ffn_down.weight"]) == want
    # Q4_K_S: attn_v of layers 0..3 and ffn_down of the first eighth get Q5_K
    assert _layer_types("q4_k_s", "attn_v.weight", LLAMA["attn_v.weight"]) == [T.Q5_K] * 4 + [T.Q4_K] * 28
    assert _layer_types("q4_k_s", "ffn_down.weight", LLAMA["ffn_down.weight"], 16) == [T.Q5_K] * 2 + [T.Q4_K] * 14
    assert choose_type("q4_k_s", "output.weight", (32000, 4096), -1, N) == T.Q6_K
    # Q5_K_S and Q6_K: only the output changes
    for name, shape in LLAMA.items():
        assert set(_layer_types("q5_k_s", name, shape)) == {T.Q5_K}, name
        assert set(_layer_types("q6_k", name, shape)) == {T.Q6_K}, name
    assert choose_type("q5_k_s", "output.weight", (32000, 4096), -1, N) == T.Q6_K
    assert choose_type("Q6_K", "token_embd.weight", (32000, 4096), -1, N) == T.Q6_K  # names are case-blind


def test_legacy_and_float_types():
    assert choose_type("q8_0", "output.weight", (32000, 4096), -1, N) == T.Q8_0
    assert choose_type("q8_0", "blk.0.attn_v.weight", (4096, 4096), 0, N) == T.Q8_0
    assert choose_type("q4_0", "output.weight", (32000, 4096), -1, N) == T.Q6_K
    assert choose_type("q4_0", "token_embd.weight", (32000, 4096), -1, N) == T.Q4_0
    assert set(_layer_types("q4_0", "ffn_down.weight", (4096, 11008))) == {T.Q4_0}  # 32 divides 11008
    for ft, t in (("f32", T.F32), ("f16", T.F16), ("bf16", T.BF16)):
        assert choose_type(ft, "output.weight", (32000, 4096), -1, N) == t
        assert choose_type(ft, "blk.5.ffn_down.weight", (4096, 11008), 5, N) == t
        assert choose_type(ft, "blk.5.ffn_norm.weight", (4096,), 5, N) == T.F32
        assert choose_type(ft, "blk.5.ffn_gate_inp.weight", (8, 4096), 5, N) == T.F32


def test_qwen2_0_5b_rows_of_896_fall_back():
    # hidden 896 = 3.5 * 256: llama.cpp would pick Q5_0 for Q4_K; flashtier has no Q5_0, so Q8_0
    n = 24
    assert set(_layer_types("q4_k_m", "attn_q.weight", (896, 896), n)) == {T.Q8_0}
    assert set(_layer_types("q4_k_m", "attn_v.weight", (128, 896), n)) == {T.Q8_0}  # Q6_K -> Q8_0 too
    assert set(_layer_types("q5_k_m", "ffn_up.weight", (4864, 896), n)) == {T.Q8_0}
    # ffn_down rows are 4864 = 19 * 256: the mix applies
    down = _layer_types("q4_k_m", "ffn_down.weight", (896, 4864), n)
    assert down == [T.Q6_K if use_more_bits(i, n) else T.Q4_K for i in range(n)]
    # the output (or the tied embedding standing in for it): Q8_0 when 256 does not divide the row
    assert choose_type("q4_k_m", "output.weight", (151936, 896), -1, n) == T.Q8_0
    assert choose_type("q4_k_m", "token_embd.weight", (151936, 896), -1, n, tied_embeddings=True) == T.Q8_0
    assert choose_type("q4_k_m", "token_embd.weight", (151936, 896), -1, n) == T.Q8_0  # base Q4_K falls back
    assert choose_type("q4_0", "blk.0.attn_q.weight", (896, 896), 0, n) == T.Q4_0  # 32 divides 896


def test_tied_embeddings_quantized_like_the_output():
    assert choose_type("q4_k_m", "token_embd.weight", (128256, 2048), -1, 16, tied_embeddings=True) == T.Q6_K
    assert choose_type("q8_0", "token_embd.weight", (128256, 2048), -1, 16, tied_embeddings=True) == T.Q8_0


def test_rows_not_multiple_of_32_stay_f16():
    for ft in ("q4_k_m", "q6_k", "q8_0", "q4_0"):
        assert choose_type(ft, "blk.0.ffn_up.weight", (64, 100), 0, 4) == T.F16, ft
        assert choose_type(ft, "output.weight", (1000, 100), -1, 4) == T.F16, ft
        assert choose_type(ft, "blk.0.attn_norm.weight", (100,), 0, 4) == T.F32, ft
    # a K-type row of 32 * k (not 256 * k) goes to Q8_0
    assert choose_type("q6_k", "blk.0.ffn_up.weight", (64, 96), 0, 4) == T.Q8_0


def test_qwen2_moe_experts_follow_dense_rules():
    # Qwen1.5-MoE-A2.7B-like: 24 layers, 60 experts, hidden 2048, expert ffn 1408, shared ffn 5632
    n, ft = 24, "q4_k_m"
    more = [use_more_bits(i, n) for i in range(n)]
    gate_exps = _layer_types(ft, "ffn_gate_exps.weight", (60, 1408, 2048), n, n_expert=60)
    assert set(gate_exps) == {T.Q4_K}
    # expert down rows are 1408 = 5.5 * 256: Q6_K -> Q8_0 (as llama.cpp), Q4_K -> Q8_0 (llama.cpp: Q5_0)
    assert set(_layer_types(ft, "ffn_down_exps.weight", (60, 2048, 1408), n, n_expert=60)) == {T.Q8_0}
    shexp = _layer_types(ft, "ffn_down_shexp.weight", (2048, 5632), n, n_expert=60)
    assert shexp == [T.Q6_K if m else T.Q4_K for m in more]
    assert set(_layer_types(ft, "ffn_up_shexp.weight", (5632, 2048), n, n_expert=60)) == {T.Q4_K}
    attn_v = _layer_types(ft, "attn_v.weight", (2048, 2048), n, n_expert=60)
    assert attn_v == [T.Q6_K if m else T.Q4_K for m in more]  # only n_expert == 8 changes attn_v
    assert choose_type(ft, "blk.0.ffn_gate_inp.weight", (60, 2048), 0, n, n_expert=60) == T.F32
    assert choose_type(ft, "blk.0.ffn_gate_inp_shexp.weight", (1, 2048), 0, n, n_expert=60) == T.F32
    # expert rows of 256 * k: ffn_down_exps takes the dense ffn_down layers
    down = _layer_types(ft, "ffn_down_exps.weight", (64, 2048, 1024), 16, n_expert=64)
    assert down == [T.Q6_K if use_more_bits(i, 16) else T.Q4_K for i in range(16)]


def test_eight_expert_models():
    # Mixtral-like: attn_v and attn_k Q8_0, attn_output Q5_K in Q4_K_S / Q4_K_M
    kw = {"n_expert": 8}
    for ft in ("q4_k_m", "q4_k_s", "q5_k_m", "q6_k", "q4_0"):
        assert set(_layer_types(ft, "attn_v.weight", (1024, 4096), **kw)) == {T.Q8_0}, ft
        assert set(_layer_types(ft, "attn_k.weight", (1024, 4096), **kw)) == {T.Q8_0}, ft
    assert set(_layer_types("q4_k_m", "attn_output.weight", (4096, 4096), **kw)) == {T.Q5_K}
    assert set(_layer_types("q4_k_s", "attn_output.weight", (4096, 4096), **kw)) == {T.Q5_K}
    assert set(_layer_types("q6_k", "attn_output.weight", (4096, 4096), **kw)) == {T.Q6_K}
    down = _layer_types("q4_k_m", "ffn_down_exps.weight", (8, 4096, 14336), **kw)
    assert down == [T.Q6_K if i in MORE_BITS_32 else T.Q4_K for i in range(N)]


def test_file_types_table():
    assert set(FILE_TYPES) == {"f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k"}
    assert FILE_TYPES["q4_k_m"].base == T.Q4_K and FILE_TYPES["q4_k_m"].llama_ftype == 15
    assert FILE_TYPES["bf16"].llama_ftype == 32


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown file type 'q3_k_m'; flashtier writes: f32, f16"):
        choose_type("q3_k_m", "output.weight", (10, 256), -1, 4)
    with pytest.raises(ValueError, match="layer 4 is outside 0..3"):
        choose_type("q4_k_m", "blk.4.attn_v.weight", (256, 256), 4, 4)
    with pytest.raises(ValueError, match="positive dimensions"):
        choose_type("q4_k_m", "blk.0.attn_q.weight", (0, 256), 0, 4)
    with pytest.raises(ValueError, match="n_layers"):
        choose_type("q4_k_m", "blk.0.attn_q.weight", (256, 256), 0, 0)
