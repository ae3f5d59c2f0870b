"""``flashtier quantize MODEL_DIR OUT.gguf --type q4_k_m``: write a Hugging Face checkpoint as a
GGUF file of quantized blocks (llama.cpp's formats and per-tensor choices), which flashtier runs
(``flashtier generate OUT.gguf``) and llama.cpp loads. An existing output needs ``--force``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from flashtier.apps.common import progress

TYPES = ("q4_k_m", "q4_k_s", "q5_k_m", "q5_k_s", "q6_k", "q8_0", "q4_0", "f16", "bf16", "f32")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="write a checkpoint as a quantized GGUF file", description=__doc__)
    p.add_argument("model_dir", help="Hugging Face model folder (config.json + *.safetensors)")
    p.add_argument("out", help="the .gguf file to write")
    p.add_argument("--type", default="q4_k_m", choices=TYPES, help="file type (default q4_k_m)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("--no-tokenizer", action="store_true", help="write the weights without the tokenizer")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flashtier.checkpoint.quantize import quantize_checkpoint

    out = quantize_checkpoint(args.model_dir, args.out, args.type, force=args.force,
                              with_tokenizer=not args.no_tokenizer, progress=progress(f"quantizing to {args.type}"))
    from flashtier.checkpoint.folder import Checkpoint

    act = Checkpoint(args.model_dir).config.hidden_act
    if act != "silu":
        print(f"flashtier quantize: note: the model's FFN activation is {act}; flashtier runs the file as such, "
              "llama.cpp loads it but computes SiLU (another function)", file=sys.stderr)
    print(json.dumps({"file": str(out), "type": args.type, "bytes": os.path.getsize(out)}))
    return 0
