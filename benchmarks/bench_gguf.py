"""Quantized GGUF files: flashtier vs llama.cpp on the very same file, under a real memory cap.

    python -m flashtier.benchmarks.bench_gguf --scenario dense-fit [--type q4_k_m] [--repeat 3] [--q8] [--fma]

Scenarios (the GGUF issue's targets):
  * ``dense-fit``: dense-1.7g shapes (hidden 2048, 16 layers, intermediate 5632, vocab 32000),
    1 GiB cap: the model fits; flashtier >= 1.0x llama.cpp.
  * ``dense-big``: ~3B Llama shapes (hidden 3072, 28 layers, intermediate 8192, vocab 32000),
    1 GiB cap: does not fit; flashtier >= 1.5x llama.cpp and >= 85% of the disk-bound limit.
  * ``moe``: moe-1.3g shapes, 700 MiB cap; ``moe-big``: a Mixtral-style file of ~2.5 GB, 1 GiB cap.

Each scenario makes a random-weight checkpoint (``make-model``), writes it as an f16 GGUF with
``flashtier quantize --type f16`` and quantizes that with llama.cpp's own quantizer
(``llama_model_quantize``, what users download). Then, in interleaved rounds: the disk (bench-io),
flashtier (``generate FILE.gguf --dram-budget B``) and llama.cpp (mmap, 2 threads, no repack)
under ``memcap.sh``; flashtier's disk-bound limit is the disk speed of the round divided by its
bytes read from storage per token. Results go to ``benchmarks/results/gguf_<scenario>_<type>.*``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from flashtier.benchmarks.common import PY, REPO, bench_io, machine, publish, run_json

SCENARIOS: dict[str, dict] = {
    "dense-fit": {"preset": "dense-1.7g", "cap": "1G", "budget": None, "tokens": 32},
    "dense-big": {"config": {"architectures": ["LlamaForCausalLM"], "hidden_size": 3072, "num_hidden_layers": 28,
                             "intermediate_size": 8192, "num_attention_heads": 24, "num_key_value_heads": 8,
                             "vocab_size": 32000, "max_position_embeddings": 4096},
                  "arch": "llama", "cap": "1G", "budget": "650M", "tokens": 8},
    "moe": {"preset": "moe-1.3g", "cap": "700M", "budget": "420M", "tokens": 32},
    "moe-big": {"config": {"architectures": ["MixtralForCausalLM"], "hidden_size": 2048, "num_hidden_layers": 16,
                           "intermediate_size": 5632, "num_attention_heads": 16, "num_key_value_heads": 8,
                           "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000,
                           "max_position_embeddings": 4096},
                "arch": "mixtral", "cap": "1G", "budget": "650M", "tokens": 16},
}


def ensure_files(work: Path, scenario: str, ftype: str) -> tuple[Path, Path]:
    """(HF folder, GGUF of ``ftype`` quantized by llama.cpp) for ``scenario``, made once."""
    from flashtier.benchmarks.peers.llamacpp import quantize

    s = SCENARIOS[scenario]
    hf = work / f"gguf-{scenario}"
    if not (hf / "config.json").is_file():
        cmd = [PY, "-m", "flashtier", "make-model", str(hf), "--force"]
        cmd += ["--preset", s["preset"]] if "preset" in s else ["--arch", s["arch"], "--config", json.dumps(s["config"])]
        subprocess.run(cmd, check=True)
    f16 = work / f"gguf-{scenario}-f16.gguf"
    if not f16.is_file():
        subprocess.run([PY, "-m", "flashtier", "quantize", str(hf), str(f16), "--type", "f16"], check=True)
    out = work / f"gguf-{scenario}-{ftype}.gguf"
    if not out.is_file():
        quantize(str(f16), str(out), ftype)
    return hf, out


def flashtier_cmd(gguf: Path, tokens: int, budget: str | None, threads: int, activations: str = "f32",
                  huge_pages: str = "on") -> list[str]:
    cmd = [PY, "-m", "flashtier", "generate", str(gguf), "--prompt-ids", ",".join(str(i) for i in range(300, 316)),
           "--max-new-tokens", str(tokens), "--greedy", "--ignore-eos", "--json", "--max-context", "256",
           "--threads", str(threads), "--activations", activations, "--huge-pages", huge_pages]
    return cmd + (["--dram-budget", budget] if budget else [])


def llamacpp_cmd(gguf: Path, tokens: int, threads: int) -> list[str]:
    return [PY, "-m", "flashtier.benchmarks.peers.llamacpp", str(gguf), "--tokens", str(tokens), "--threads", str(threads)]


def tok_s(r: dict) -> float:
    return float(r.get("stats", r).get("decode_tok_s", 0.0) or 0.0)


def _percent(x: float | None) -> str:
    return "" if x is None else f"{x * 100:.0f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", choices=sorted(SCENARIOS), default="dense-fit")
    ap.add_argument("--type", default="q4_k_m", help="llama.cpp file type (q4_k_m, q8_0, ...)")
    ap.add_argument("--work", default=str(REPO / "bench_out"))
    ap.add_argument("--cap", default=None, help="memory cap (default: the scenario's)")
    ap.add_argument("--dram-budget", default=None, help="flashtier's weight budget (default: the scenario's)")
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--memory", action="store_true", help="also run both without a cap (flashtier's in-memory speed)")
    ap.add_argument("--q8", action="store_true",
                    help="also run flashtier with --activations q8 (int8 activations, llama.cpp's approximation)")
    ap.add_argument("--fma", action="store_true",
                    help="also run flashtier with --activations f32-fma (exact, the fp32-FMA kernels: the default "
                         "before the split-activation kernels)")
    ap.add_argument("--huge-pages-off", action="store_true",
                    help="also run flashtier (and with --q8 its q8 run) with --huge-pages off: 4 KiB pages only")
    a = ap.parse_args()
    s = SCENARIOS[a.scenario]
    cap = a.cap or s["cap"]
    budget = a.dram_budget if a.dram_budget is not None else s["budget"]
    tokens = a.tokens or s["tokens"]
    work = Path(a.work)
    work.mkdir(exist_ok=True)
    hf, gguf = ensure_files(work, a.scenario, a.type)
    res: dict = {"machine": machine(), "scenario": a.scenario, "type": a.type, "gguf": str(gguf),
                 "gguf_bytes": gguf.stat().st_size, "cap": cap, "dram_budget": budget, "tokens": tokens,
                 "threads": a.threads, "rounds": []}
    runs: list[tuple[str, list[str], str | None]] = [  # (key, command, cap)
        ("flashtier", flashtier_cmd(gguf, tokens, budget, a.threads), cap),
        ("llamacpp", llamacpp_cmd(gguf, tokens, a.threads), cap)]
    if a.q8:
        runs.append(("flashtier_q8", flashtier_cmd(gguf, tokens, budget, a.threads, "q8"), cap))
    if a.fma:
        runs.append(("flashtier_fma", flashtier_cmd(gguf, tokens, budget, a.threads, "f32-fma"), cap))
    if a.huge_pages_off:
        runs.append(("flashtier_4k_pages", flashtier_cmd(gguf, tokens, budget, a.threads, huge_pages="off"), cap))
        if a.q8:
            runs.append(("flashtier_q8_4k_pages", flashtier_cmd(gguf, tokens, budget, a.threads, "q8", "off"), cap))
    if a.memory:
        runs.append(("flashtier_memory", flashtier_cmd(gguf, tokens, None, a.threads), None))
        runs.append(("llamacpp_memory", llamacpp_cmd(gguf, tokens, a.threads), None))
    for i in range(a.repeat):
        rnd = {"disk": bench_io(work)}
        # the runs of a round in a rotated order, so that no variant always runs first after the disk
        # probe (on this shared machine a position effect would read as a kernel difference)
        k = i % len(runs)
        for key, cmd, run_cap in runs[k:] + runs[:k]:
            rnd[key] = run_json(cmd, cap=run_cap)
        res["rounds"].append(rnd)
        print(json.dumps({k: tok_s(v) for k, v in rnd.items() if k != "disk"}), flush=True)
    rows = []
    for rnd in res["rounds"]:
        f, l = rnd["flashtier"], rnd["llamacpp"]
        per_token = f.get("stats", {}).get("bytes_per_token_storage", 0) or 0
        disk = (rnd["disk"].get("disk_read_gb_per_s") or 0) * 1e9
        limit = disk / per_token if per_token else float("inf")
        rows.append({"disk_gb_per_s": rnd["disk"].get("disk_read_gb_per_s"), "flashtier_tok_s": tok_s(f),
                     "llamacpp_tok_s": tok_s(l), "ratio": tok_s(f) / tok_s(l) if tok_s(l) else None,
                     "bytes_per_token": per_token, "disk_limit_tok_s": limit,
                     "of_limit": tok_s(f) / limit if per_token and limit else None,
                     "flashtier_peak_mib": f.get("peak_cgroup_mib"), "llamacpp_peak_mib": l.get("peak_cgroup_mib"),
                     "flashtier_error": f.get("error"), "llamacpp_error": l.get("error"),
                     "flashtier_memory_tok_s": tok_s(rnd["flashtier_memory"]) if "flashtier_memory" in rnd else None,
                     "llamacpp_memory_tok_s": tok_s(rnd["llamacpp_memory"]) if "llamacpp_memory" in rnd else None,
                     "flashtier_q8_tok_s": tok_s(rnd["flashtier_q8"]) if "flashtier_q8" in rnd else None,
                     "flashtier_fma_tok_s": tok_s(rnd["flashtier_fma"]) if "flashtier_fma" in rnd else None,
                     "flashtier_4k_pages_tok_s": tok_s(rnd["flashtier_4k_pages"]) if "flashtier_4k_pages" in rnd else None,
                     "flashtier_q8_4k_pages_tok_s":
                         tok_s(rnd["flashtier_q8_4k_pages"]) if "flashtier_q8_4k_pages" in rnd else None})
    res["summary"] = rows
    mid = sorted(rows, key=lambda r: r["flashtier_tok_s"])[len(rows) // 2]
    res["median_round"] = mid
    lines = [
        f"Machine: {res['machine']}; {a.scenario} as {a.type.upper()} by llama.cpp's quantizer "
        f"({res['gguf_bytes'] / 1e9:.2f} GB), cap {cap}, flashtier --dram-budget {budget or 'none (all resident)'}, "
        f"{a.threads} threads, {tokens} tokens after a 16-token prompt.",
        "",
        "| round | disk GB/s | flashtier tok/s | llama.cpp tok/s | flashtier / llama.cpp | flashtier MB/token read | % of disk-bound limit | peak MiB flashtier / llama.cpp |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *[f"| {i + 1} | {r['disk_gb_per_s']} | {r['flashtier_tok_s']:.2f} | {r['llamacpp_tok_s']:.2f} | "
          f"{r['ratio'] or 0:.2f}x | {r['bytes_per_token'] / 1e6:.0f} | "
          f"{_percent(r['of_limit'])} | "
          f"{r['flashtier_peak_mib']} / {r['llamacpp_peak_mib']} |" for i, r in enumerate(rows)],
    ]
    if a.q8:
        lines.append("")
        lines.append("flashtier --activations q8 (int8 activations, as llama.cpp): " + "; ".join(
            f"{r['flashtier_q8_tok_s']:.2f} tok/s = {r['flashtier_q8_tok_s'] / r['llamacpp_tok_s']:.2f}x llama.cpp"
            if r["llamacpp_tok_s"] else f"{r['flashtier_q8_tok_s']:.2f} tok/s" for r in rows))
    if a.fma:
        lines.append("")
        lines.append("flashtier --activations f32-fma (exact, fp32-FMA kernels): " + "; ".join(
            f"{r['flashtier_fma_tok_s']:.2f} tok/s = {r['flashtier_fma_tok_s'] / r['llamacpp_tok_s']:.2f}x llama.cpp"
            if r["llamacpp_tok_s"] else f"{r['flashtier_fma_tok_s']:.2f} tok/s" for r in rows))
    if a.memory:
        lines.append("")
        lines.append("In memory (no cap): " + "; ".join(
            f"flashtier {r['flashtier_memory_tok_s']:.2f} vs llama.cpp {r['llamacpp_memory_tok_s']:.2f} tok/s" for r in rows))
    errors = [r for r in rows if r["flashtier_error"] or r["llamacpp_error"]]
    if errors:
        lines.append("")
        lines.append("Errors: " + "; ".join(f"flashtier: {r['flashtier_error']} llama.cpp: {r['llamacpp_error']}" for r in errors))
    table = "\n".join(lines)
    publish(f"gguf_{a.scenario.replace('-', '_')}_{a.type}", res, table)


if __name__ == "__main__":
    main()
