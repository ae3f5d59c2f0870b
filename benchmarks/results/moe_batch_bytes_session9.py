"""Expert bytes per token per row, one sequence vs a batch of 8 (session 9 measurement).

    ../shared/tools/memcap.sh 700M -- .venv/bin/python benchmarks/results/moe_batch_bytes_session9.py

Needs ``bench_out/gguf-moe`` (the moe-1.3g bf16 folder ``bench_gguf --scenario moe`` makes).
"""

import time
from pathlib import Path

from flashtier.runtime import open_model

path = str(Path(__file__).resolve().parents[2] / "bench_out" / "gguf-moe")
prompts = [list(range(1 + 7 * i, 17 + 7 * i)) for i in range(8)]
with open_model(path, dram_budget="420M", max_context=80, kv_sequences=8, threads=2) as llm:
    llm.generate([3] * 8, max_new_tokens=2, ignore_eos=True)
    w = llm.weights
    s0 = w.stats()
    t = time.perf_counter(); r = llm.generate(prompts[0], max_new_tokens=32, ignore_eos=True); t1 = time.perf_counter() - t
    s1 = w.stats()
    t = time.perf_counter(); rb = llm.generate_batch(prompts, max_new_tokens=32, ignore_eos=True); t2 = time.perf_counter() - t
    s2 = w.stats()
    print("B1 tok/s", r.stats["decode_tok_s"], "expert bytes/token", (s1["expert_bytes_read"] - s0["expert_bytes_read"]) / 32,
          "hit", s1["expert_hit_rate"])
    print("B8 tok/s", rb[0].stats["batch_decode_tok_s"], "expert bytes/step", (s2["expert_bytes_read"] - s1["expert_bytes_read"]) / 32,
          "uses", s2["expert_uses"] - s1["expert_uses"], "slots", s2["expert_cache"]["slots_per_layer"], "pinned", s2["expert_cache"]["pinned"])
    print({k: s2[k] for k in s2 if "expert_prefetch" in k or "demand" in k})
