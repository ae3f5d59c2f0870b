"""Which hidden state predicts the next MoE layer's experts best? (offline, in memory)

    python -m flashtier.benchmarks.moe_prediction_study MODEL_DIR [--tokens 128] [--prompt-file F]

Runs the model fully in memory with greedy decoding and records, per decode step and MoE layer
j, the experts layer j used and the hidden states available earlier in the same step:
  * ``x_prev``  the input of the layer before j (what ``layer_begin`` hands the accessor a whole
    layer ahead: the default of ``prefetch/experts.py``),
  * ``h_prev``  the post-attention state of the layer before j (after its attention, before its
    experts: less lead time, needs a hook in the forward),
  * ``x_own``   layer j's own input, before its attention (lead time: one attention block),
and, for each, the precision / recall of layer j's router applied to it (top-k, and top-1),
plus the inter-layer affinity predictor (counts learned online over the same steps) and the
union of router and affinity guesses. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections import defaultdict
from pathlib import Path

import torch
from flashtier.runtime.engine import Model
from flashtier.runtime.model import rms_norm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt-file", default=None, help="text prompt (default: token ids 3..18)")
    ap.add_argument("--prompt-chars", type=int, default=1200)
    a = ap.parse_args()
    torch.set_num_threads(1)
    llm = Model(a.model_dir)
    t = llm.transformer
    cfg = t.config
    k = cfg.num_experts_per_tok
    moe = [i for i in range(cfg.num_layers) if cfg.moe_layers[i]]
    states: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
    w = t.weights
    begin, ffn = w.layer_begin, t._rows_ffn

    def layer_begin(i, hidden):
        states["x"][i] = hidden[-1:].float()
        return begin(i, hidden)

    def hooked_ffn(i, n, xs):
        # xs[0] = RMSNorm(h) * w_i (one sequence); undo the weight (RMSNorm is scale-invariant, so this routes as h)
        states["h"][i] = xs[0][-1:].float() / w.get(n.post_attn_norm).float()
        return ffn(i, n, xs)

    w.layer_begin = layer_begin
    t._rows_ffn = hooked_ffn

    def route(j: int, h: torch.Tensor) -> list[int]:
        n = t.names[j]
        x = rms_norm(h, w.get(n.post_attn_norm).float(), cfg.rms_norm_eps)
        probs = torch.softmax(x @ w.get(n.router).float().t(), -1)[0]
        return torch.topk(probs, k).indices.tolist()

    score = defaultdict(lambda: [0, 0, 0])  # name -> [named, named & used, used]
    affinity = {j: torch.zeros(cfg.num_experts, cfg.num_experts) for j in moe}
    forward = t.forward

    def traced(tokens, cache, start, all_logits=False):
        states.clear()
        out = forward(tokens, cache, start, all_logits)
        if tokens.shape[0] != 1:
            return out
        chosen = {i: set(v[-1].tolist()) for i, v in t.trace.chosen.items()}
        for prev, j in itertools.pairwise(moe):
            used = chosen[j]
            guesses = {
                "x_prev": route(j, states["x"][prev]),
                "h_prev": route(j, states["h"][prev]),
                "x_own": route(j, states["x"][j]),
            }
            counts = affinity[j][list(chosen[prev])].sum(0)
            if counts.sum() > 0:
                guesses["affinity"] = torch.topk(counts, k).indices.tolist()
                guesses["x_prev+affinity"] = list(dict.fromkeys(guesses["x_prev"] + guesses["affinity"]))
            for name, g in list(guesses.items()):
                if name in ("x_prev", "h_prev", "x_own"):
                    guesses[name + "@top1"] = g[:1]
            for name, g in guesses.items():
                s = score[name]
                s[0] += len(g)
                s[1] += len(set(g) & used)
                s[2] += len(used)
            for e in chosen[prev]:
                affinity[j][e, list(used)] += 1
        return out

    t.forward = traced
    if a.prompt_file:
        prompt = Path(a.prompt_file).read_text()[: a.prompt_chars]
        llm.generate(prompt, max_new_tokens=a.tokens, ignore_eos=True)
    else:
        llm.generate(list(range(3, 19)), max_new_tokens=a.tokens, ignore_eos=True)
    out = {name: {"precision": round(s[1] / s[0], 4), "recall": round(s[1] / s[2], 4)} for name, s in score.items()}
    print(json.dumps({"model": a.model_dir, "tokens": a.tokens, "predictors": out}, indent=1))


if __name__ == "__main__":
    main()
