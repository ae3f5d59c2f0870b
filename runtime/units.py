"""Leaf helpers every layer may import: compute dtype names and byte sizes written by people
(``--dram-budget 1G``). Nothing here imports the rest of flashtier but its errors."""

from __future__ import annotations

import math

import torch

from flashtier.errors import ConfigError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_bytes(text: str | int | None) -> int | None:
    """``"1G"``, ``"700M"``, ``"512K"``, ``"123"`` -> bytes (binary units); None stays None."""
    if text is None or isinstance(text, int):
        return text
    s = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(s[-1:], 1)
    num = s[:-1] if s[-1:] in "KMGT" else s
    try:
        value = float(num)
    except ValueError:
        raise ConfigError(f"cannot read {text!r} as a size; use a number of bytes or a suffix, e.g. 1G, 700M") from None
    if not math.isfinite(value) or value * mult >= 1 << 62:
        raise ConfigError(f"size {text!r} is not a finite number of bytes below 4 EiB; use e.g. 1G, 700M")
    if value < 0:
        raise ConfigError(f"size {text!r} must not be negative")
    return int(value * mult)
