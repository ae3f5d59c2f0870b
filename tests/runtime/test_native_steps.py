"""The fused one-token layer steps (flashtier._native.attn_step / ffn_step / experts_step, runtime/decode_ops.py)
are bit-identical to the separate native calls they replace (RMSNorm, the quantized products, rotary
embedding, the KV write and the attention, the residual adds), on every weight type, activation
kind, bias, GQA shape, sliding window and block table; the forward takes them only where they apply
and computes the same logits either way; bad arguments are ValueErrors naming the function."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from flashtier.checkpoint.ggml_types import GGMLType
from flashtier.runtime import decode_ops
from flashtier.runtime import quant_kernels as qk
from flashtier.runtime.quantized import QuantizedTensor, quantized_linear, quantized_linear_many

pytestmark = pytest.mark.skipif(not decode_ops.native_steps(), reason="C extension flashtier._native not built")

HERE = Path(__file__).parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


qkt = _load("test_quant_kernels")  # random_blocks: valid blocks of every type

TYPES = [GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q5_K]


def weight(t: GGMLType, rows: int, cols: int, seed: int) -> QuantizedTensor:
    blocks = qkt.random_blocks(t, rows, cols, seed)
    return QuantizedTensor(torch.from_numpy(np.ascontiguousarray(blocks)), t, (rows, cols))


def spec(w: QuantizedTensor, bias: torch.Tensor | None = None) -> tuple:
    return (int(w.qtype), w.array, w.shape[0], None if bias is None else bias.numpy())


def separate_attention(x, norm, eps, ws, bs, cos, sin, interleaved, pool_k, pool_v, table, block, lo, end, hq, hkv,
                       d, threads, act):
    """What the forward does without the fused step, one native call at a time."""
    xn = decode_ops.rms_norm_row(x, norm, eps)
    q, k, v = quantized_linear_many(xn, list(ws[:3]), list(bs), threads, act)
    q = decode_ops.rope_row(q.view(hq, 1, d), cos, sin, interleaved)
    k = decode_ops.rope_row(k.view(hkv, 1, d), cos, sin, interleaved)
    pos = end - 1
    row = int(table[pos // block]) * block + pos % block
    pool_k.view(hkv, -1, d)[:, row] = k[:, 0]
    pool_v.view(hkv, -1, d)[:, row] = v.view(hkv, d)
    stride = pool_k.numel() // hkv
    att = decode_ops.attend_row(q, pool_k.numpy().reshape(-1), pool_v.numpy().reshape(-1), hkv, stride, lo, end,
                                threads, table, block)
    o = quantized_linear(att.reshape(1, hq * d), ws[3], None, threads, act)
    return x + o


@settings(max_examples=25, deadline=None)
@given(types=st.lists(st.sampled_from(TYPES), min_size=4, max_size=4), act=st.sampled_from(qk.ACTIVATIONS),
       hkv=st.sampled_from([1, 2]), group=st.sampled_from([1, 4]), d=st.sampled_from([32, 64]),
       length=st.integers(1, 150), window=st.sampled_from([None, 5]), interleaved=st.booleans(),
       bias=st.booleans(), threads=st.integers(1, 2), seed=st.integers(0, 2**31))
def test_attention_step_is_the_separate_calls(types, act, hkv, group, d, length, window, interleaved, bias, threads,
                                              seed):
    hq = hkv * group
    hidden = 256
    g = torch.Generator().manual_seed(seed)
    o_type = types[3] if hq * d % 256 == 0 else GGMLType.Q8_0  # o's width hq * d: a width its blocks allow
    ws = [weight(types[0], hq * d, hidden, seed), weight(types[1], hkv * d, hidden, seed + 1),
          weight(types[2], hkv * d, hidden, seed + 2), weight(o_type, hidden, hq * d, seed + 3)]
    bs = [torch.randn(w.shape[0], generator=g) if bias else None for w in ws[:3]]
    x = torch.randn(1, hidden, generator=g)
    norm = torch.rand(hidden, generator=g) + 0.5
    ang = torch.rand(1, d, generator=g) * 6
    cos, sin = ang.cos(), ang.sin()
    block = 16
    nblocks = -(-length // block)
    pool_blocks = 2 * nblocks + 3
    table = np.asarray(torch.randperm(pool_blocks, generator=g)[:nblocks].tolist(), dtype=np.int64)
    pool_k = torch.randn(hkv, pool_blocks, block, d, generator=g)
    pool_v = torch.randn(hkv, pool_blocks, block, d, generator=g)
    lo = 0 if window is None else max(0, length - window)
    want_k, want_v = pool_k.clone(), pool_v.clone()
    want = separate_attention(x, norm, 1e-5, ws, bs, cos, sin, interleaved, want_k, want_v, table, block, lo, length,
                              hq, hkv, d, threads, act)
    out = torch.empty_like(x)
    kv = (pool_k.numpy().reshape(-1), pool_v.numpy().reshape(-1), pool_blocks * block * d, table, block, lo, length)
    decode_ops.attn_step(x.numpy(), out.numpy(), norm.numpy(), 1e-5, tuple(spec(w, b) for w, b in zip(ws, bs)),
                         spec(ws[3]), cos.numpy(), sin.numpy(), interleaved, kv, hq, hkv, d, threads, threads,
                         qk.ACT_CODES[act])
    assert torch.equal(out, want)
    assert torch.equal(pool_k, want_k) and torch.equal(pool_v, want_v)  # the same key and value written


@settings(max_examples=25, deadline=None)
@given(tg=st.sampled_from(TYPES), tu=st.sampled_from(TYPES), td=st.sampled_from(TYPES),
       act=st.sampled_from(qk.ACTIVATIONS), hidden_act=st.sampled_from(sorted(decode_ops.ACT_KINDS)),
       threads=st.integers(1, 2), seed=st.integers(0, 2**31))
def test_ffn_step_is_the_separate_calls(tg, tu, td, act, hidden_act, threads, seed):
    hidden, inter = 256, 512
    g = torch.Generator().manual_seed(seed)
    gate, up, down = weight(tg, inter, hidden, seed), weight(tu, inter, hidden, seed + 1), weight(td, hidden, inter,
                                                                                                  seed + 2)
    h = torch.randn(1, hidden, generator=g)
    norm = torch.rand(hidden, generator=g) + 0.5
    hn = decode_ops.rms_norm_row(h, norm, 1e-6)
    gy, uy = quantized_linear_many(hn, [gate, up], [None, None], threads, act)
    want = h + quantized_linear(decode_ops.act_mul_row(gy, uy, hidden_act), down, None, threads, act)
    out = torch.empty_like(h)
    finite = decode_ops.ffn_step(h.numpy(), out.numpy(), norm.numpy(), 1e-6, (spec(gate), spec(up)), spec(down),
                                 hidden_act, threads, qk.ACT_CODES[act])
    assert finite is True
    assert torch.equal(out, want)


@settings(max_examples=20, deadline=None)
@given(types=st.lists(st.sampled_from(TYPES), min_size=3, max_size=3), n=st.integers(1, 4),
       act=st.sampled_from(qk.ACTIVATIONS), threads=st.integers(1, 2), seed=st.integers(0, 2**31))
def test_experts_step_is_the_separate_calls(types, n, act, threads, seed):
    """The routed experts of one token: each term weight * down(act(gate) * up) rounded, then
    summed in expert order, exactly as the forward's separate calls compute it."""
    hidden = 256
    g = torch.Generator().manual_seed(seed)
    experts = [(weight(types[0], 256 * (1 + e % 2), hidden, seed + 3 * e),
                weight(types[1], 256 * (1 + e % 2), hidden, seed + 3 * e + 1),
                weight(types[2], hidden, 256 * (1 + e % 2), seed + 3 * e + 2)) for e in range(n)]
    xn = torch.randn(1, hidden, generator=g)
    top_w = torch.rand(n, generator=g)
    want = None
    for e, (gate, up, down) in enumerate(experts):
        gy, uy = quantized_linear_many(xn, [gate, up], [None, None], threads, act)
        y = quantized_linear(decode_ops.act_mul_row(gy, uy, "silu"), down, None, threads, act) * top_w[e]
        want = y if want is None else want + y
    out = torch.empty_like(xn)
    decode_ops.experts_step(xn.numpy(), out.numpy(), [tuple(spec(w) for w in three) for three in experts],
                            top_w.numpy(), "silu", threads, qk.ACT_CODES[act])
    assert torch.equal(out, want)


def test_experts_step_with_the_residual_adds_it_and_reports_finiteness():
    hidden = 256
    experts = [tuple(weight(GGMLType.Q4_K, 256, hidden, 3 * e + i) if i < 2 else weight(GGMLType.Q6_K, hidden, 256, 9)
                     for i in range(3)) for e in range(2)]
    specs = [tuple(spec(w) for w in three) for three in experts]
    g = torch.Generator().manual_seed(7)
    xn, h, top_w = torch.randn(1, hidden, generator=g), torch.randn(1, hidden, generator=g), torch.rand(2, generator=g)
    alone, out = torch.empty_like(xn), torch.empty_like(xn)
    assert decode_ops.experts_step(xn.numpy(), alone.numpy(), specs, top_w.numpy(), "silu", 2, 2) is None
    assert decode_ops.experts_step(xn.numpy(), out.numpy(), specs, top_w.numpy(), "silu", 2, 2, h.numpy()) is True
    assert torch.equal(out, h + alone)  # the forward's residual add, the same bits
    h[0, 3] = float("nan")
    assert decode_ops.experts_step(xn.numpy(), out.numpy(), specs, top_w.numpy(), "silu", 2, 2, h.numpy()) is False


@settings(max_examples=40, deadline=None)
@given(e=st.integers(1, 64), k=st.integers(1, 8), hidden=st.sampled_from([8, 64, 1024]), norm=st.booleans(),
       scale=st.sampled_from([1e-3, 1.0, 30.0]), seed=st.integers(0, 2**31))
def test_route_row_picks_what_torch_picks(e, k, hidden, norm, scale, seed):
    """The native router of one token: torch's softmax / topk / normalisation to fp32 rounding,
    the same experts wherever torch's probabilities are not within rounding of a tie."""
    k = min(k, e)
    g = torch.Generator().manual_seed(seed)
    x, router = torch.randn(1, hidden, generator=g), torch.randn(e, hidden, generator=g) * scale / hidden ** 0.5
    ids, weights = decode_ops.route_row(x, router, k, norm)
    probs = F.softmax((x.double() @ router.double().T), dim=-1)[0]
    want_w, want_i = torch.topk(probs, k)
    if norm:
        want_w = want_w / want_w.sum()
    gaps = probs.sort(descending=True).values
    if k < e and (gaps[k - 1] - gaps[k]).abs() < 1e-6 * gaps[0]:
        return  # a near-tie at the boundary: either expert is right
    assert sorted(ids[0].tolist()) == sorted(want_i.tolist())
    assert torch.allclose(weights[0].double(), want_w.to(torch.float64)[[want_i.tolist().index(j) for j in
                                                                         ids[0].tolist()]], rtol=1e-5, atol=1e-7)
    assert list(weights[0]) == sorted(weights[0].tolist(), reverse=True)  # descending, as torch.topk


def test_route_row_breaks_ties_to_the_lower_index_and_refuses_what_it_cannot_do():
    x = torch.ones(1, 4)
    router = torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 2.0], [2.0, 0, 0, 0], [0, 1.0, 0, 0]])
    ids, weights = decode_ops.route_row(x, router, 3, False)
    assert ids.tolist() == [[1, 2, 0]]  # 1 and 2 tie: the lower first; then 0 (ties with 3)
    assert decode_ops.route_row(x.double(), router.double(), 2, True) is None  # torch's path runs
    assert decode_ops.route_row(torch.ones(2, 4), router, 2, True) is None  # several rows
    from flashtier import _native
    with pytest.raises(ValueError, match="route_row"):
        _native.route_row(x.numpy(), router.numpy(), np.zeros(2, np.int64), np.zeros(2, np.float32), 5, True)


def test_ffn_step_reports_a_non_finite_result():
    hidden, inter = 256, 256
    gate, up, down = (weight(GGMLType.Q8_0, inter, hidden, 1), weight(GGMLType.Q8_0, inter, hidden, 2),
                      weight(GGMLType.Q8_0, hidden, inter, 3))
    h = torch.randn(1, hidden)
    h[0, 7] = float("inf")
    out = torch.empty_like(h)
    assert decode_ops.ffn_step(h.numpy(), out.numpy(), torch.ones(hidden).numpy(), 1e-6, (spec(gate), spec(up)),
                               spec(down), "silu", 1, 2) is False


def _gelu_tanh(t: torch.Tensor) -> torch.Tensor:  # 0.5 t (1 + tanh(y)) without cancellation where tanh(y) ~ -1
    return t / (1 + torch.exp(-2 * 0.7978845608028654 * (t + 0.044715 * t ** 3)))


@pytest.mark.parametrize("hidden_act, ref, rtol", [
    ("silu", F.silu, 4e-6), ("gelu", lambda t: 0.5 * t * torch.special.erfc(-t / 2 ** 0.5), 1e-4),
    ("gelu_pytorch_tanh", _gelu_tanh, 1e-4), ("gelu_new", _gelu_tanh, 1e-4)])
def test_native_activation_is_the_function_to_fp32_rounding(hidden_act, ref, rtol):
    """act(g) * u within fp32 rounding of the fp64 function, also in the tails (where torch's own
    gelu loses every digit to the cancellation in 1 + erf; erfc's tail magnifies the rounding of
    its fp32 argument ~2 g^2 times, exp(-2y) the cubic argument`s, hence gelu`s wider tolerance)."""
    g = torch.linspace(-30, 30, 4001).reshape(1, -1)
    u = torch.randn(1, 4001, generator=torch.Generator().manual_seed(0))
    got = decode_ops.act_mul_row(g, u, hidden_act)
    want = ref(g.double()) * u.double()
    assert torch.allclose(got.double(), want, rtol=rtol, atol=1e-37)
    assert torch.allclose(got.double(), F.gelu(g.double(), approximate="tanh" if "tanh" in hidden_act or
                                              hidden_act == "gelu_new" else "none") * u.double()
                          if hidden_act != "silu" else F.silu(g.double()) * u.double(), rtol=1e-5, atol=1e-6)
    assert decode_ops.act_mul_row(g.double(), u.double(), hidden_act) is None  # not fp32: torch's runs
    assert decode_ops.act_mul_row(g, u, "relu") is None  # not a native kind


def test_steps_reject_bad_arguments():
    from flashtier import _native

    hidden = 256
    w = weight(GGMLType.Q8_0, hidden, hidden, 0)
    x, out, norm = (np.zeros(hidden, np.float32) for _ in range(3))
    s = spec(w)
    with pytest.raises(ValueError, match="ffn_step: x, out and norm"):
        _native.ffn_step(x, out[:8], norm, 1e-6, (s, s), s, 0, 1, 0)
    with pytest.raises(ValueError, match="ffn_step: x, out and norm"):
        _native.ffn_step(x, x, norm, 1e-6, (s, s), s, 0, 1, 0)  # out must not be x
    with pytest.raises(ValueError, match="ffn_step: kind"):
        _native.ffn_step(x, out, norm, 1e-6, (s, s), s, 7, 1, 0)
    with pytest.raises(ValueError, match="ffn_step: a group of products"):
        _native.ffn_step(x, out, norm, 1e-6, (), s, 0, 1, 0)
    with pytest.raises(ValueError, match="ffn_step: gate and up"):
        _native.ffn_step(x, out, norm, 1e-6, (s,), s, 0, 1, 0)
    with pytest.raises(ValueError, match="bias"):
        _native.ffn_step(x, out, norm, 1e-6, ((8, w.array, hidden, np.zeros(3, np.float32)), s), s, 0, 1, 0)
    with pytest.raises(ValueError, match="weight is"):
        _native.ffn_step(x, out, norm, 1e-6, ((8, w.array[:10], hidden, None), s), s, 0, 1, 0)
    one = np.ones(1, np.float32)
    with pytest.raises(ValueError, match="experts_step: experts must be"):
        _native.experts_step(x, out, (), one, 0, 1, 0)
    with pytest.raises(ValueError, match="experts_step: weights must be"):
        _native.experts_step(x, out, ((s, s, s),), np.ones(2, np.float32), 0, 1, 0)
    with pytest.raises(ValueError, match="experts_step: each expert"):
        _native.experts_step(x, out, ((s, s),), one, 0, 1, 0)
    with pytest.raises(ValueError, match="experts_step: expert 0"):
        _native.experts_step(x, out, ((s, (8, w.array[:64], 64, None), s),), one, 0, 1, 0)
    with pytest.raises(ValueError, match="experts_step: x and out"):
        _native.experts_step(x, x, ((s, s, s),), one, 0, 1, 0)
    d, hkv, hq, block = 64, 1, 4, 16
    k = np.zeros(hkv * 4 * block * d, np.float32)
    table = np.arange(4, dtype=np.int64)
    cs = np.ones(d, np.float32)
    args = [x, out, norm, 1e-6, (s, (8, w.array[:64], 64, None), (8, w.array[:64], 64, None)), s, cs, cs, False,
            k, k.copy(), 4 * block * d, table, block, 0, 10, hq, hkv, d, 0.125, 1, 1, 0]
    _native.attn_step(*args)  # valid: q 256 rows (4 heads x 64), k and v 64 rows
    bad = list(args)
    bad[14], bad[15] = 0, 65  # position 64 is past the table's 4 blocks of 16
    with pytest.raises(ValueError, match="attn_step: the block table"):
        _native.attn_step(*bad)
    bad = list(args)
    bad[12], bad[15] = np.array([0, 1, 9, 3], dtype=np.int64), 40  # position 39's block 9 is outside the cache
    with pytest.raises(ValueError, match="attn_step: block table entry"):
        _native.attn_step(*bad)
    bad = list(args)
    bad[5] = (8, w.array[:64], 64, None)  # o must give H rows
    with pytest.raises(ValueError, match="attn_step: q, k, v need"):
        _native.attn_step(*bad)
    bad = list(args)
    bad[6] = cs[:5]
    with pytest.raises(ValueError, match="attn_step: cos and sin"):
        _native.attn_step(*bad)


# ---------------------------------------------------------------- the forward
gm = _load("gguf_models")


@pytest.mark.parametrize("kind, ftype", [("llama", "q4_k_m"), ("qwen2", "q4_k_m"), ("mixtral", "q4_k_m"),
                                         ("llama", "q8_0")])
def test_forward_computes_the_same_logits_with_and_without_the_steps(kind, ftype, tmp_path, monkeypatch):
    """Decode logits are bit-identical whether a layer's halves run as one native call each or as
    the separate calls (qwen2: q/k/v biases; mixtral: the attention half and the routed experts),
    for each activation kind, and the steps did run."""
    from flashtier.runtime.engine import EngineConfig, Model

    path, _ = gm.make_gguf(kind, tmp_path, ftype)
    ids = torch.randint(0, 320, (20,), generator=torch.Generator().manual_seed(5))
    real_attn, real_ffn, real_ok = decode_ops.attn_step, decode_ops.ffn_step, decode_ops.native_steps
    ran = {"attn": 0, "ffn": 0, "experts": 0}

    def counted(key, fn):
        def call(*args, **kwargs):
            ran[key] += 1
            return fn(*args, **kwargs)
        return call

    monkeypatch.setattr(decode_ops, "attn_step", counted("attn", real_attn))
    monkeypatch.setattr(decode_ops, "ffn_step", counted("ffn", real_ffn))
    monkeypatch.setattr(decode_ops, "experts_step", counted("experts", decode_ops.experts_step))
    for act in qk.ACTIVATIONS:
        t = Model(path, EngineConfig(activations=act)).transformer
        out = {}
        for steps in (True, False):
            monkeypatch.setattr(decode_ops, "native_steps", real_ok if steps else (lambda: False))
            with torch.inference_mode():
                cache = t.new_cache(16)
                t.forward(ids[:12], cache, 0)
                out[steps] = torch.cat([t.forward(ids[i:i + 1], cache, i) for i in range(12, 20)])
        assert torch.equal(out[True], out[False]), (kind, ftype, act)
    layers = t.config.num_layers
    assert ran["attn"] == len(qk.ACTIVATIONS) * 8 * layers
    assert ran["ffn"] == (0 if kind == "mixtral" else len(qk.ACTIVATIONS) * 8 * layers)
    assert ran["experts"] == (len(qk.ACTIVATIONS) * 8 * layers if kind == "mixtral" else 0)


def test_an_accessor_that_computes_the_ffn_is_asked(tmp_path, monkeypatch):
    """Where the accessor computes (or observes) a layer's FFN (the sparse FFN, calibration), the
    forward hands it that layer instead of running the fused FFN step."""
    from flashtier.runtime.engine import Model

    path, _ = gm.make_gguf("llama", tmp_path, "q4_k_m")
    t = Model(path).transformer
    w = t.weights
    seen = []
    monkeypatch.setattr(w, "computes_ffn", lambda layer: layer == 1, raising=False)
    monkeypatch.setattr(w, "ffn", lambda layer, xs: seen.append((layer, xs[0].shape)) or None, raising=False)
    with torch.inference_mode():
        cache = t.new_cache(16)
        t.forward(torch.tensor([3, 4, 5]), cache, 0)
        seen.clear()
        t.forward(torch.tensor([6]), cache, 3)
    assert seen == [(1, (1, t.config.hidden_size))]
