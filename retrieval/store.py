"""Host-side K/V stores for the offloaded tokens of one (layer, kv head), keyed by absolute position.

Contract of every :class:`KVStore`: ``append`` follows the same append-only rule as the key index
(positions strictly increasing across calls, gaps allowed); ``gather(positions)`` returns the keys
and values of exactly those positions, in the order asked, and raises :class:`InputError` for a
position never appended. ``TensorKVStore`` returns what was appended bit for bit;
``QuantizedKVStore`` returns KIVI-dequantised fp32 rows (the last, not yet full key group is kept in
full precision, as KIVI does).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from flashtier.errors import ConfigError, InputError
from flashtier.retrieval.buffer import GrowableRows
from flashtier.retrieval.quant import QuantAxis, QuantizedTensor, dequantize, quantize_keys, quantize_values


class KVStore(ABC):
    """Keys and values ``[D]`` per offloaded position."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._positions = GrowableRows((), torch.int64)  # [N] increasing

    def __len__(self) -> int:
        return len(self._positions)

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Store ``keys, values [n, D]`` at ``positions [n]`` (strictly increasing, after the last)."""
        positions = torch.as_tensor(positions, dtype=torch.int64).reshape(-1)
        n = positions.shape[0]
        if keys.shape != (n, self.dim) or values.shape != (n, self.dim):
            raise InputError(
                f"KV store: keys and values must be [{n}, {self.dim}] for {n} positions, "
                f"got {tuple(keys.shape)} and {tuple(values.shape)}"
            )
        if n == 0:
            return
        last = int(self._positions.view()[-1]) if len(self) else -1
        if int(positions[0]) <= last or (n > 1 and not bool((positions[1:] > positions[:-1]).all())):
            raise InputError(f"KV store: positions must be strictly increasing after {last}, got {positions[:4].tolist()}...")
        self._append(keys, values)
        self._positions.append(positions)

    def gather(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[n, D]`` of ``positions [n]``."""
        positions = torch.as_tensor(positions, dtype=torch.int64).reshape(-1)
        stored = self._positions.view()
        rows = torch.searchsorted(stored, positions).clamp_(max=max(len(self) - 1, 0))  # [n]
        if positions.numel() and (len(self) == 0 or not bool((stored[rows] == positions).all())):
            missing = positions[stored[rows] != positions] if len(self) else positions
            raise InputError(f"KV store: positions {missing[:8].tolist()} were never offloaded")
        return self._gather_rows(rows)

    @abstractmethod
    def _append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store validated rows (positions are appended after this returns)."""

    @abstractmethod
    def _gather_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[n, D]`` of storage ``rows [n]``."""

    @abstractmethod
    def nbytes(self) -> int:
        """Bytes held for keys and values (and their quantisation statistics)."""


class TensorKVStore(KVStore):
    """Keys and values kept as they came (dtype preserved)."""

    def __init__(self, dim: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(dim)
        self._keys = GrowableRows((dim,), dtype)  # [N, D]
        self._values = GrowableRows((dim,), dtype)  # [N, D]

    def _append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self._keys.append(keys)
        self._values.append(values)

    def _gather_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._keys.view()[rows], self._values.view()[rows]

    def nbytes(self) -> int:
        return self._keys.nbytes() + self._values.nbytes()


class QuantizedKVStore(KVStore):
    """KIVI store: keys per channel over groups of ``group_size`` tokens, values per token.

    Rows are quantised once ``group_size`` of them have arrived; until then they wait in a full
    precision residual (at most ``group_size - 1`` rows).
    """

    def __init__(self, dim: int, bits: int = 2, group_size: int = 32) -> None:
        super().__init__(dim)
        if dim % group_size:
            raise ConfigError(f"QuantizedKVStore: head dim {dim} must be a multiple of group_size {group_size}")
        probe = quantize_keys(torch.zeros(group_size, dim), bits, group_size)  # validates bits early
        self.bits, self.group_size = bits, group_size
        packed = probe.codes.shape[1]
        self._k_codes = GrowableRows((packed,), torch.uint8)  # [Nq, D*bits/8]
        self._v_codes = GrowableRows((packed,), torch.uint8)  # [Nq, D*bits/8]
        self._k_scale = GrowableRows((dim,), torch.float32)  # [Nq/g, D]
        self._k_min = GrowableRows((dim,), torch.float32)  # [Nq/g, D]
        self._v_scale = GrowableRows((dim // group_size,), torch.float32)  # [Nq, D/g]
        self._v_min = GrowableRows((dim // group_size,), torch.float32)  # [Nq, D/g]
        self._residual_k = GrowableRows((dim,), torch.float32)  # [r, D], r < group_size
        self._residual_v = GrowableRows((dim,), torch.float32)

    def _append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self._residual_k.append(keys)
        self._residual_v.append(values)
        full = len(self._residual_k) // self.group_size * self.group_size
        if full == 0:
            return
        rk, rv = self._residual_k.view(), self._residual_v.view()
        qk = quantize_keys(rk[:full], self.bits, self.group_size)  # groups never straddle: full % g == 0
        qv = quantize_values(rv[:full], self.bits, self.group_size)
        self._k_codes.append(qk.codes)
        self._k_scale.append(qk.scale)
        self._k_min.append(qk.minimum)
        self._v_codes.append(qv.codes)
        self._v_scale.append(qv.scale)
        self._v_min.append(qv.minimum)
        rest_k, rest_v = rk[full:].clone(), rv[full:].clone()
        self._residual_k = GrowableRows((self.dim,), torch.float32)
        self._residual_v = GrowableRows((self.dim,), torch.float32)
        self._residual_k.append(rest_k)
        self._residual_v.append(rest_v)

    def _quantised(self) -> tuple[QuantizedTensor, QuantizedTensor]:
        """Views of all full groups as one quantised key and one value tensor."""
        n = len(self._k_codes)
        qk = QuantizedTensor(self._k_codes.view(), self._k_scale.view(), self._k_min.view(), self.bits,
                             self.group_size, QuantAxis.PER_CHANNEL, (n, self.dim))
        qv = QuantizedTensor(self._v_codes.view(), self._v_scale.view(), self._v_min.view(), self.bits,
                             self.group_size, QuantAxis.PER_TOKEN, (n, self.dim))
        return qk, qv

    def _gather_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys = torch.empty((rows.shape[0], self.dim), dtype=torch.float32)  # [n, D]
        values = torch.empty_like(keys)
        n_quantised = len(self._k_codes)
        in_residual = rows >= n_quantised
        keys[in_residual] = self._residual_k.view()[rows[in_residual] - n_quantised]
        values[in_residual] = self._residual_v.view()[rows[in_residual] - n_quantised]
        qk, qv = self._quantised()
        keys[~in_residual] = dequantize(qk, rows[~in_residual])
        values[~in_residual] = dequantize(qv, rows[~in_residual])
        return keys, values

    def nbytes(self) -> int:
        parts = (self._k_codes, self._v_codes, self._k_scale, self._k_min, self._v_scale, self._v_min,
                 self._residual_k, self._residual_v)
        return sum(p.nbytes() for p in parts)
