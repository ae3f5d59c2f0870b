"""Train the tiny shipped checkpoints (models/tiny-moe, models/tiny-dense) on CPU.

Corpus: the .py files of the running interpreter's standard library (no test
folders, no site-packages), minus a fixed held-out set of modules (HELDOUT).

Sub-commands (run from the repository root):

  python benchmarks/train_tiny.py prepare --work /tmp/flashtier_tiny
      byte-level BPE tokenizer (vocab 4096) + uint16 token arrays for train/eval

  python benchmarks/train_tiny.py train --arch moe --steps N --work /tmp/flashtier_tiny \
      --out models/tiny-moe --threads 1
      trains a compact torch module (same maths as transformers' Mixtral/Llama),
      checkpoints to WORK/ckpt_ARCH.pt every few minutes (resumable with --resume),
      and at the end exports a Hugging Face folder in bf16 through the transformers
      class' save_pretrained (after checking that transformers' logits match ours).

  python benchmarks/train_tiny.py export --arch moe --work ... --out models/tiny-moe
      re-export the latest checkpoint only.

Everything is seeded; the data order only depends on --seed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import sysconfig
import time

import numpy as np

# ----------------------------------------------------------------------------------------
# Corpus
# ----------------------------------------------------------------------------------------

# Held-out modules (paths relative to the stdlib folder); never used for training or for
# the tokenizer. About 470 KB of source.
HELDOUT = [
    "json/", "csv.py", "textwrap.py", "shlex.py", "heapq.py", "bisect.py", "fractions.py",
    "statistics.py", "string.py", "glob.py", "fnmatch.py", "difflib.py", "calendar.py",
    "pprint.py", "queue.py", "sched.py", "colorsys.py", "getopt.py", "configparser.py",
    "wave.py",
]
EXCLUDED_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 4096
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def is_heldout(rel: str) -> bool:
    rel = rel.replace(os.sep, "/")
    return any(rel.startswith(h) if h.endswith("/") else rel == h for h in HELDOUT)


def corpus_files(split: str) -> list[str]:
    """Sorted absolute paths of the stdlib .py files of one split ('train' or 'eval')."""
    root = stdlib_dir()
    out = []
    for r, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in EXCLUDED_DIRS and not d.startswith("config-"))
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            path = os.path.join(r, f)
            held = is_heldout(os.path.relpath(path, root))
            if (split == "eval") == held:
                out.append(path)
    return out


def read_text(path: str) -> str:
    with open(path, "rb") as fh:
        return fh.read().decode("utf-8", errors="replace")


def encode_files(tok, files: list[str]) -> np.ndarray:
    """Concatenate files as `<|endoftext|>` + file text, encoded to uint16."""
    eot = tok.token_to_id("<|endoftext|>")
    texts = [read_text(p) for p in files]
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.append(eot)
        ids.extend(enc.ids)
    return np.asarray(ids, dtype=np.uint16)


def train_tokenizer(files: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2,
    )
    tok.train_from_iterator((read_text(p) for p in files), trainer=trainer, length=len(files))
    return tok


def cmd_prepare(args) -> None:
    os.makedirs(args.work, exist_ok=True)
    tr, ev = corpus_files("train"), corpus_files("eval")
    t0 = time.time()
    tok = train_tokenizer(tr)
    tok.save(os.path.join(args.work, "tokenizer.json"))
    train_ids, eval_ids = encode_files(tok, tr), encode_files(tok, ev)
    np.save(os.path.join(args.work, "train.npy"), train_ids)
    np.save(os.path.join(args.work, "eval.npy"), eval_ids)
    tb = sum(os.path.getsize(p) for p in tr)
    eb = sum(os.path.getsize(p) for p in ev)
    info = dict(train_files=len(tr), train_bytes=tb, train_tokens=int(train_ids.size),
                eval_files=len(ev), eval_bytes=eb, eval_tokens=int(eval_ids.size),
                vocab=tok.get_vocab_size(), seconds=round(time.time() - t0, 1))
    with open(os.path.join(args.work, "data_info.json"), "w") as fh:
        json.dump(info, fh, indent=1)
    print(json.dumps(info))


# ----------------------------------------------------------------------------------------
# Model: compact re-implementation with the exact maths of transformers' Llama / Mixtral
# ----------------------------------------------------------------------------------------

ARCHS = {
    # hidden 256, 6 layers, 8 q heads / 2 kv heads of 32, tied embeddings
    "moe": dict(hidden=256, layers=6, heads=8, kv_heads=2, head_dim=32, inter=256,
                experts=8, top_k=2),
    "dense": dict(hidden=256, layers=6, heads=8, kv_heads=2, head_dim=32, inter=1024,
                  experts=0, top_k=0),
}
ROPE_THETA = 500000.0
MAX_POS = 16384
RMS_EPS = 1e-5


def build_module(arch: dict, vocab: int):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    H, nh, nkv, hd = arch["hidden"], arch["heads"], arch["kv_heads"], arch["head_dim"]

    class RMSNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(H))

        def forward(self, x):
            xf = x.float()
            return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + RMS_EPS)).to(x.dtype) * self.weight

    def rotate_half(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(H, nh * hd, bias=False)
            self.k_proj = nn.Linear(H, nkv * hd, bias=False)
            self.v_proj = nn.Linear(H, nkv * hd, bias=False)
            self.o_proj = nn.Linear(nh * hd, H, bias=False)

        def forward(self, x, cos, sin):
            B, T, _ = x.shape
            q = self.q_proj(x).view(B, T, nh, hd).transpose(1, 2)
            k = self.k_proj(x).view(B, T, nkv, hd).transpose(1, 2)
            v = self.v_proj(x).view(B, T, nkv, hd).transpose(1, 2)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            if x.is_cuda:  # expand the kv heads: the flash kernel wants equal head counts
                k, v = (t.repeat_interleave(nh // nkv, dim=1) for t in (k, v))
                y = F.scaled_dot_product_attention(q.to(k.dtype), k, v, is_causal=True)
            else:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, nh * hd))

    class MLP(nn.Module):  # Llama MLP / one Mixtral expert (w1=gate, w3=up, w2=down)
        def __init__(self, inter):
            super().__init__()
            self.gate_proj = nn.Linear(H, inter, bias=False)
            self.up_proj = nn.Linear(H, inter, bias=False)
            self.down_proj = nn.Linear(inter, H, bias=False)

        def forward(self, x, stats):
            a = F.relu(self.gate_proj(x))
            stats["l1"].append(a.mean())
            stats["nz"].append((a.detach() > 0).float().mean())
            return self.down_proj(a * self.up_proj(x))

    class MoE(nn.Module):
        def __init__(self):
            super().__init__()
            E, I = arch["experts"], arch["inter"]
            self.gate = nn.Linear(H, E, bias=False)
            # stacked expert weights: w1/w3 (E, I, H), w2 (E, H, I)
            self.w1 = nn.Parameter(torch.empty(E, I, H))
            self.w3 = nn.Parameter(torch.empty(E, I, H))
            self.w2 = nn.Parameter(torch.empty(E, H, I))
            for w in (self.w1, self.w3):
                nn.init.normal_(w, std=H ** -0.5)
            nn.init.normal_(self.w2, std=I ** -0.5)

        def forward(self, x, stats):
            B, T, _ = x.shape
            xf = x.reshape(-1, H)
            logits = self.gate(xf)
            probs = torch.softmax(logits.float(), dim=-1)
            topv, topi = torch.topk(probs, arch["top_k"], dim=-1)
            topv = topv / topv.sum(-1, keepdim=True)
            stats["router"].append((probs, topi))
            out = torch.zeros_like(xf)
            flat_e = topi.reshape(-1)
            order = torch.argsort(flat_e, stable=True)
            counts = torch.bincount(flat_e, minlength=arch["experts"]).tolist()
            tok_idx = order // arch["top_k"]
            wts = topv.reshape(-1)[order].unsqueeze(1).to(x.dtype)
            start = 0
            l1s, nzs = [], []
            for e, c in enumerate(counts):
                if c == 0:
                    continue
                ti = tok_idx[start:start + c]
                xe = xf[ti]
                a = F.relu(xe @ self.w1[e].t())
                l1s.append(a.sum())
                nzs.append((a.detach() > 0).float().sum())
                ye = (a * (xe @ self.w3[e].t())) @ self.w2[e].t()
                out.index_add_(0, ti, ye * wts[start:start + c])
                start += c
            n = float(flat_e.numel() * self.w1.shape[1])
            stats["l1"].append(torch.stack(l1s).sum() / n)
            stats["nz"].append(torch.stack(nzs).sum() / n)
            return out.view(B, T, H)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.input_layernorm = RMSNorm()
            self.self_attn = Attn()
            self.post_attention_layernorm = RMSNorm()
            self.ffn = MoE() if arch["experts"] else MLP(arch["inter"])

        def forward(self, x, cos, sin, stats):
            x = x + self.self_attn(self.input_layernorm(x), cos, sin)
            return x + self.ffn(self.post_attention_layernorm(x), stats)

    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(vocab, H)
            self.layers = nn.ModuleList([Block() for _ in range(arch["layers"])])
            self.norm = RMSNorm()
            inv = 1.0 / (ROPE_THETA ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
            self.register_buffer("inv_freq", inv, persistent=False)
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=H ** -0.5 if m.in_features == H else m.in_features ** -0.5)
                elif isinstance(m, nn.Embedding):
                    nn.init.normal_(m.weight, std=0.02)
            # scale the residual-branch outputs down with depth (GPT-2 style)
            for blk in self.layers:
                blk.self_attn.o_proj.weight.data.mul_((2 * arch["layers"]) ** -0.5)
                f = blk.ffn
                if isinstance(f, MoE):
                    f.w2.data.mul_((2 * arch["layers"]) ** -0.5)
                else:
                    f.down_proj.weight.data.mul_((2 * arch["layers"]) ** -0.5)

        def forward(self, ids, stats):
            T = ids.shape[1]
            pos = torch.arange(T, dtype=torch.float32, device=ids.device)
            fr = torch.outer(pos, self.inv_freq)
            emb = torch.cat((fr, fr), dim=-1)
            cos, sin = emb.cos()[None, None], emb.sin()[None, None]
            x = self.embed_tokens(ids)
            for blk in self.layers:
                x = blk(x, cos, sin, stats)
            x = self.norm(x)
            return x @ self.embed_tokens.weight.t()  # tied lm head

    return TinyLM()


def new_stats():
    return {"l1": [], "nz": [], "router": []}


def load_balancing_loss(router, num_experts: int, top_k: int):
    """Mixtral/Switch auxiliary loss over all layers' tokens (as transformers computes it)."""
    import torch

    probs = torch.cat([p for p, _ in router], 0)
    idx = torch.cat([i for _, i in router], 0)
    mask = torch.nn.functional.one_hot(idx, num_experts).float()  # (N, k, E)
    tokens_per_expert = mask.mean(0)  # (k, E)
    prob_per_expert = probs.mean(0)  # (E,)
    return (tokens_per_expert * prob_per_expert.unsqueeze(0)).sum() * num_experts


# ----------------------------------------------------------------------------------------
# Hugging Face export
# ----------------------------------------------------------------------------------------


def hf_config(arch_name: str, vocab: int):
    a = ARCHS[arch_name]
    common = dict(
        vocab_size=vocab, hidden_size=a["hidden"], num_hidden_layers=a["layers"],
        num_attention_heads=a["heads"], num_key_value_heads=a["kv_heads"], head_dim=a["head_dim"],
        intermediate_size=a["inter"], hidden_act="relu", max_position_embeddings=MAX_POS,
        rms_norm_eps=RMS_EPS, rope_theta=ROPE_THETA, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=0, pad_token_id=0, attention_dropout=0.0,
    )
    if a["experts"]:
        from transformers import MixtralConfig

        return MixtralConfig(num_local_experts=a["experts"], num_experts_per_tok=a["top_k"],
                             router_aux_loss_coef=0.02, output_router_logits=False,
                             sliding_window=None, **common)
    from transformers import LlamaConfig

    return LlamaConfig(attention_bias=False, mlp_bias=False, **common)


def hf_name_pairs(arch_name: str) -> list[tuple[str, str, int | None]]:
    """``(our name, legacy HF name, expert)`` for every tensor, the one table both conversions use:
    ``expert`` is the index into our stacked ``ffn.w1/w2/w3`` ``[E, ...]`` (None for the others).
    The HF names are the legacy per-expert ones (what transformers 5 writes on save)."""
    a = ARCHS[arch_name]
    pairs: list[tuple[str, str, int | None]] = [("embed_tokens.weight", "model.embed_tokens.weight", None),
                                                ("norm.weight", "model.norm.weight", None)]
    for i in range(a["layers"]):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        pairs += [(p + n, q + n, None) for n in ("input_layernorm.weight", "post_attention_layernorm.weight")]
        pairs += [(p + f"self_attn.{n}.weight", q + f"self_attn.{n}.weight", None)
                  for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        if a["experts"]:
            pairs.append((p + "ffn.gate.weight", q + "block_sparse_moe.gate.weight", None))
            pairs += [(p + f"ffn.{w}", q + f"block_sparse_moe.experts.{e}.{w}.weight", e)
                      for e in range(a["experts"]) for w in ("w1", "w2", "w3")]
        else:
            pairs += [(p + f"ffn.{n}.weight", q + f"mlp.{n}.weight", None) for n in ("gate_proj", "up_proj", "down_proj")]
    return pairs


def to_hf_state_dict(sd: dict, arch_name: str) -> dict:
    """Our state dict under the legacy HF names (experts unstacked)."""
    return {hf: sd[ours] if e is None else sd[ours][e].contiguous() for ours, hf, e in hf_name_pairs(arch_name)}


def from_hf_state_dict(hf: dict, arch_name: str) -> dict:
    """Inverse of :func:`to_hf_state_dict`: legacy HF names -> our parameter names (fp32)."""
    import torch

    sd: dict = {}
    stacked: dict[str, list] = {}
    for ours, name, e in hf_name_pairs(arch_name):  # experts come in increasing order
        if e is None:
            sd[ours] = hf[name]
        else:
            stacked.setdefault(ours, []).append(hf[name])
    sd.update({ours: torch.stack(parts) for ours, parts in stacked.items()})
    return {k: v.float() for k, v in sd.items()}


def load_hf_folder(folder: str, arch_name: str) -> dict:
    from safetensors.torch import load_file

    return from_hf_state_dict(load_file(os.path.join(folder, "model.safetensors")), arch_name)


def save_state_parts(sd: dict, folder: str, meta: dict, part_bytes: int = 12 << 20) -> None:
    """fp32 state dict as safetensors files of at most ``part_bytes`` each (+ meta.json): small
    enough to come back from a GPU machine whose file transfers are capped."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    part, size, n = {}, 0, 0
    for k, v in sd.items():
        v = v.detach().float().cpu().contiguous()
        if part and size + v.nbytes > part_bytes:
            save_file(part, os.path.join(folder, f"part{n}.safetensors"))
            part, size, n = {}, 0, n + 1
        part[k], size = v, size + v.nbytes
    save_file(part, os.path.join(folder, f"part{n}.safetensors"))
    with open(os.path.join(folder, "meta.json"), "w") as fh:
        json.dump(meta, fh, indent=1)


def load_state_parts(folder: str) -> tuple[dict, dict]:
    import glob

    from safetensors.torch import load_file

    sd: dict = {}
    for f in sorted(glob.glob(os.path.join(folder, "part*.safetensors"))):
        sd.update(load_file(f))
    with open(os.path.join(folder, "meta.json")) as fh:
        return sd, json.load(fh)


def long_context_eval(model, eval_ids: np.ndarray, seq: int, device, vocab: int,
                      buckets=(0, 256, 1024, 4096, 16384)) -> dict:
    """Held-out loss and top-1 accuracy by position range over the eval split cut into
    non-overlapping windows of ``seq`` tokens (how well the model uses long contexts)."""
    import torch
    import torch.nn.functional as F

    n_win = (eval_ids.size - 1) // seq
    loss = torch.zeros(seq, dtype=torch.float64)
    acc = torch.zeros(seq, dtype=torch.float64)
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        for w in range(n_win):
            o = w * seq
            x = torch.from_numpy(eval_ids[o:o + seq][None]).to(device)
            y = torch.from_numpy(eval_ids[o + 1:o + seq + 1]).to(device)
            lg = model(x, new_stats())[0].float()
            loss += F.cross_entropy(lg, y, reduction="none").double().cpu()
            acc += (lg.argmax(-1) == y).double().cpu()
    model.train()
    out = {"windows": n_win, "seq": seq}
    for lo, hi in itertools.pairwise(buckets):
        if lo >= seq:
            break
        hi = min(hi, seq)
        out[f"loss_{lo}_{hi}"] = round(loss[lo:hi].sum().item() / (n_win * (hi - lo)), 4)
        out[f"acc_{lo}_{hi}"] = round(acc[lo:hi].sum().item() / (n_win * (hi - lo)), 4)
    return out


def write_tokenizer_files(work: str, out: str, vocab: int) -> None:
    import shutil

    shutil.copy(os.path.join(work, "tokenizer.json"), os.path.join(out, "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "unk_token": None, "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "model_max_length": MAX_POS,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "chat_template": CHAT_TEMPLATE,
    }
    with open(os.path.join(out, "tokenizer_config.json"), "w") as fh:
        json.dump(cfg, fh, indent=2)
    with open(os.path.join(out, "special_tokens_map.json"), "w") as fh:
        json.dump({"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                   "pad_token": "<|endoftext|>",
                   "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}, fh, indent=2)


def export_hf(model, arch_name: str, vocab: int, work: str, out: str, meta: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    os.makedirs(out, exist_ok=True)
    cfg = hf_config(arch_name, vocab)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    hf_sd = to_hf_state_dict({k: v.detach().float() for k, v in model.state_dict().items()}, arch_name)
    # load through a temporary legacy-named safetensors file so transformers applies its own
    # legacy -> fused conversion (the same path a user's from_pretrained takes)
    from safetensors.torch import save_file

    tmp = os.path.join(work, f"hf_tmp_{arch_name}")
    os.makedirs(tmp, exist_ok=True)
    cfg.save_pretrained(tmp)
    save_file(hf_sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    hf.eval()
    model.eval()
    ids = torch.randint(0, vocab, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids, new_stats())
        theirs = hf(ids).logits
    err = (ours - theirs).abs().max().item()
    print(f"export check: max |ours - transformers| logits = {err:.2e}", flush=True)
    assert err < 1e-3, err
    hf = hf.to(torch.bfloat16)
    from transformers import GenerationConfig

    hf.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=[0, 2], pad_token_id=0,
                                            do_sample=False, max_new_tokens=128)
    hf.save_pretrained(out)
    write_tokenizer_files(work, out, vocab)
    with open(os.path.join(out, "training_info.json"), "w") as fh:
        json.dump(meta, fh, indent=1)


# ----------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------


def schedule_progress(step: int, total: int, warmup: int, elapsed: float, budget: float,
                      warm_elapsed: float | None) -> float:
    """Fraction of the cosine phase done: by steps, or by wall time when a budget is set
    (whichever is further along, so a time-limited run still finishes its decay)."""
    t = (step - warmup) / max(1, total - warmup)
    if budget > 0 and warm_elapsed is not None:
        t = max(t, (elapsed - warm_elapsed) / max(1e-9, budget - warm_elapsed))
    return min(1.0, max(0.0, t))


def lr_at(step: int, warmup: int, peak: float, t: float, final_frac: float = 0.05) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def cmd_train(args) -> None:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    arch = ARCHS[args.arch]
    train_ids = np.load(os.path.join(args.work, "train.npy")).astype(np.int64)
    eval_ids = np.load(os.path.join(args.work, "eval.npy")).astype(np.int64)
    vocab = VOCAB_SIZE
    model = build_module(arch, vocab)
    if args.init_hf:  # fine-tune a shipped checkpoint (fresh optimizer state)
        model.load_state_dict(load_hf_folder(args.init_hf, args.arch))
        print(f"initialised from {args.init_hf}", flush=True)
    model.to(device)
    long_before = None
    if args.long_eval:
        long_before = long_context_eval(model, eval_ids, args.long_eval, device, vocab)
        print("long-context eval before:", json.dumps(long_before), flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"arch={args.arch} params={n_params/1e6:.2f}M train_tokens={train_ids.size} "
          f"eval_tokens={eval_ids.size}", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=False)
    ckpt_path = os.path.join(args.work, f"ckpt_{args.arch}.pt")
    step, l1_coef, elapsed0, warm_el = 0, args.l1, 0.0, None
    cycle_start = 0  # first step of the current warmup + cosine cycle
    rng = np.random.default_rng(args.seed)
    if args.resume and os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step, l1_coef, elapsed0 = ck["step"], ck["l1_coef"], ck["elapsed"]
        warm_el = ck.get("warm_elapsed")
        cycle_start = ck.get("cycle_start", 0)
        rng.bit_generator.state = ck["rng"]
        if args.new_cycle:
            # continued training: a fresh warmup + cosine cycle of --steps steps from here
            cycle_start, warm_el = step, None
        print(f"resumed at step {step} (cycle starts at step {cycle_start})", flush=True)

    S, B = args.seq, args.batch
    ev_rng = np.random.default_rng(1234)
    ev_off = ev_rng.integers(0, eval_ids.size - S - 1, size=args.eval_windows)
    ev_x = torch.from_numpy(np.stack([eval_ids[o:o + S] for o in ev_off]))
    ev_y = torch.from_numpy(np.stack([eval_ids[o + 1:o + S + 1] for o in ev_off]))

    def evaluate():
        model.eval()
        tot_loss, tot_acc, n = 0.0, 0.0, 0
        with torch.no_grad():
            for i in range(0, ev_x.shape[0], 8):
                lg = model(ev_x[i:i + 8].to(device), new_stats())
                y = ev_y[i:i + 8].to(device)
                tot_loss += F.cross_entropy(lg.reshape(-1, vocab), y.reshape(-1), reduction="sum").item()
                tot_acc += (lg.argmax(-1) == y).sum().item()
                n += y.numel()
        model.train()
        return tot_loss / n, tot_acc / n

    def save_ckpt():
        tmp = ckpt_path + ".tmp"
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                    "l1_coef": l1_coef, "elapsed": elapsed0 + time.time() - t_start, "warm_elapsed": warm_el,
                    "cycle_start": cycle_start, "rng": rng.bit_generator.state, "args": vars(args)}, tmp)
        os.replace(tmp, ckpt_path)

    model.train()
    t_start = time.time()
    last_ckpt = time.time()
    log_loss = log_nz = log_aux = 0.0
    log_n = 0
    budget = args.max_minutes * 60
    while True:
        el = elapsed0 + time.time() - t_start
        if args.budget_file and step % 5 == 0 and os.path.exists(args.budget_file):
            try:  # live override of the wall-time budget (minutes), e.g. when the box is busy
                budget = float(open(args.budget_file).read().strip()) * 60
            except ValueError:
                pass
        cstep = step - cycle_start
        if cstep >= args.warmup and warm_el is None:
            warm_el = el
        prog = schedule_progress(cstep, args.steps, args.warmup, el, budget, warm_el)
        if cstep >= args.steps or (budget > 0 and el >= budget):
            break
        lr = lr_at(cstep, args.warmup, args.lr, prog)
        for g in opt.param_groups:
            g["lr"] = lr
        off = rng.integers(0, train_ids.size - S - 1, size=B)
        x = torch.from_numpy(np.stack([train_ids[o:o + S] for o in off])).to(device, non_blocking=True)
        y = torch.from_numpy(np.stack([train_ids[o + 1:o + S + 1] for o in off])).to(device, non_blocking=True)
        stats = new_stats()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            logits = model(x, stats)
        ce = F.cross_entropy(logits.float().reshape(-1, vocab), y.reshape(-1))
        loss = ce
        if stats["l1"] and l1_coef > 0:
            loss = loss + l1_coef * torch.stack(stats["l1"]).mean()
        aux = torch.zeros((), device=device)
        if arch["experts"]:
            aux = load_balancing_loss(stats["router"], arch["experts"], arch["top_k"])
            loss = loss + args.aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        nz = torch.stack(stats["nz"]).mean().item()
        # adaptive L1: push the zero fraction of the ReLU gate above the target
        if args.sparsity_target > 0 and cstep >= args.warmup:
            if 1 - nz < args.sparsity_target:
                l1_coef = min(args.l1_max, max(l1_coef, 1e-4) * (1 + args.l1_rate))
            else:
                l1_coef = l1_coef / (1 + args.l1_rate)
        log_loss += ce.item(); log_nz += nz; log_aux += aux.item(); log_n += 1
        step += 1
        if step % args.log_every == 0:
            el = elapsed0 + time.time() - t_start
            msg = (f"step {step}/{args.steps} prog {prog:.3f} lr {lr:.2e} loss {log_loss/log_n:.4f} "
                   f"sparsity {1-log_nz/log_n:.3f} l1 {l1_coef:.2e} aux {log_aux/log_n:.3f} "
                   f"tok/s {step*B*S/max(el,1e-9):.0f} elapsed {el/60:.1f}m")
            if step % args.eval_every == 0:
                el_loss, el_acc = evaluate()
                msg += f" | eval loss {el_loss:.4f} acc {el_acc:.4f}"
            print(msg, flush=True)
            log_loss = log_nz = log_aux = 0.0
            log_n = 0
        if time.time() - last_ckpt > args.ckpt_minutes * 60:
            save_ckpt()
            last_ckpt = time.time()
    save_ckpt()
    total_s = elapsed0 + time.time() - t_start
    el_loss, el_acc = evaluate()
    meta = {"arch": args.arch, "steps": step, "cycle_start": cycle_start, "max_steps": args.steps, "max_minutes": budget / 60,
            "batch": B, "seq": S, "lr": args.lr,
            "warmup": args.warmup, "weight_decay": args.wd, "aux_coef": args.aux_coef,
            "final_l1_coef": l1_coef, "sparsity_target": args.sparsity_target,
            "l1_rate": args.l1_rate, "l1_max": args.l1_max,
            "seed": args.seed, "threads": args.threads, "train_seconds": round(total_s, 1),
            "tokens_seen": step * B * S, "params": n_params,
            "eval_subset_loss": round(el_loss, 4), "eval_subset_acc": round(el_acc, 4),
            "device": str(device), "init_hf": args.init_hf,
            "command": " ".join(sys.argv)}
    if args.long_eval:
        meta["long_eval_before"] = long_before
        meta["long_eval_after"] = long_context_eval(model, eval_ids, args.long_eval, device, vocab)
    print(json.dumps(meta), flush=True)
    if args.state_parts:  # export later, where transformers matches the shipped files (cmd_export)
        save_state_parts(model.state_dict(), args.state_parts, meta)
        print("state saved to", args.state_parts, flush=True)
        return
    model.to("cpu")
    export_hf(model, args.arch, vocab, args.work, args.out, meta)
    print("exported to", args.out, flush=True)


def cmd_export(args) -> None:
    import torch

    model = build_module(ARCHS[args.arch], VOCAB_SIZE)
    if args.from_parts:
        sd, meta = load_state_parts(args.from_parts)
        model.load_state_dict(sd)
    else:
        ck = torch.load(os.path.join(args.work, f"ckpt_{args.arch}.pt"), weights_only=False)
        model.load_state_dict(ck["model"])
        meta = {"arch": args.arch, "steps": ck["step"], "train_seconds": round(ck["elapsed"], 1),
                "args": ck["args"]}
    export_hf(model, args.arch, VOCAB_SIZE, args.work, args.out, meta)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--work", default="/tmp/flashtier_tiny")
    t = sub.add_parser("train")
    t.add_argument("--arch", choices=list(ARCHS), required=True)
    t.add_argument("--work", default="/tmp/flashtier_tiny")
    t.add_argument("--out", required=True)
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--seq", type=int, default=256)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--warmup", type=int, default=100)
    t.add_argument("--wd", type=float, default=0.1)
    t.add_argument("--aux-coef", type=float, default=0.02)
    t.add_argument("--l1", type=float, default=0.0)
    t.add_argument("--sparsity-target", type=float, default=0.88,
                   help="adaptive L1 on the ReLU gate outputs: grow the coefficient while the "
                        "training-batch zero fraction is below this (0 = off)")
    t.add_argument("--l1-rate", type=float, default=0.05, help="per-step growth/decay of the L1 coefficient")
    t.add_argument("--l1-max", type=float, default=30.0)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--log-every", type=int, default=25)
    t.add_argument("--eval-every", type=int, default=200)
    t.add_argument("--eval-windows", type=int, default=32)
    t.add_argument("--ckpt-minutes", type=float, default=4.0)
    t.add_argument("--resume", action="store_true")
    t.add_argument("--new-cycle", action="store_true",
                   help="with --resume: start a new warmup + cosine cycle of --steps steps "
                        "(continued training after a finished schedule)")
    t.add_argument("--budget-file", default="",
                   help="optional file holding a number of minutes that overrides --max-minutes live")
    t.add_argument("--max-minutes", type=float, default=0.0,
                   help="wall-time budget: the cosine decay follows max(step, time) progress and "
                        "training stops when either runs out (0 = steps only, fully reproducible)")
    t.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast on either)")
    t.add_argument("--init-hf", default="", help="start from this exported folder (e.g. models/tiny-moe)")
    t.add_argument("--long-eval", type=int, default=0, metavar="SEQ",
                   help="held-out loss/accuracy by position over windows of SEQ tokens, before and after")
    t.add_argument("--state-parts", default="",
                   help="save the fp32 weights as <=12 MB safetensors parts here instead of exporting "
                        "(then: export --from-parts)")
    t.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast for the matmuls (fp32 master weights); ~2x faster on AVX512-BF16")
    e = sub.add_parser("export")
    e.add_argument("--arch", choices=list(ARCHS), required=True)
    e.add_argument("--work", default="/tmp/flashtier_tiny")
    e.add_argument("--out", required=True)
    e.add_argument("--from-parts", default="", help="a --state-parts folder instead of the checkpoint")
    args = ap.parse_args(argv)
    {"prepare": cmd_prepare, "train": cmd_train, "export": cmd_export}[args.cmd](args)


if __name__ == "__main__":
    main()
