"""Small random-weight checkpoints written by transformers' own ``save_pretrained``.

Shared by the exactness tests: one factory per supported architecture, with GQA, biases, tied
embeddings, llama3 rope scaling and relu/gelu activations spread over them.
"""

from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(vocab_size=211, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)


def _configs():
    import transformers as tf

    return {
        "llama": lambda: tf.LlamaConfig(**COMMON, intermediate_size=96, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64, "rope_theta": 500000.0}),
        "llama_tied_relu": lambda: tf.LlamaConfig(**COMMON, intermediate_size=96, tie_word_embeddings=True, hidden_act="relu"),
        "mistral": lambda: tf.MistralConfig(**COMMON, intermediate_size=96, sliding_window=None, hidden_act="gelu"),
        "qwen2": lambda: tf.Qwen2Config(**COMMON, intermediate_size=96, tie_word_embeddings=True),
        "mixtral": lambda: tf.MixtralConfig(**COMMON, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
        "qwen2_moe": lambda: tf.Qwen2MoeConfig(**COMMON, intermediate_size=96, moe_intermediate_size=32,
                                               shared_expert_intermediate_size=80, num_experts=4,
                                               num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1,
                                               mlp_only_layers=[1]),
    }


ARCHS = ["llama", "llama_tied_relu", "mistral", "qwen2", "mixtral", "qwen2_moe"]


def make_hf_model(kind: str, out: Path, dtype: torch.dtype = torch.float32, seed: int = 0):
    """Save a random ``kind`` model with transformers into ``out``; return the transformers model."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = _configs()[kind]()
    model = tf.AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    # Random init leaves norms at 1 and biases at 0: perturb them so the test sees them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out)
    return model
