"""Small random GGUF files for the tests: a transformers model saved as a Hugging Face folder, then
written by ``flashtier quantize``; and the reference network with every weight dequantized by the
``gguf`` package (``gguf.quants.dequantize``), independent of flashtier's kernels.

Shapes are multiples of 256 where rows are quantized, so the K-quant formats are exercised.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

COMMON = dict(vocab_size=320, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)


def _configs():
    import transformers as tf

    return {
        "llama": lambda: tf.LlamaConfig(**COMMON, intermediate_size=512, rope_theta=10000.0),
        "qwen2": lambda: tf.Qwen2Config(**COMMON, intermediate_size=512, tie_word_embeddings=True),
        "mixtral": lambda: tf.MixtralConfig(**COMMON, intermediate_size=256, num_local_experts=4, num_experts_per_tok=2),
        "qwen2_moe": lambda: tf.Qwen2MoeConfig(**COMMON, intermediate_size=512, moe_intermediate_size=256,
                                               shared_expert_intermediate_size=256, num_experts=4,
                                               num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1,
                                               mlp_only_layers=[1]),
    }


def make_hf(kind: str, out: Path, seed: int = 0):
    """A random ``kind`` model saved with transformers into ``out``; returns the model."""
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(_configs()[kind]()).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
            elif p.dim() == 2:
                p.mul_(3.0)  # larger weights: logits far from uniform, so greedy tokens are not near ties
    model.save_pretrained(out)
    write_tokenizer(out, COMMON["vocab_size"])
    return model


def write_tokenizer(out: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer of exactly ``vocab_size`` tokens (trained on a few lines of
    code) with a chat template, so the GGUF carries a vocabulary llama.cpp accepts."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    text = ["def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
            "import os\nimport sys\n\nfor line in sys.stdin:\n    print(line.strip())\n"] * 20
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text, trainer)
    assert tok.get_vocab_size() <= vocab_size
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "add_bos_token": False,
        "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"}))


def make_gguf(kind: str, folder: Path, file_type: str, seed: int = 0) -> tuple[Path, object]:
    """(GGUF path, transformers model of the original weights)."""
    from flashtier.checkpoint.quantize import quantize_checkpoint

    hf_dir = folder / "hf"
    model = make_hf(kind, hf_dir, seed)
    path = quantize_checkpoint(hf_dir, folder / f"{kind}-{file_type}.gguf", file_type)
    return path, model


def dequantized_reference(path: Path, hf_dir: Path, out: Path):
    """A transformers model of the GGUF file's weights, each dequantized by ``gguf.quants`` (fp32):
    written as a Hugging Face folder ``out`` (config of ``hf_dir``) and loaded by transformers."""
    import shutil

    import gguf
    import transformers as tf
    from safetensors.torch import save_file

    from flashtier.checkpoint.gguf_checkpoint import GGUFCheckpoint

    ck = GGUFCheckpoint(path)
    cfg = ck.config
    state = {}
    raw = path.read_bytes()
    for name, info in ck.tensors.items():
        data = np.frombuffer(raw, np.uint8, info.nbytes, info.offset)
        if not info.quantized:
            w = data.view({"F32": np.float32, "F16": np.float16}[info.dtype]).astype(np.float32)
        else:
            rows = info.shape[0] if len(info.shape) == 2 else 1
            w = gguf.quants.dequantize(data.reshape(rows, -1), gguf.GGMLQuantizationType(info.ggml_type))
        w = np.asarray(w, np.float32).reshape(info.shape)
        if cfg.rope.interleaved and any(name.endswith(s) for s in ("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")):
            w = _unpermute(w, cfg.num_heads if ".q_proj." in name else cfg.num_kv_heads)
        state[name] = torch.from_numpy(np.ascontiguousarray(w))
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(hf_dir / "config.json", out / "config.json")
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
