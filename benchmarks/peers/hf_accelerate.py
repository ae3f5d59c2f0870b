"""transformers + accelerate disk offload (``device_map="auto"``, ``max_memory``, ``offload_folder``).

    python -m flashtier.benchmarks.peers.hf_accelerate MODEL_DIR --max-memory 600MiB --tokens 16
    python -m flashtier.benchmarks.peers.hf_accelerate MODEL_DIR --gpu-memory 800MiB   # GPU + CPU offload
Prints one JSON line: {"peer", "decode_tok_s", "prefill_s", "tokens"}. Without --max-memory the
whole model is loaded in memory. With --gpu-memory, accelerate places that much of the model on
GPU 0 and the rest in CPU memory (its hooks copy each offloaded layer to the GPU when it runs).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--max-memory", default=None, help="e.g. 600MiB: CPU memory for weights; the rest is offloaded to disk")
    ap.add_argument("--gpu-memory", default=None, help="e.g. 800MiB: GPU 0 memory for weights; the rest stays in CPU memory")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

    kwargs: dict = {"dtype": torch.bfloat16}
    offload = None
    if a.gpu_memory:
        kwargs.update(device_map="auto", max_memory={0: a.gpu_memory, "cpu": a.max_memory or "500GiB"})
    elif a.max_memory:
        offload = tempfile.mkdtemp(prefix="accel-offload-")
        kwargs.update(device_map="auto", max_memory={"cpu": a.max_memory}, offload_folder=offload, offload_state_dict=True)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, **kwargs).eval()
    load_s = time.perf_counter() - t0
    stamps: list[float] = []

    class Clock(LogitsProcessor):
        def __call__(self, input_ids, scores):  # called once per generated token
            stamps.append(time.perf_counter())
            return scores

    ids = torch.arange(3, 3 + a.prompt_len)[None].to("cuda" if a.gpu_memory else "cpu")
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=a.tokens, min_new_tokens=a.tokens, do_sample=False,
                       logits_processor=LogitsProcessorList([Clock()]), pad_token_id=0)
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    print(json.dumps({"peer": "accelerate" if a.max_memory or a.gpu_memory else "transformers", "decode_tok_s": decode,
                      "prefill_s": stamps[0] - start, "tokens": len(stamps), "load_s": load_s}))


if __name__ == "__main__":
    main()
