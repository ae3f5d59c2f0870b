"""ggml block dequantizers in torch operations: run where the blocks are (a GPU's memory, or the CPU).

The accelerator path multiplies quantized weights by dequantizing them on the device right before
the product (the blocks travel and stay quantized: a page copied over the host link is its
quantized bytes). Each function follows :mod:`flashtier.checkpoint.dequant`'s numpy reference
operation for operation, in float32 and in the same order, so on any device that rounds float32
as IEEE does the result is bit-identical to ``gguf.quants.dequantize`` (tested on the CPU).
"""

from __future__ import annotations

import torch

from flashtier.checkpoint.ggml_types import GGMLType, type_info


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[n, 2] uint8 -> [n, 1] float32 (exact)."""
    return b.contiguous().view(torch.float16).float()


def _k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K packed scales [n, 12] -> 6-bit scales and mins, each [n, 8] uint8."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mn


def _dq_q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b[:, :2])


def _dq_q4_0(b: torch.Tensor) -> torch.Tensor:
    qs = b[:, 2:]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=1).to(torch.int8) - 8  # [n, 32]
    return _f16(b[:, :2]) * q.float()


def _dq_k_min(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Q4_K / Q5_K: ``(d*sc) * q - dmin*m`` per 32-weight sub-block; q [n, 8, 32]."""
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (_f16(b[:, 0:2]) * sc.float()).reshape(n, 8, 1)
    dm = (_f16(b[:, 2:4]) * mn.float()).reshape(n, 8, 1)
    return (d * q.float() - dm).reshape(n, 256)


def _shifts(values: list[int], shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=like.device).reshape(shape)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, 128] -> [n, 8, 32]: per 32 bytes, the low nibbles (one sub-block), then the high ones."""
    qs = qs.reshape(qs.shape[0], 4, 1, 32) >> _shifts([0, 4], (1, 1, 2, 1), qs)
    return (qs & 0x0F).reshape(qs.shape[0], 8, 32)


def _dq_q4_k(b: torch.Tensor) -> torch.Tensor:
    return _dq_k_min(b, _nibbles(b[:, 16:144]))


def _dq_q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    qh = b[:, 16:48].reshape(n, 1, 32) >> _shifts(list(range(8)), (1, 8, 1), b)  # bit j -> sub-block j
    return _dq_k_min(b, _nibbles(b[:, 48:176]) | ((qh & 1) << 4))


def _dq_q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql, qh = b[:, 0:128], b[:, 128:192]
    d = (_f16(b[:, 208:210]) * b[:, 192:208].contiguous().view(torch.int8).float()).reshape(n, 16, 1)
    lo = ql.reshape(n, 2, 1, 64) >> _shifts([0, 4], (1, 1, 2, 1), b)  # [n, 2, 2, 64]
    hi = qh.reshape(n, 2, 1, 32) >> _shifts([0, 2, 4, 6], (1, 1, 4, 1), b)  # [n, 2, 4, 32]
    q = (lo & 0x0F).reshape(n, 2, 4, 32) | ((hi & 3) << 4)
    q = (q.to(torch.int8) - 32).reshape(n, 16, 16).float()
    return (d * q).reshape(n, 256)


_BLOCK_DEQUANT = {
    GGMLType.Q8_0: _dq_q8_0,
    GGMLType.Q4_0: _dq_q4_0,
    GGMLType.Q4_K: _dq_q4_k,
    GGMLType.Q5_K: _dq_q5_k,
    GGMLType.Q6_K: _dq_q6_k,
}


def dequantize_torch(qtype: int | GGMLType, blocks: torch.Tensor, cols: int) -> torch.Tensor:
    """``blocks`` uint8 ``[rows, row_bytes]`` (any device) -> float32 ``[rows, cols]`` on the same
    device, bit-identical to ``gguf.quants.dequantize``."""
    info = type_info(qtype)
    b = blocks.contiguous()
    rows = b.shape[0]
    t = info.ggml_type
    if t == GGMLType.F32:
        return b.view(torch.float32).reshape(rows, cols).clone()
    if t == GGMLType.F16:
        return b.view(torch.float16).float().reshape(rows, cols)
    if t == GGMLType.BF16:
        return b.view(torch.bfloat16).float().reshape(rows, cols)
    return _BLOCK_DEQUANT[t](b.reshape(-1, info.type_size)).reshape(rows, cols)
