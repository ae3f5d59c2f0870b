"""Write a GGUF (f16) of a Llama / Mixtral safetensors checkpoint, for the llama.cpp peer.

Random weights are fine for timing; the tokenizer is a dummy SentencePiece-style vocabulary of the
model's size (llama.cpp requires one to load). Q/K are not permuted for GGUF's rope layout, so the
outputs are not the model's: only the speed is compared.
    python -m flashtier.benchmarks.gguf_export MODEL_DIR OUT.gguf
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from flashtier.checkpoint.folder import Checkpoint, layer_names


def export(model_dir: str | Path, out: str | Path) -> Path:
    import gguf

    ck = Checkpoint(model_dir)
    c = ck.config
    if c.architecture not in ("LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM"):
        raise SystemExit(f"gguf_export supports Llama/Mistral/Mixtral layouts, not {c.architecture}")
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name(Path(model_dir).name)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_heads)
    w.add_head_count_kv(c.num_kv_heads)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope.theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    if c.is_moe:
        w.add_expert_count(c.num_experts)
        w.add_expert_used_count(c.num_experts_per_tok)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    types = [2, 3, 3] + [6] * 256
    tokens += [f"\u2581t{i}" for i in range(c.vocab_size - len(tokens))]
    types += [1] * (c.vocab_size - len(types))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def f16(name: str) -> np.ndarray:
        t = ck.read_tensor(name)
        return t.float().numpy().astype(np.float32 if t.dim() == 1 else np.float16)

    w.add_tensor("token_embd.weight", f16("model.embed_tokens.weight"))
    w.add_tensor("output_norm.weight", f16("model.norm.weight"))
    w.add_tensor("output.weight", f16(ck.lm_head))
    for i in range(c.num_layers):
        n = layer_names(c, i)
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", f16(n.input_norm))
        w.add_tensor(b + "ffn_norm.weight", f16(n.post_attn_norm))
        for src, dst in ((n.q, "attn_q"), (n.k, "attn_k"), (n.v, "attn_v"), (n.o, "attn_output")):
            w.add_tensor(b + dst + ".weight", f16(src))
        if n.router:
            w.add_tensor(b + "ffn_gate_inp.weight", f16(n.router))
            experts = [n.expert(e) for e in range(c.num_experts)]
            for k, dst in enumerate(("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")):
                w.add_tensor(b + dst + ".weight", np.stack([f16(names[k]) for names in experts]))
        else:
            for src, dst in ((n.gate, "ffn_gate"), (n.up, "ffn_up"), (n.down, "ffn_down")):
                w.add_tensor(b + dst + ".weight", f16(src))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(out)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model_dir")
    ap.add_argument("out")
    a = ap.parse_args()
    print(export(a.model_dir, a.out))
