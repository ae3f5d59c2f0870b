"""llama.cpp through llama-cpp-python (mmap, 2 threads) on a GGUF.

    python -m flashtier.benchmarks.peers.llamacpp MODEL.gguf --tokens 16
Prints one JSON line: {"peer", "decode_tok_s", "prefill_s", "tokens"}.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(model_path=a.gguf, n_ctx=256, n_threads=a.threads, n_threads_batch=a.threads, use_mmap=True,
                verbose=False, n_batch=64)
    load_s = time.perf_counter() - t0
    prompt = list(range(300, 300 + a.prompt_len))
    stamps = []
    start = time.perf_counter()
    for _ in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        stamps.append(time.perf_counter())
        if len(stamps) >= a.tokens:
            break
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    print(json.dumps({"peer": "llama.cpp", "decode_tok_s": decode, "prefill_s": stamps[0] - start,
                      "tokens": len(stamps), "load_s": load_s}))


if __name__ == "__main__":
    main()
