"""Arguments shared by several CLI commands (budgets, model folder) and small output helpers."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from flashtier.errors import CheckpointError

PACKAGE_DIR = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = PACKAGE_DIR / "models" / "tiny-moe"


def add_model_arg(p: argparse.ArgumentParser, optional: bool = True) -> None:
    if optional:
        p.add_argument("model_dir", nargs="?", default=None,
                       help=f"Hugging Face model folder (default: the shipped tiny-moe, {DEFAULT_MODEL})")
    else:
        p.add_argument("model_dir", help="Hugging Face model folder (config.json + *.safetensors)")


def resolve_model_dir(value: str | None) -> Path:
    if value is not None:
        return Path(value)
    if not (DEFAULT_MODEL / "config.json").is_file():
        raise CheckpointError(f"no model folder given and the default model {DEFAULT_MODEL} is missing; pass MODEL_DIR")
    return DEFAULT_MODEL


def add_budget_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("memory budgets")
    g.add_argument("--dram-budget", default=None, metavar="BYTES",
                   help="host memory for weights, e.g. 1G or 700M (default: everything resident)")
    g.add_argument("--device-budget", default=None, metavar="BYTES",
                   help="accelerator memory, e.g. 24G (default: none)")
    g.add_argument("--max-context", type=int, default=None, metavar="TOKENS",
                   help="most tokens per request; the KV cache is budgeted for it (default: model context, 4096 with a budget)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for the model (default: torch's choice)")
    g.add_argument("--compute-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype to compute in (default: the checkpoint's, which keeps outputs exact)")


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    for key in ("dram_budget", "device_budget", "compute_dtype", "max_context", "threads"):
        value = getattr(args, key, None)
        if value is not None:
            opts[key] = value
    return opts


def progress(label: str) -> Any:
    """A callback ``(done, total)`` drawing a one-line progress bar on stderr (only on a terminal)."""
    tty = sys.stderr.isatty()

    def cb(done: int, total: int) -> None:
        if not tty:
            return
        width = 30
        filled = int(width * done / max(total, 1))
        sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return cb
