"""What a quantization type costs: held-out loss of the default model as bf16 and as GGUF types.

    python -m flashtier.benchmarks.bench_quant_quality [MODEL_DIR] [--types q8_0,q6_k,q5_k_m,q4_k_m,q4_0] [--windows 64]

Each type is written with ``flashtier quantize`` (llama.cpp's per-tensor choices) and scored
through flashtier's own forward (fp32 compute, exact with respect to the dequantized weights) on
the held-out modules of ``benchmarks/train_tiny.py`` (never trained on), in non-overlapping
windows of 256 tokens, every position scored. The bf16 row is the safetensors checkpoint through
the same forward. Also reports the agreement of each type's greedy next token with bf16's.

``--q8-types``: those types are also scored with int8 activations (``--activations q8``, the
opt-in approximation llama.cpp always makes). Those products run only for one row, so these rows
are scored by decoding each window one token at a time (every position is a decode step).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from flashtier.benchmarks.common import REPO, machine, publish

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def score(model_path: Path, windows: torch.Tensor, activations: str = "f32") -> tuple[float, torch.Tensor, int]:
    """(mean next-token loss, argmax predictions [W, S-1], model bytes) of ``model_path``; with
    ``activations="q8"`` each window is decoded one token at a time (the int8 path is one-row)."""
    from flashtier.runtime.engine import EngineConfig, Model

    llm = Model(model_path, EngineConfig(compute_dtype="float32", activations=activations))
    losses, preds = [], []
    with torch.inference_mode():
        for w in windows:
            if activations == "q8":
                cache = llm.transformer.new_cache(64)
                logits = torch.cat([llm.transformer.forward(w[i:i + 1], cache, i) for i in range(len(w) - 1)])
            else:
                logits = llm.transformer.forward(w, llm.transformer.new_cache(64), 0, all_logits=True)[:-1]
            losses.append(F.cross_entropy(logits, w[1:], reduction="sum").item())
            preds.append(logits.argmax(-1))
    n = windows.shape[0] * (windows.shape[1] - 1)
    return sum(losses) / n, torch.stack(preds), llm.checkpoint.total_bytes()


def main() -> None:
    from measure_tiny import heldout_ids  # noqa: E402  (benchmarks/ on the path)

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", nargs="?", default=str(REPO / "models" / "tiny-moe"))
    ap.add_argument("--types", default="q8_0,q6_k,q5_k_m,q4_k_m,q4_0")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--q8-types", default="q8_0,q4_k_m", help="types also scored with int8 activations ('' for none)")
    ap.add_argument("--seq", type=int, default=256)
    a = ap.parse_args()
    ids = torch.from_numpy(heldout_ids(a.model_dir))
    n = min(a.windows, (ids.numel() - 1) // a.seq)
    windows = ids[: n * a.seq].view(n, a.seq)
    base_loss, base_pred, base_bytes = score(Path(a.model_dir), windows)
    rows = [("bf16 (safetensors)", base_loss, 1.0, base_bytes)]
    with tempfile.TemporaryDirectory() as tmp:
        from flashtier.checkpoint.quantize import quantize_checkpoint

        for t in a.types.split(","):
            path = quantize_checkpoint(a.model_dir, Path(tmp) / f"{t}.gguf", t)
            loss, pred, nbytes = score(path, windows)
            rows.append((t.upper(), loss, (pred == base_pred).float().mean().item(), nbytes))
            if t in [v.strip() for v in a.q8_types.split(",") if v.strip()]:
                loss, pred, nbytes = score(path, windows, "q8")
                rows.append((f"{t.upper()}, --activations q8", loss, (pred == base_pred).float().mean().item(), nbytes))
            path.unlink()
    res = {"machine": machine(), "model": a.model_dir, "windows": n, "seq": a.seq,
           "rows": [{"type": r[0], "loss": r[1], "top1_agreement_with_bf16": r[2], "weight_bytes": r[3]} for r in rows]}
    lines = [f"{Path(a.model_dir).name}, held-out set: {n} windows x {a.seq} tokens, fp32 compute.", "",
             "| weights | held-out loss (nats) | loss vs bf16 | greedy next token = bf16's | weight bytes |",
             "| --- | --- | --- | --- | --- |",
             *[f"| {name} | {loss:.4f} | {loss - base_loss:+.4f} | {agree * 100:.1f}% | {nbytes / 1e6:.1f} MB |"
               for name, loss, agree, nbytes in rows]]
    table = "\n".join(lines)
    publish("quant_quality", res, table)


if __name__ == "__main__":
    main()
