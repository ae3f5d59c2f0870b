"""Dequantization of ggml blocks (GGUF tensor types) to float32: the format's meaning, used by
checkpoint readers and the runtime alike.

``dequantize`` runs the C extension's ``q_dequantize`` when it is built (AVX-512 / AVX2 / baseline,
rows over its thread pool), else vectorised numpy; both bit-identical to ``gguf.quants.dequantize``.
"""

from __future__ import annotations

import numpy as np
import torch

from flashtier.checkpoint.ggml_types import GGMLType, TypeInfo, type_info

try:
    from flashtier._native import q_dequantize as _native_dequantize
    from flashtier._native import q_matvec as _native_matvec
except ImportError:  # extension not built: numpy fallback
    _native_matvec = None
    _native_dequantize = None


def native_available() -> bool:
    """Whether the C kernels (``flashtier._native.q_matvec`` / ``q_dequantize``) are built."""
    return _native_matvec is not None


def _threads(threads: int | None) -> int:
    return max(1, int(threads) if threads is not None else torch.get_num_threads())


_INFO: dict[int, TypeInfo] = {}


def _info(qtype: int | GGMLType) -> TypeInfo:
    """``type_info`` memoised per id (this runs once per decode product)."""
    info = _INFO.get(qtype)
    if info is None:
        info = _INFO[qtype] = type_info(qtype)  # ValueError for unsupported / unknown types
    return info


def _as_uint8(blocks: torch.Tensor | np.ndarray, what: str) -> np.ndarray:
    """The weight bytes as a contiguous uint8 numpy array (no copy for contiguous CPU input)."""
    if isinstance(blocks, torch.Tensor):
        if blocks.dtype != torch.uint8:
            raise ValueError(f"{what}: blocks must be a uint8 tensor of ggml block bytes, not {blocks.dtype}")
        if blocks.device.type != "cpu":
            raise ValueError(f"{what}: blocks must be on the CPU, not {blocks.device}")
        return (blocks if blocks.is_contiguous() else blocks.contiguous()).numpy()
    arr = np.ascontiguousarray(blocks)
    if arr.dtype != np.uint8:
        raise ValueError(f"{what}: blocks must be uint8 ggml block bytes, not {arr.dtype}")
    return arr


def _geometry(qtype: int | GGMLType, cols: int, nbytes: int, what: str) -> tuple[TypeInfo, int, int]:
    """(type info, rows, row_bytes) of ``nbytes`` of type-``qtype`` rows of ``cols`` weights."""
    info = _info(qtype)
    if cols <= 0:
        raise ValueError(f"{what}: cols must be positive, not {cols}")
    row_bytes = info.row_bytes(cols)  # ValueError unless cols is a multiple of the block size
    if nbytes % row_bytes:
        raise ValueError(f"{what}: {nbytes} bytes are not whole {info.ggml_type.name} rows of {cols} weights "
                         f"({row_bytes} bytes each)")
    return info, nbytes // row_bytes, row_bytes


def dequantize(qtype: int | GGMLType, blocks: torch.Tensor | np.ndarray, rows: int, cols: int,
               threads: int | None = None, *, use_native: bool | None = None) -> torch.Tensor:
    """The fp32 weights ``[rows, cols]`` of ``rows`` ggml rows of type ``qtype``, bit-identical to
    ``gguf.quants.dequantize``. ``blocks``: uint8, ``rows * row_bytes`` bytes (any shape,
    contiguous). ``threads`` / ``use_native`` as in :func:`qmatvec`. ``ValueError`` on mismatched
    sizes or unsupported types. Blocks on an accelerator are dequantized there (torch operations,
    :mod:`flashtier.checkpoint.dequant_torch`), the result on the same device."""
    if isinstance(blocks, torch.Tensor) and blocks.device.type != "cpu":
        from flashtier.checkpoint.dequant_torch import dequantize_torch

        info, n_rows, row_bytes = _geometry(qtype, cols, blocks.numel(), "dequantize")
        if n_rows != rows or blocks.dtype != torch.uint8:
            raise ValueError(f"dequantize: {blocks.numel()} {blocks.dtype} values are not {rows} "
                             f"{info.ggml_type.name} rows of {cols} weights")
        return dequantize_torch(qtype, blocks.reshape(rows, row_bytes), cols)
    w = _as_uint8(blocks, "dequantize")
    info, n_rows, row_bytes = _geometry(qtype, cols, w.size, "dequantize")
    if n_rows != rows:
        raise ValueError(f"dequantize: {w.size} bytes hold {n_rows} {info.ggml_type.name} rows of {cols} weights, "
                         f"not {rows}")
    if use_native and _native_dequantize is None:
        raise RuntimeError("dequantize: the C extension flashtier._native is not built")
    if _native_dequantize is not None and use_native is not False:
        out = np.empty((rows, cols), np.float32)  # [rows, cols]
        _native_dequantize(int(info.ggml_type), w, out, rows, cols, _threads(threads))
        return torch.from_numpy(out)
    return torch.from_numpy(dequantize_numpy(info.ggml_type, w.reshape(rows, row_bytes), cols))


# ---------------------------------------------------------------- numpy dequantizers (fallback)
# Each takes blocks [n, type_size] uint8 and returns [n, block_size] float32, with the float32
# operations of ggml's dequantize_row_* in the same order (so bit-identical to gguf-py).


def _f16(b: np.ndarray) -> np.ndarray:
    """[n, 2] uint8 -> [n, 1] float32 (exact)."""
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _k_scale_min(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K packed scales [n, 12] -> 6-bit scales and mins, each [n, 8] uint8."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=1)
    return sc, mn


def _dq_q8_0(b: np.ndarray) -> np.ndarray:
    return b[:, 2:].view(np.int8).astype(np.float32) * _f16(b[:, :2])


def _dq_q4_0(b: np.ndarray) -> np.ndarray:
    qs = b[:, 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int8) - np.int8(8)  # [n, 32]
    return _f16(b[:, :2]) * q.astype(np.float32)


def _dq_k_min(b: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Q4_K / Q5_K: ``(d*sc) * q - dmin*m`` per 32-weight sub-block; q [n, 8, 32]."""
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (_f16(b[:, 0:2]) * sc.astype(np.float32)).reshape(n, 8, 1)
    dm = (_f16(b[:, 2:4]) * mn.astype(np.float32)).reshape(n, 8, 1)
    return (d * q.astype(np.float32) - dm).reshape(n, 256)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, 128] -> [n, 8, 32]: per 32 bytes, the low nibbles (one sub-block), then the high ones."""
    qs = qs.reshape(qs.shape[0], 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (qs & 0x0F).reshape(qs.shape[0], 8, 32)


def _dq_q4_k(b: np.ndarray) -> np.ndarray:
    return _dq_k_min(b, _nibbles(b[:, 16:144]))


def _dq_q5_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    qh = b[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)  # bit j -> sub-block j
    return _dq_k_min(b, _nibbles(b[:, 48:176]) | ((qh & 1) << 4))


def _dq_q6_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    ql, qh = b[:, 0:128], b[:, 128:192]
    d = (_f16(b[:, 208:210]) * b[:, 192:208].view(np.int8).astype(np.float32)).reshape(n, 16, 1)
    lo = ql.reshape(n, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)  # [n, 2, 2, 64]
    hi = qh.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)  # [n, 2, 4, 32]
    q = (lo & 0x0F).reshape(n, 2, 4, 32) | ((hi & 3) << 4)
    q = (q.astype(np.int8) - np.int8(32)).reshape(n, 16, 16).astype(np.float32)
    return (d * q).reshape(n, 256)


_BLOCK_DEQUANT = {
    GGMLType.Q8_0: _dq_q8_0,
    GGMLType.Q4_0: _dq_q4_0,
    GGMLType.Q4_K: _dq_q4_k,
    GGMLType.Q5_K: _dq_q5_k,
    GGMLType.Q6_K: _dq_q6_k,
}


def dequantize_numpy(qtype: int | GGMLType, blocks: np.ndarray, cols: int) -> np.ndarray:
    """Vectorised numpy dequantization: ``blocks`` uint8 ``[rows, row_bytes]`` -> float32
    ``[rows, cols]``, bit-identical to ``gguf.quants.dequantize``."""
    info = type_info(qtype)
    b = np.ascontiguousarray(blocks, dtype=np.uint8)
    rows = b.shape[0]
    t = info.ggml_type
    if t == GGMLType.F32:
        return b.view(np.float32).reshape(rows, cols).copy()
    if t == GGMLType.F16:
        return b.view(np.float16).astype(np.float32).reshape(rows, cols)
    if t == GGMLType.BF16:
        return (b.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(rows, cols)
    return _BLOCK_DEQUANT[t](b.reshape(-1, info.type_size)).reshape(rows, cols)
