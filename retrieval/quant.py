"""KIVI-style asymmetric quantisation of KV for the host tier: keys per channel, values per token.

- Keys ``[T, D]`` (``PER_CHANNEL``): each channel gets its own min and scale per group of
  ``group_size`` consecutive tokens (key outliers live in fixed channels). A last partial group is
  padded by repeating its last token, which does not change its min/max.
- Values ``[T, D]`` (``PER_TOKEN``): each token gets its own min and scale per group of
  ``group_size`` consecutive channels (``D % group_size == 0``).

Codes are ``round((x - min) / scale)`` in ``0 .. 2**bits - 1`` and are packed along ``D``, so any
subset of rows (tokens) can be gathered and dequantised alone. Contract: every dequantised element
is within ``scale / 2`` of the original (plus fp32 rounding); pack/unpack are bit-exact inverses.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from flashtier.errors import ConfigError, InputError

SUPPORTED_BITS = (2, 4, 8)


class QuantAxis(enum.Enum):
    """Which way the quantisation groups run."""

    PER_CHANNEL = "per_channel"
    """Groups of tokens within one channel (KIVI keys)."""
    PER_TOKEN = "per_token"
    """Groups of channels within one token (KIVI values)."""


@dataclass(frozen=True)
class QuantizedTensor:
    """A quantised ``[T, D]`` tensor."""

    codes: torch.Tensor
    """``[T, D * bits / 8]`` uint8, codes packed along D, little end first."""
    scale: torch.Tensor
    """fp32 step: ``[ceil(T / g), D]`` per channel or ``[T, D / g]`` per token."""
    minimum: torch.Tensor
    """fp32 offset, same shape as ``scale``."""
    bits: int
    group_size: int
    axis: QuantAxis
    shape: tuple[int, int]
    """Original ``(T, D)``."""

    def nbytes(self) -> int:
        """Bytes of codes and statistics."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.minimum))


@dataclass(frozen=True)
class QuantError:
    """How far a dequantised tensor is from the original."""

    max_abs: float
    """Largest absolute element error."""
    rms: float
    """Root mean square error."""
    rel_rms: float
    """``rms`` divided by the RMS of the original."""
    bound: float
    """The guaranteed bound on ``max_abs``: half the largest quantisation step."""


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ConfigError(f"quantisation bits must be one of {SUPPORTED_BITS}, got {bits}")


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 ``codes [..., n]`` (each ``< 2**bits``) into ``[..., n * bits / 8]`` bytes."""
    _check_bits(bits)
    per_byte = 8 // bits
    if codes.shape[-1] % per_byte:
        raise InputError(f"pack_bits: last dim {codes.shape[-1]} must be a multiple of {per_byte} for {bits}-bit codes")
    grouped = codes.to(torch.int32).reshape(*codes.shape[:-1], codes.shape[-1] // per_byte, per_byte)  # [..., n/per, per]
    shifts = torch.arange(per_byte, dtype=torch.int32) * bits  # [per]
    return (grouped << shifts).sum(dim=-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``[..., m]`` bytes -> uint8 codes ``[..., m * 8 / bits]``."""
    _check_bits(bits)
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.int32) * bits  # [per]
    codes = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [..., m, per]
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte).to(torch.uint8)


def quantize(x: torch.Tensor, bits: int, group_size: int, axis: QuantAxis) -> QuantizedTensor:
    """Quantise ``x [T, D]`` along ``axis`` with ``bits`` per element and groups of ``group_size``."""
    _check_bits(bits)
    if group_size <= 0:
        raise ConfigError(f"quantisation group_size must be positive, got {group_size}")
    if x.dim() != 2:
        raise InputError(f"quantize expects [T, D], got {tuple(x.shape)}")
    t, d = x.shape
    if d % (8 // bits):
        raise InputError(f"quantize: D={d} must be a multiple of {8 // bits} to pack {bits}-bit codes")
    xf = x.detach().to(torch.float32)
    levels = (1 << bits) - 1
    if axis is QuantAxis.PER_CHANNEL:
        n_groups = -(-t // group_size)
        pad = n_groups * group_size - t
        padded = torch.cat([xf, xf[-1:].expand(pad, d)]) if pad and t else xf
        grouped = padded.reshape(n_groups, group_size, d)  # [Tg, g, D]
        minimum, maximum = grouped.amin(dim=1), grouped.amax(dim=1)  # [Tg, D]
    else:
        if d % group_size:
            raise ConfigError(f"per-token quantisation needs D={d} to be a multiple of group_size={group_size}")
        grouped = xf.reshape(t, d // group_size, group_size)  # [T, D/g, g]
        minimum, maximum = grouped.amin(dim=2), grouped.amax(dim=2)  # [T, D/g]
    scale = (maximum - minimum) / levels
    q = QuantizedTensor(torch.empty(0), scale, minimum, bits, group_size, axis, (t, d))
    step, low = _row_stats(q, torch.arange(t))  # [T, D] each
    codes = torch.round((xf - low) / torch.where(step > 0, step, torch.ones_like(step))).clamp_(0, levels)
    return QuantizedTensor(pack_bits(codes.to(torch.uint8), bits), scale, minimum, bits, group_size, axis, (t, d))


def _row_stats(q: QuantizedTensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Step and minimum expanded to ``[n, D]`` for token ``rows [n]``."""
    if q.axis is QuantAxis.PER_CHANNEL:
        group = rows // q.group_size
        return q.scale[group], q.minimum[group]
    return (q.scale[rows].repeat_interleave(q.group_size, dim=1),
            q.minimum[rows].repeat_interleave(q.group_size, dim=1))


def dequantize(q: QuantizedTensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 ``[T, D]``, or only the token ``rows [n]`` as ``[n, D]``."""
    rows = torch.arange(q.shape[0]) if rows is None else torch.as_tensor(rows, dtype=torch.int64)
    step, low = _row_stats(q, rows)
    return unpack_bits(q.codes[rows], q.bits).to(torch.float32) * step + low


def quantize_keys(keys: torch.Tensor, bits: int = 2, group_size: int = 32) -> QuantizedTensor:
    """KIVI keys: per-channel statistics over groups of ``group_size`` tokens."""
    return quantize(keys, bits, group_size, QuantAxis.PER_CHANNEL)


def quantize_values(values: torch.Tensor, bits: int = 2, group_size: int = 32) -> QuantizedTensor:
    """KIVI values: per-token statistics over groups of ``group_size`` channels."""
    return quantize(values, bits, group_size, QuantAxis.PER_TOKEN)


def quantization_error(x: torch.Tensor, q: QuantizedTensor) -> QuantError:
    """Error of ``dequantize(q)`` against the original ``x``."""
    xf = x.detach().to(torch.float32)
    err = dequantize(q) - xf
    rms = float(err.pow(2).mean().sqrt()) if err.numel() else 0.0
    ref = float(xf.pow(2).mean().sqrt()) if xf.numel() else 0.0
    return QuantError(
        max_abs=float(err.abs().max()) if err.numel() else 0.0,
        rms=rms,
        rel_rms=rms / ref if ref > 0 else 0.0,
        bound=float(q.scale.max()) / 2 if q.scale.numel() else 0.0,
    )
