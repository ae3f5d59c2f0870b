"""``flashtier calibrate MODEL_DIR --text FILE``: train the sparse FFN's activation predictors.

Runs the model in memory over FILE, records each dense FFN layer's input and whether each neuron
was positive, fits one low-rank predictor per layer (balanced loss) and writes
``MODEL_DIR/sparsity_predictor.safetensors``. ``generate --sparse-ffn`` then reads only the
neurons they predict (after ``flashtier convert MODEL_DIR OUT --bundle``; calibrate OUT, or copy
the file there: it is tied to the weights, not the folder).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="train the sparse FFN's low-rank activation predictors", description=__doc__)
    p.add_argument("model_dir")
    p.add_argument("--text", required=True, metavar="FILE", help="calibration text (e.g. code like what you will run)")
    p.add_argument("--rank", type=int, default=128, help="rank of each layer's predictor (default 128)")
    p.add_argument("--target-recall", type=float, default=0.99,
                   help="share of truly active neurons each layer's threshold keeps on held-out rows (default 0.99)")
    p.add_argument("--steps", type=int, default=300, help="optimiser steps per layer (0: eigen initialisation only)")
    p.add_argument("--max-tokens", type=int, default=32768, help="tokens of FILE recorded (default 32768)")
    p.add_argument("--json", action="store_true", help="print the per-layer metrics as one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flashtier.errors import InputError
    from flashtier.prefetch.sparsity import PredictorTraining
    from flashtier.runtime.calibrate import CalibrationText, calibrate
    from flashtier.runtime.tokenizer import Tokenizer

    model_dir = Path(args.model_dir)
    if not (model_dir / "tokenizer.json").is_file():
        raise InputError(f"{model_dir} has no tokenizer.json: calibrate needs it to read --text")
    try:
        text = Path(args.text).read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise InputError(f"cannot read --text {args.text}: {e.strerror}") from e
    ids = Tokenizer(model_dir).encode(text)
    training = PredictorTraining(rank=args.rank, target_recall=args.target_recall, steps=args.steps)
    log = None if args.json else (lambda line: print(line, file=sys.stderr))
    path, predictors = calibrate(model_dir, ids, training, CalibrationText(max_tokens=args.max_tokens), log=log)
    if args.json:
        print(json.dumps({"path": str(path), "bytes": predictors.nbytes,
                          "layers": {i: p.metrics | {"threshold": p.threshold} for i, p in predictors.layers.items()}}))
    else:
        print(path)
    return 0
