"""The transformer forward: Llama-family dense and MoE (Mixtral, Qwen2-MoE), batch of one sequence.

Every weight comes from a :class:`~flashtier.runtime.weights.base.WeightAccessor` by checkpoint name,
right before use; the forward holds no weights. Shapes: T tokens in this pass, H hidden size,
Hq / Hkv query / key-value heads, D head dim, V vocabulary, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from flashtier.errors import NonFiniteError
from flashtier.runtime import decode_ops
from flashtier.checkpoint.folder import FINAL_NORM, LayerNames, layer_names, lm_head_name
from flashtier.checkpoint.config import ModelConfig, rope_inv_freq
from flashtier.runtime.kernels import Linear
from flashtier.runtime.quant_kernels import ACT_CODES
from flashtier.runtime.quantized import QuantizedTensor, weight_device
from flashtier.runtime.kv.cache import KV_BLOCKS_ARENA, BlockKVCache, KVBlockPool, KVCache, KVCacheConfig
from flashtier.runtime.kv.retrieval import attend_batch
from flashtier.runtime.weights.base import WeightAccessor

ACTIVATIONS = {
    "silu": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
}


@dataclass
class RoutingTrace:
    """Experts chosen per MoE layer during the last pass: ``layer -> LongTensor [T, k]``."""

    chosen: dict[int, torch.Tensor] = field(default_factory=dict)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32 and cast back, as transformers does (one fp32 row: one native call)."""
    if x.shape[0] == 1:
        y = decode_ops.rms_norm_row(x, weight, eps)
        if y is not None:
            return y
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotate ``x`` ``[Hx, T, D]`` by ``cos``/``sin`` ``[T, D]``: rotate-half convention, or pairs
    of adjacent dimensions when ``interleaved`` (then ``cos``/``sin`` repeat each frequency twice
    in a row instead of concatenating two halves: see :func:`rope_tables`). One fp32 position:
    one native call."""
    if x.shape[1] == 1:
        y = decode_ops.rope_row(x, cos, sin, interleaved)
        if y is not None:
            return y
    if interleaved:
        pairs = x.unflatten(-1, (-1, 2))  # [Hx, T, D/2, 2]
        rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
        return x * cos + rotated * sin
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rope_tables(freqs: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Angles ``[T, D]`` from ``freqs`` ``[T, D/2]`` in the layout :func:`apply_rope` expects."""
    return freqs.repeat_interleave(2, dim=-1) if interleaved else torch.cat((freqs, freqs), dim=-1)


def _check_finite(x: torch.Tensor, where: str) -> None:
    """NonFiniteError naming ``where`` when ``x`` holds a NaN or an infinity (one reduction)."""
    if not bool(torch.isfinite(x).all()):
        raise _non_finite(where)


def _non_finite(where: str) -> NonFiniteError:
    return NonFiniteError(f"{where} produced non-finite values (NaN or inf): the weights may be corrupt (a flipped "
                          "bit in the checkpoint), or the model overflows in its compute dtype; check the files "
                          "against the original, or try --compute-dtype float32")


class FiniteChecks:
    """The non-finite checks of one pass. On the CPU each check is made at once (a failing pass
    stops where it failed); on an accelerator the flags stay on the device and are read together
    once at the end of the pass (``finish``), so the pass does not wait for the device after every
    layer (a host sync per layer: the launch-bound cost of small models on a GPU)."""

    def __init__(self, device: torch.device, deferred: bool | None = None) -> None:
        self.deferred = device.type != "cpu" if deferred is None else deferred
        self._flags: list[torch.Tensor] = []
        self._where: list[str] = []

    def check(self, x: torch.Tensor, where: str) -> None:
        if not self.deferred:
            _check_finite(x, where)
            return
        self._flags.append(torch.isfinite(x).all())
        self._where.append(where)

    def finish(self) -> None:
        """NonFiniteError naming the first failing check (one read of every flag)."""
        if not self._flags:
            return
        ok = torch.stack(self._flags).cpu()
        self._flags.clear()
        bad = (~ok).nonzero()
        if bad.numel():
            raise _non_finite(self._where[int(bad[0])])


class Transformer:
    """A decoder-only transformer whose weights are fetched through ``weights``."""

    def __init__(self, config: ModelConfig, weights: WeightAccessor, available: set[str] | None = None,
                 linear: Linear | None = None) -> None:
        """``linear``: the matrix product used for every weight (default: torch's ``F.linear``
        only; the engine passes one with the fast bf16 decode kernel, see ``kernels``)."""
        self.config = config
        self.weights = weights
        self.linear = linear if linear is not None else Linear(fast=False)
        self.dtype = weights.compute_dtype
        self.defer_finite_checks: bool | None = None
        """Read the per-layer non-finite checks once per pass (None: on accelerators only)."""
        self.device = torch.device(getattr(weights, "device", "cpu"))  # where the weights (and the KV) live
        self.names: list[LayerNames] = [layer_names(config, i) for i in range(config.num_layers)]
        self.lm_head = lm_head_name(config, available)
        self.act = ACTIVATIONS[config.hidden_act]
        self.inv_freq = rope_inv_freq(config.head_dim, config.rope).to(self.device)  # [D/2] fp32
        self.trace = RoutingTrace()
        self._kv_pools: dict[int, KVBlockPool] = {}  # block size -> the KV block pool of every cache

    def new_cache(self, block_size: int = 64) -> BlockKVCache:
        """A full-attention block KV cache for this model."""
        c = self.config
        pool = self._kv_pools.get(block_size)
        if pool is None:  # one block pool per model: every cache (conversation, batched sequences) shares it
            store = getattr(self.weights, "store", None)  # paged weights: its tensors are pages of the model's store
            limit = store.arena_limit(KV_BLOCKS_ARENA) if store is not None and KV_BLOCKS_ARENA in store.arenas else None
            block_bytes = 2 * c.num_layers * c.num_kv_heads * block_size * c.head_dim * self.dtype.itemsize
            pool = self._kv_pools[block_size] = KVBlockPool(
                c.num_layers, c.num_kv_heads, c.head_dim, block_size, self.dtype, self.device, store,
                fixed_blocks=None if limit is None else max(1, limit // block_bytes))  # a budget's share: fixed
        return BlockKVCache(c.num_layers, c.num_kv_heads, c.head_dim, self.dtype,
                            KVCacheConfig(block_size, sliding_window=c.sliding_window), device=self.device, pool=pool,
                            threads=self.linear.kernel_threads)

    # ------------------------------------------------------------------ forward
    def forward(self, tokens: torch.Tensor, cache: KVCache, start: int, all_logits: bool = False) -> torch.Tensor:
        """Run ``tokens`` ``[T]`` at positions ``start .. start+T-1``; cache holds ``0 .. start-1``.

        Returns logits ``[T, V]`` when ``all_logits`` else ``[1, V]`` for the last token (fp32, on
        the CPU whatever device computed them: sampling and stop checks run there). One group of
        :meth:`forward_groups`, so a sequence computes the same numbers alone or in a batch.
        """
        return self.forward_groups([tokens], [cache], [start], all_logits)[0]

    # ------------------------------------------------------------------ batched passes
    def forward_groups(self, groups: list[torch.Tensor], caches: list[KVCache], starts: list[int],
                       all_logits: bool = False) -> list[torch.Tensor]:
        """Several sequences in one pass over the weights: ``groups[b]`` ``[T_b]`` tokens at
        positions ``starts[b] ..`` of the sequence whose KV is ``caches[b]`` (a decode token, or a
        prefill chunk). Returns each group's last-token logits ``[1, V]``, or with ``all_logits``
        every token's ``[T_b, V]`` (fp32, CPU).

        Each weight is fetched once per pass and serves every group (a streamed page is read once
        for all of them), and each group is computed by exactly the operations :meth:`forward`
        applies to it alone, in the same order: a sequence's logits do not depend on the others
        (batch invariance), so its tokens equal its tokens alone."""
        w, c = self.weights, self.config
        if not (len(groups) == len(caches) == len(starts)) or not groups:
            raise ValueError(f"forward_groups: {len(groups)} groups, {len(caches)} caches, {len(starts)} positions")
        xs = [w.embed(g.to(self.device)) for g in groups]  # B x [T_b, H]
        # one fp32 token over a block cache: a layer's halves may run as one native call each
        steps = (len(groups) == 1 and groups[0].shape[0] == 1 and self.dtype == torch.float32
                 and self.device.type == "cpu" and type(caches[0]) is BlockKVCache and decode_ops.native_steps())
        tables = []  # per group: [T_b, D] cos, sin of its positions
        for g, start in zip(groups, starts):
            pos = torch.arange(start, start + g.shape[0], device=self.device)
            emb = rope_tables(pos[:, None].float() * self.inv_freq[None, :], c.rope.interleaved)
            tables.append((emb.cos().to(self.dtype), emb.sin().to(self.dtype)))
        self.trace = RoutingTrace()
        finite = FiniteChecks(self.device, self.defer_finite_checks)
        eps = c.rms_norm_eps
        try:
            for x in xs:
                finite.check(x, "the token embedding")
            for i, n in enumerate(self.names):
                w.layer_begin(i, xs[0] if len(xs) == 1 else torch.cat(xs))
                if steps and (h := self._attention_step(i, n, xs[0], caches[0], starts[0], tables[0])) is not None:
                    step = self._moe_step(i, n, h) if n.router else self._ffn_step(i, n, h)
                    if step is not None:
                        xs = [step[0]]
                        w.layer_end(i)
                        if step[1] is not True:  # not finite, or not checked yet
                            finite.check(xs[0], f"layer {i}")
                        continue
                    hs = [h]
                else:
                    hs = self._attention(i, n, xs, caches, starts, tables)
                post = w.get(n.post_attn_norm)
                hn = [rms_norm(h, post, eps) for h in hs]
                xs = [h + f for h, f in zip(hs, self._rows_ffn(i, n, hn))]
                w.layer_end(i)
                for x in xs:
                    finite.check(x, f"layer {i}")
            final = w.get(FINAL_NORM)
            last = [x if all_logits else x[-1:] for x in xs]
            logits = [y.float() for y in self._rows_linear([rms_norm(x, final, eps) for x in last], self.lm_head)]
            for y in logits:
                finite.check(y, "the output head")
            finite.finish()
        except BaseException:
            w.abort()
            raise
        w.step_end()
        return [y.cpu() for y in logits]

    def _attention(self, i: int, n: LayerNames, xs: list[torch.Tensor], caches: list[KVCache], starts: list[int],
                   tables: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """Each group's ``x + attention(x)`` ``[T_b, H]`` of layer ``i`` (its KV written into its cache)."""
        w, c = self.weights, self.config
        eps = c.rms_norm_eps
        norm = w.get(n.input_norm)
        xn = [rms_norm(x, norm, eps) for x in xs]
        qkv = self._rows_linears(xn, (n.q, n.k, n.v), (n.q_bias, n.k_bias, n.v_bias))
        qs, ks, vs = [], [], []
        for b, (q, k, v) in enumerate(qkv):
            t = q.shape[0]
            q = q.view(t, c.num_heads, c.head_dim).transpose(0, 1)  # [Hq, T, D]
            k = k.view(t, c.num_kv_heads, c.head_dim).transpose(0, 1)  # [Hkv, T, D]
            v = v.view(t, c.num_kv_heads, c.head_dim).transpose(0, 1)
            cb, sb = tables[b]
            qs.append(apply_rope(q, cb, sb, c.rope.interleaved))
            ks.append(apply_rope(k, cb, sb, c.rope.interleaved))
            vs.append(v)
        # each cache's attention; retrieval caches decoding a token search in one native call
        outs = [out.transpose(0, 1).reshape(out.shape[1], c.num_heads * c.head_dim)  # [T, Hq * D]
                for out in attend_batch(caches, i, qs, ks, vs, starts)]  # [Hq, T, D] each
        return [x + o for x, o in zip(xs, self._rows_linear(outs, n.o))]

    # ------------------------------------------------------------------ one-token native steps
    def _step_weights(self, names: tuple[str, ...], biases: tuple[str, ...]) -> list[tuple] | None:
        """The native step specs (ggml type, blocks, rows, fp32 bias or None) of ``names``, or None
        unless every one is a resident quantized CPU weight (a streamed page must not be held for
        a whole half layer: the planner's window counts one at a time)."""
        w = self.weights
        if not all(w.resident(name) for name in names):
            return None
        specs = []
        for name, bias in zip(names, biases):
            q = w.get(name)
            if not isinstance(q, QuantizedTensor) or q.array is None:
                return None
            b = w.get(bias) if bias else None
            if b is not None and (b.dtype != torch.float32 or b.device.type != "cpu" or not b.is_contiguous()):
                return None
            specs.append((int(q.qtype), q.array, q.shape[0], None if b is None else b.numpy()))
        return specs

    def _attention_step(self, i: int, n: LayerNames, x: torch.Tensor, cache: BlockKVCache, start: int,
                        table: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor | None:
        """``x + attention(x)`` ``[1, H]`` of layer ``i`` for one fp32 token as one native call
        (:func:`~flashtier.runtime.decode_ops.attn_step`: the same numbers as :meth:`_attention`);
        None (nothing done) where it does not apply."""
        w, c = self.weights, self.config
        specs = self._step_weights((n.q, n.k, n.v, n.o), (n.q_bias, n.k_bias, n.v_bias, ""))
        norm = w.get(n.input_norm)
        if specs is None or norm.dtype != torch.float32 or not x.is_contiguous():
            return None
        kv = cache.decode_slot(i, start)
        if kv is None:
            return None
        cos, sin = table
        out = torch.empty_like(x)  # [1, H]
        decode_ops.attn_step(x.numpy(), out.numpy(), norm.numpy(), c.rms_norm_eps, tuple(specs[:3]), specs[3],
                             cos.numpy(), sin.numpy(), c.rope.interleaved, kv, c.num_heads, c.num_kv_heads,
                             c.head_dim, self.linear.kernel_threads, cache.threads or torch.get_num_threads(),
                             ACT_CODES[self.linear.activations])
        cache.wrote(i, start + 1)
        self.linear.calls_quantized += 4
        w.done((n.q, n.k, n.v))
        w.done((n.o,))
        return out

    def _ffn_step(self, i: int, n: LayerNames, h: torch.Tensor) -> tuple[torch.Tensor, bool] | None:
        """(``h + FFN(h)`` ``[1, H]``, whether it is all finite) of dense layer ``i`` for one fp32
        token as one native call (:func:`~flashtier.runtime.decode_ops.ffn_step`: the same numbers
        as :meth:`_rows_ffn`); None (nothing done) where it does not apply."""
        w, c = self.weights, self.config
        if w.computes_ffn(i) or c.hidden_act not in decode_ops.ACT_KINDS:
            return None
        specs = self._step_weights((n.gate, n.up, n.down), ("", "", ""))
        post = w.get(n.post_attn_norm)
        if specs is None or post.dtype != torch.float32:
            return None
        out = torch.empty_like(h)  # [1, H]
        finite = decode_ops.ffn_step(h.numpy(), out.numpy(), post.numpy(), c.rms_norm_eps, tuple(specs[:2]), specs[2],
                                     c.hidden_act, self.linear.kernel_threads, ACT_CODES[self.linear.activations])
        self.linear.calls_quantized += 3
        w.done((n.gate, n.up))
        w.done((n.down,))
        return out, finite

    def _route(self, i: int, n: LayerNames, xs: list[torch.Tensor]
               ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[list[list[int]]], list[list[int]], list[int]]:
        """Route each group ``[T_b, H]`` of MoE layer ``i`` and tell the accessor: per group (top_i
        ``[T, k]``, top_w ``[T, k]`` in x.dtype), its chosen experts per token (host lists), its
        expert set (ascending), and the union over groups (ascending). A one-token fp32 group is
        routed by one native call (:func:`~flashtier.runtime.decode_ops.route_row`), alone or in a
        batch."""
        w, c = self.weights, self.config
        router = w.get(n.router)
        picks = []  # per group: (top_i [T, k], top_w [T, k] in x.dtype)
        for x in xs:
            native = decode_ops.route_row(x, router, c.num_experts_per_tok, c.norm_topk_prob)
            if native is not None:
                picks.append(native)
                continue
            probs = F.softmax(self.linear(x, router).float(), dim=-1)  # [T, E]
            top_w, top_i = torch.topk(probs, c.num_experts_per_tok, dim=-1)
            if c.norm_topk_prob:
                top_w = top_w / top_w.sum(dim=-1, keepdim=True)
            picks.append((top_i, top_w.to(x.dtype)))
        self.trace.chosen[i] = picks[0][0] if len(picks) == 1 else torch.cat([p[0] for p in picks])
        chosen = [top_i.tolist() for top_i, _ in picks]  # per group [T][k] on the host: one read per group
        sets = [sorted({e for row in rows for e in row}) for rows in chosen]
        union = sorted({e for s in sets for e in s})
        w.route(i, union, xs[0] if len(xs) == 1 else torch.cat(xs))
        return picks, chosen, sets, union

    def _moe_step(self, i: int, n: LayerNames, h: torch.Tensor) -> tuple[torch.Tensor, bool | None] | None:
        """(``h + routed experts(h)`` ``[1, H]``, whether it is all finite or None when unchecked)
        of MoE layer ``i`` for one fp32 token: the post-attention norm and the router, then the
        experts with the residual add as one native call where their weights are resident (else the
        separate calls and a torch add: the same numbers); None (nothing done) for a layer with
        shared experts, which the general path computes."""
        if n.shared_gate:
            return None
        hn = rms_norm(h, self.weights.get(n.post_attn_norm), self.config.rms_norm_eps)
        picks, chosen, sets, union = self._route(i, n, [hn])
        fused = self._experts_step(n, hn, chosen[0][0], picks[0][1], union, residual=h)
        if fused is not None:
            return fused
        return h + self._experts(n, [hn], chosen, picks, sets, union)[0], None

    def _experts(self, n: LayerNames, xs: list[torch.Tensor], chosen: list[list[list[int]]],
                 picks: list[tuple[torch.Tensor, torch.Tensor]], sets: list[list[int]], union: list[int]
                 ) -> list[torch.Tensor]:
        """Each group's routed experts' output ``[T_b, H]``: each expert of ``union`` fetched once
        for every group routed to it, a one-token group's experts summed in expert order, a longer
        group's rows gathered per expert."""
        w = self.weights
        ys: dict[tuple[int, int], torch.Tensor] = {}
        outs = [torch.zeros_like(x) if x.shape[0] > 1 else None for x in xs]
        lin = self.linear
        here = xs[0].device
        for e in union:
            names = n.expert(e)
            gate, up, down = (w.get(x) for x in names)
            # An expert is computed where its weights are: the accessor may hand a GPU model an
            # expert's host copy (computing it on the CPU costs less than copying it over the link).
            there = weight_device(gate)
            single = [b for b in range(len(xs)) if xs[b].shape[0] == 1 and e in sets[b]]
            if single:  # each weight over every routed one-token row at once (quantized: one fused call)
                gus = lin.many_rows([xs[b].to(there) for b in single], [gate, up])
                downs = lin.rows([self._act_mul(g, u) for g, u in gus], down)
                for b, d in zip(single, downs):
                    ids = chosen[b][0]
                    ys[b, e] = d.to(here) * picks[b][1][0, ids.index(e)]
            for b, (top_i, top_w) in enumerate(picks):  # several tokens: the rows routed to e
                if e not in sets[b] or xs[b].shape[0] == 1:
                    continue
                rows, slot = torch.nonzero(top_i == e, as_tuple=True)
                g, u = lin.many(xs[b][rows].to(there), [gate, up])
                y = lin(self._act_mul(g, u), down).to(here) * top_w[rows, slot, None]
                outs[b].index_add_(0, rows, y)  # type: ignore[union-attr]
            w.done(names)
        out = []
        for b, x in enumerate(xs):
            if x.shape[0] > 1:
                out.append(outs[b])
                continue
            acc: torch.Tensor | None = None
            for e in sets[b]:  # expert order, whatever else is in the batch
                acc = ys[b, e] if acc is None else acc + ys[b, e]
            assert acc is not None
            out.append(acc)
        return out

    def _experts_step(self, n: LayerNames, x: torch.Tensor, ids: list[int], top_w: torch.Tensor,
                      union: list[int], residual: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, bool | None] | None:
        """(one fp32 token's routed experts ``[1, H]``, None) as one native call
        (:func:`~flashtier.runtime.decode_ops.experts_step`, the numbers of :meth:`_experts`) when
        every expert's weights are resident quantized CPU blocks (pinned, or all in memory); with
        ``residual``, (``residual`` + the experts, whether that is all finite). None (nothing
        done) otherwise. ``x`` ``[1, H]`` the normed input, ``ids`` the token's chosen experts,
        ``top_w`` ``[1, k]`` their weights."""
        if (x.shape[0] != 1 or x.dtype != torch.float32 or x.device.type != "cpu" or not decode_ops.native_steps()
                or len(union) > decode_ops.EXPERTS_MAX or self.config.hidden_act not in decode_ops.ACT_KINDS
                or not x.is_contiguous()):
            return None
        names = [n.expert(e) for e in union]
        flat = tuple(name for three in names for name in three)
        specs = self._step_weights(flat, ("",) * len(flat))
        if specs is None:
            return None
        tw = top_w[0].tolist()  # fp32 values, exact as Python floats
        weights = np.array([tw[ids.index(e)] for e in union], np.float32)  # [E] in expert order
        out = torch.empty_like(x)  # [1, H]
        finite = decode_ops.experts_step(x.numpy(), out.numpy(),
                                         [tuple(specs[3 * k:3 * k + 3]) for k in range(len(union))], weights,
                                         self.config.hidden_act, self.linear.kernel_threads,
                                         ACT_CODES[self.linear.activations],
                                         None if residual is None else residual.numpy())
        self.linear.calls_quantized += len(flat)
        for three in names:
            self.weights.done(three)
        return out, finite

    def _act_mul(self, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``act(g) * u``: one fp32 row natively (the numbers :meth:`_ffn_step` computes), else torch."""
        y = decode_ops.act_mul_row(g, u, self.config.hidden_act)
        return y if y is not None else self.act(g) * u

    def _rows_linear(self, xs: list[torch.Tensor], name: str, bias: str = "") -> list[torch.Tensor]:
        """``x @ W.T (+ b)`` of each group ``[T_b, K]``, the weight fetched once and released right
        after use (a streamed page occupies the window only while its products run)."""
        w = self.weights
        weight, b = w.get(name), (w.get(bias) if bias else None)
        ys = self.linear.rows(xs, weight, b)  # one-row inputs: one kernel call, the weight read once
        w.done((name,))
        return ys

    def _rows_linears(self, xs: list[torch.Tensor], names: tuple[str, ...], biases: tuple[str, ...]
                      ) -> list[list[torch.Tensor]]:
        """Several weights over each group: resident ones fetched together (quantized ones as one
        fused native call per group), streamed ones one at a time, each released right after use."""
        w = self.weights
        if all(w.resident(name) for name in names):
            weights = [w.get(name) for name in names]
            bs = [w.get(b) if b else None for b in biases]
            # quantized: one fused native call for every group; else each weight over all rows at once
            ys = self.linear.many_rows(xs, weights, bs)
            w.done(names)
            return ys
        per_name = [self._rows_linear(xs, name, bias) for name, bias in zip(names, biases)]
        return [list(row) for row in zip(*per_name)]

    def _rows_ffn(self, i: int, n: LayerNames, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The FFN of each group ``[T_b, H]``: dense weights (or the sparse FFN's predicted neurons)
        fetched once; MoE experts fetched once for every group routed to them, a one-token group's
        experts summed in expert order, a longer group's rows gathered per expert."""
        w = self.weights
        if not n.router:
            custom = w.ffn(i, xs)  # the sparse FFN, where it runs
            if custom is not None:
                return custom
            gu = self._rows_linears(xs, (n.gate, n.up), ("", ""))
            return self._rows_linear([self._act_mul(g, u) for g, u in gu], n.down)
        picks, chosen, sets, union = self._route(i, n, xs)
        fused = self._experts_step(n, xs[0], chosen[0][0], picks[0][1], union) if len(xs) == 1 else None
        out = [fused[0]] if fused is not None else self._experts(n, xs, chosen, picks, sets, union)
        if n.shared_gate:
            gu = self._rows_linears(xs, (n.shared_gate, n.shared_up), ("", ""))
            shared = self._rows_linear([self._act_mul(g, u) for g, u in gu], n.shared_down)
            gates = self._rows_linear(xs, n.shared_expert_gate)
            out = [o + torch.sigmoid(gt) * s for o, gt, s in zip(out, gates, shared)]
        return out
