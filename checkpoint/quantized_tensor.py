"""The bytes of one weight in a ggml block format (GGUF Q8_0, Q4_K, ...), with its logical shape:
what a checkpoint reader returns for a quantized tensor, and what the runtime's kernels multiply
by (``runtime/quantized.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from flashtier.checkpoint.dequant import dequantize
from flashtier.checkpoint.ggml_types import GGMLType, type_info


@dataclass(frozen=True, slots=True)
class QuantizedTensor:
    """``data`` uint8 ``[rows, row_bytes]`` holding a ``shape = (rows, cols)`` weight in ``qtype``."""

    data: torch.Tensor
    qtype: GGMLType
    shape: tuple[int, int]

    array: "np.ndarray | None" = field(init=False, repr=False, compare=False, default=None)
    """``data`` as a numpy array for the native kernels (contiguous CPU data), else None."""

    def __post_init__(self) -> None:
        rows, cols = self.shape
        want = (rows, type_info(self.qtype).row_bytes(cols))
        if tuple(self.data.shape) != want or self.data.dtype != torch.uint8:
            raise ValueError(f"{self.qtype.name} weight {list(self.shape)} needs uint8 data {list(want)}, "
                             f"got {self.data.dtype} {list(self.data.shape)}")
        if self.data.device.type == "cpu" and self.data.is_contiguous() and not self.data.requires_grad:
            object.__setattr__(self, "array", self.data.numpy())

    @classmethod
    def from_bytes(cls, flat: torch.Tensor, qtype: GGMLType, shape: tuple[int, ...]) -> "QuantizedTensor":
        """Wrap ``flat`` uint8 bytes of a tensor of logical ``shape`` (2-D, or 1-D as one row)."""
        rows, cols = (shape[0], shape[1]) if len(shape) == 2 else (1, shape[-1])
        return cls(flat.view(torch.uint8).reshape(rows, -1), qtype, (rows, cols))

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    @property
    def device(self) -> torch.device:
        return self.data.device

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: slice | None = None) -> torch.Tensor:
        """The weight (or the rows ``rows``) as a dense ``[rows, cols]`` tensor of ``dtype``."""
        data = self.data if rows is None else self.data[rows]
        out = dequantize(int(self.qtype), data.contiguous(), data.shape[0], self.shape[1])
        return out if dtype == torch.float32 else out.to(dtype)

    def take_rows(self, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``index`` ``[T]`` dequantized to ``[T, cols]`` (embedding lookups)."""
        data = self.data.index_select(0, index.to(torch.long)).contiguous()
        return dequantize(int(self.qtype), data, data.shape[0], self.shape[1]).to(dtype)
