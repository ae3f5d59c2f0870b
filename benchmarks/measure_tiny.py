"""Measure a shipped tiny checkpoint (models/tiny-moe, models/tiny-dense) on the held-out set.

    python benchmarks/measure_tiny.py models/tiny-moe [--json] [--seq 256] [--max-windows N]

Held-out set: the stdlib modules listed in benchmarks/train_tiny.py:HELDOUT (never trained
on), each file prefixed with <|endoftext|>, cut into non-overlapping windows of --seq tokens;
every position of every window is scored (next token).

Reports (all through transformers; the flashtier runtime is not involved):
  loss, top1_acc            mean next-token cross-entropy (nats) and greedy top-1 accuracy
  sparsity_per_layer        fraction of ReLU(gate) outputs that are exactly 0, per token
                            (MoE: over the (token, expert) pairs the router actually ran)
  window_union_active       (dense) fraction of FFN neurons active in the union of the last
                            k tokens, and fresh_per_token = neurons active now that were not
                            active in the previous k tokens (the LLM-in-a-flash windowing cost)
  routing                   (MoE) per layer: expert_load (share of top-k slots per expert),
                            repeat_rate = |top2(t+1) & top2(t)| / 2, repeat_both = both kept,
                            next_router_pred[i] = |top2 of router_{i+1}(norm_{i+1}(h_i)) &
                            actual top2 at layer i+1| / 2, where h_i is layer i's output
                            (what a prefetcher sees one layer ahead); *_raw without the norm.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_tiny import HELDOUT, corpus_files, encode_files  # noqa: E402


def _ffn(layer):
    return getattr(layer, "mlp", None) or getattr(layer, "block_sparse_moe")


def heldout_ids(model_dir: str, text_dir: str | None = None) -> np.ndarray:
    """The held-out text as one token stream (int64), as the windows below cut it: the stdlib
    modules of train_tiny.HELDOUT, or the ``.py`` files of ``text_dir``."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    files = corpus_files("eval") if text_dir is None else sorted(
        os.path.join(text_dir, f) for f in os.listdir(text_dir) if f.endswith(".py"))
    return encode_files(tok, files).astype(np.int64)


def measure(model_dir: str, seq: int = 256, max_windows: int = 0, batch: int = 8,
            threads: int = 0, windows_k=(1, 2, 4), text_dir: str | None = None) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    if threads:
        torch.set_num_threads(threads)
    t0 = time.time()
    ids = heldout_ids(model_dir, text_dir)
    n_win = (ids.size - 1) // seq
    if max_windows:
        n_win = min(n_win, max_windows)
    X = torch.from_numpy(ids[: n_win * seq].reshape(n_win, seq))
    Y = torch.from_numpy(ids[1: n_win * seq + 1].reshape(n_win, seq))

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    cfg = model.config
    layers = model.model.layers
    L = len(layers)
    is_moe = getattr(cfg, "num_local_experts", 0) > 0
    k = getattr(cfg, "num_experts_per_tok", 0)
    E = getattr(cfg, "num_local_experts", 0)

    zeros = np.zeros(L)
    total = np.zeros(L)
    cur_masks: dict[int, torch.Tensor] = {}
    router_logits: dict[int, torch.Tensor] = {}
    layer_out: dict[int, torch.Tensor] = {}
    hooks = []
    act_mods = []
    for li, layer in enumerate(layers):
        ffn = _ffn(layer)
        act = ffn.experts.act_fn if is_moe else ffn.act_fn
        act_mods.append(act)

        def act_hook(mod, inp, out, li=li):
            z = out == 0
            zeros[li] += z.sum().item()
            total[li] += z.numel()
            if not is_moe:
                cur_masks[li] = ~z

        hooks.append(act.register_forward_hook(act_hook))
        if is_moe:
            def gate_hook(mod, inp, out, li=li):
                router_logits[li] = (out[0] if isinstance(out, tuple) else out).detach()

            hooks.append(ffn.gate.register_forward_hook(gate_hook))

            def layer_hook(mod, inp, out, li=li):
                layer_out[li] = (out[0] if isinstance(out, tuple) else out).detach()

            hooks.append(layer.register_forward_hook(layer_hook))
    assert len({id(a) for a in act_mods}) == L, "activation modules are shared between layers"

    loss_sum, correct, n_tok = 0.0, 0, 0
    load = np.zeros((L, max(E, 1)))
    rep_sum = np.zeros(L)
    rep_both = np.zeros(L)
    rep_n = 0
    pred_sum = np.zeros(max(L - 1, 1))
    pred_raw_sum = np.zeros(max(L - 1, 1))
    pred_n = 0
    win_active = {kk: np.zeros(L) for kk in windows_k}
    win_fresh = {kk: np.zeros(L) for kk in windows_k}
    win_n = {kk: 0 for kk in windows_k}

    with torch.no_grad():
        for i in range(0, n_win, batch):
            x, y = X[i:i + batch], Y[i:i + batch]
            B = x.shape[0]
            logits = model(input_ids=x).logits
            loss_sum += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                        reduction="sum").item()
            correct += (logits.argmax(-1) == y).sum().item()
            n_tok += y.numel()
            if is_moe:
                tops = {}
                for li in range(L):
                    lg = router_logits[li].reshape(B, seq, E)
                    top = torch.topk(lg, k, dim=-1).indices  # (B, T, k)
                    tops[li] = top
                    load[li] += np.bincount(top.reshape(-1).numpy(), minlength=E)
                    same = (top[:, 1:, :, None] == top[:, :-1, None, :]).any(-1).sum(-1)  # (B, T-1)
                    rep_sum[li] += same.sum().item() / k
                    rep_both[li] += (same == k).sum().item()
                rep_n += B * (seq - 1)
                for li in range(L - 1):
                    nxt = layers[li + 1]
                    h = layer_out[li]
                    gate_w = _ffn(nxt).gate.weight
                    for normed, acc in ((True, pred_sum), (False, pred_raw_sum)):
                        hh = nxt.post_attention_layernorm(h) if normed else h
                        p = torch.topk(hh @ gate_w.t(), k, dim=-1).indices.reshape(B, seq, k)
                        hit = (p[..., :, None] == tops[li + 1][..., None, :]).any(-1).sum(-1)
                        acc[li] += hit.sum().item() / k
                pred_n += B * seq
            else:
                for li in range(L):
                    m = cur_masks[li]  # (B, T, I) bool active
                    T = m.shape[1]
                    for kk in windows_k:
                        # union of the kk tokens ending at t, for t = kk-1 .. T-1
                        u = m[:, kk - 1:].clone()
                        for j in range(1, kk):
                            u |= m[:, kk - 1 - j: T - j]
                        win_active[kk][li] += u.float().mean(-1).mean(-1).sum().item()
                        # fresh: active at t but in none of t-1 .. t-kk
                        prev = torch.zeros_like(m[:, kk:])
                        for j in range(1, kk + 1):
                            prev |= m[:, kk - j: T - j]
                        fresh = m[:, kk:] & ~prev
                        win_fresh[kk][li] += fresh.float().mean(-1).mean(-1).sum().item()
                        if li == 0:
                            win_n[kk] += B
    for h in hooks:
        h.remove()

    sp = zeros / np.maximum(total, 1)
    res = {
        "model_dir": model_dir,
        "architecture": cfg.architectures[0] if cfg.architectures else type(model).__name__,
        "params": sum(p.numel() for p in model.parameters()),
        "heldout_modules": HELDOUT if text_dir is None else sorted(f for f in os.listdir(text_dir) if f.endswith(".py")),
        "eval_tokens": n_tok,
        "seq": seq,
        "loss": round(loss_sum / n_tok, 4),
        "ppl": round(float(np.exp(loss_sum / n_tok)), 3),
        "top1_acc": round(correct / n_tok, 4),
        "sparsity_per_layer": [round(float(s), 4) for s in sp],
        "sparsity_mean": round(float(sp.mean()), 4),
    }
    if is_moe:
        res["routing"] = {
            "num_experts": E,
            "top_k": k,
            "expert_load": [[round(float(v), 3) for v in row / row.sum()] for row in load],
            "repeat_rate": [round(float(v / rep_n), 4) for v in rep_sum],
            "repeat_both": [round(float(v / rep_n), 4) for v in rep_both],
            "next_router_pred": [round(float(v / pred_n), 4) for v in pred_sum[: L - 1]],
            "next_router_pred_raw": [round(float(v / pred_n), 4) for v in pred_raw_sum[: L - 1]],
            "random_baseline_overlap": round(k / E, 4),
        }
        res["routing"]["repeat_rate_mean"] = round(float(np.mean(res["routing"]["repeat_rate"])), 4)
        res["routing"]["next_router_pred_mean"] = round(float(np.mean(res["routing"]["next_router_pred"])), 4)
    else:
        res["window_union_active"] = {
            str(kk): [round(float(v / win_n[kk]), 4) for v in win_active[kk]] for kk in windows_k
        }
        res["fresh_per_token"] = {
            str(kk): [round(float(v / win_n[kk]), 4) for v in win_fresh[kk]] for kk in windows_k
        }
    res["seconds"] = round(time.time() - t0, 1)
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--max-windows", type=int, default=0, help="0 = the whole held-out set")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--text-dir", default=None,
                    help="score the .py files of this folder instead of the held-out stdlib modules "
                         "(e.g. benchmarks/data/heldout_ml)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.text_dir is not None and not any(f.endswith(".py") for f in (os.listdir(args.text_dir)
                                                                      if os.path.isdir(args.text_dir) else [])):
        ap.error(f"--text-dir {args.text_dir}: not a folder holding .py files")
    res = measure(args.model_dir, args.seq, args.max_windows, args.batch, args.threads, text_dir=args.text_dir)
    if args.json:
        print(json.dumps(res, indent=1))
        return
    print(f"{res['model_dir']} ({res['architecture']}, {res['params']/1e6:.2f}M params)")
    print(f"  held-out tokens {res['eval_tokens']}  loss {res['loss']:.4f}  ppl {res['ppl']:.2f}  "
          f"top-1 {res['top1_acc']*100:.2f}%")
    print("  FFN zero fraction per layer: " + " ".join(f"{s:.3f}" for s in res["sparsity_per_layer"])
          + f"  (mean {res['sparsity_mean']:.3f})")
    if "routing" in res:
        r = res["routing"]
        print("  expert repeat rate t->t+1:  " + " ".join(f"{v:.3f}" for v in r["repeat_rate"]))
        print("  both experts repeat:        " + " ".join(f"{v:.3f}" for v in r["repeat_both"]))
        print("  next-layer router predicts: " + " ".join(f"{v:.3f}" for v in r["next_router_pred"])
              + f"  (raw hidden: " + " ".join(f"{v:.3f}" for v in r["next_router_pred_raw"]) + ")")
        print(f"  random overlap baseline {r['random_baseline_overlap']}")
        for li, row in enumerate(r["expert_load"]):
            print(f"  layer {li} expert load: " + " ".join(f"{v:.3f}" for v in row))
    else:
        for kk, v in res["window_union_active"].items():
            print(f"  active in union of last {kk} tokens: " + " ".join(f"{x:.3f}" for x in v))
        for kk, v in res["fresh_per_token"].items():
            print(f"  fresh per token vs last {kk}:       " + " ".join(f"{x:.3f}" for x in v))
    print(f"  ({res['seconds']}s)")


if __name__ == "__main__":
    main()
