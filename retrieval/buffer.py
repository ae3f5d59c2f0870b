"""Append-only row buffers that grow by doubling, so incremental adds cost amortised O(rows).

A :class:`GrowableRows` holds ``rows`` rows of a fixed trailing shape; :meth:`view` returns the
filled part without copying; :meth:`truncate` drops trailing rows. Views taken before an append may point at a stale buffer after it:
take a fresh view after every append.
"""

from __future__ import annotations

import torch

from flashtier.tiers import hugepages


def _state_tensor(shape: tuple[int, ...], dtype: torch.dtype, huge_pages: bool) -> torch.Tensor:
    """An uninitialised tensor that is never an inference tensor: a buffer grown during a pass run
    under ``torch.inference_mode`` stays writable outside it (a cache closed or truncated between
    passes updates its tables). Large ones on transparent huge pages when ``huge_pages``."""
    with torch.inference_mode(False):
        return hugepages.empty(shape, dtype, huge=huge_pages, min_bytes=hugepages.GROWABLE_MIN_BYTES)


class GrowableRows:
    """Rows of shape ``row_shape`` and dtype ``dtype``, appended in chunks."""

    def __init__(self, row_shape: tuple[int, ...], dtype: torch.dtype, initial_capacity: int = 256,
                 huge_pages: bool = True) -> None:
        """``huge_pages``: buffers of at least :data:`~flashtier.tiers.hugepages.GROWABLE_MIN_BYTES` on
        transparent huge pages (an index's key and centroid tables, read at scattered rows)."""
        self.row_shape = tuple(row_shape)
        self.dtype = dtype
        self.huge_pages = huge_pages
        self._data = _state_tensor((max(1, initial_capacity), *self.row_shape), dtype, huge_pages)
        self._rows = 0

    def __len__(self) -> int:
        return self._rows

    def append(self, rows: torch.Tensor) -> None:
        """Append ``rows`` ``[n, *row_shape]`` (cast to the buffer's dtype)."""
        n = rows.shape[0]
        need = self._rows + n
        if need > self._data.shape[0]:
            capacity = max(need, 2 * self._data.shape[0])
            grown = _state_tensor((capacity, *self.row_shape), self.dtype, self.huge_pages)
            with torch.inference_mode(False):
                grown[: self._rows] = self._data[: self._rows]
            self._data = grown
        self._data[self._rows : need] = rows
        self._rows = need

    def truncate(self, rows: int) -> None:
        """Keep only the first ``rows`` rows (capacity is kept)."""
        self._rows = max(0, min(rows, self._rows))

    def view(self) -> torch.Tensor:
        """The filled rows ``[rows, *row_shape]`` (a view: valid until the next append)."""
        return self._data[: self._rows]

    def address(self) -> int:
        """Address of the first row (valid until the next append that grows the buffer)."""
        return self._data.data_ptr()

    def nbytes(self) -> int:
        """Bytes held by the filled rows (capacity slack not counted)."""
        return self._rows * self._data[0].numel() * self._data.element_size()


class Int8Rows:
    """Rows ``[n, D]`` kept as int8 codes with one fp32 scale per row: ``row ~ codes * scale``.

    Symmetric per row: ``scale = max|row| / 127`` and ``codes = rint(row / scale)`` (0 for a zero
    row), so each value is off by at most ``scale / 2``. :meth:`view` returns the dequantized rows
    ``codes.float() * scale`` in fp32 -- the values the native search works with (it scales each
    row's dot product, or each weight, instead of each value, which differs by fp32 rounding only).
    The same append / truncate / view interface as :class:`GrowableRows`; the native search reads
    :meth:`address` (the packed codes) and :meth:`scale_address` (scales ``[n]`` fp32).

    Packed layout (``native/cluster_search.c``: ``load16``): a row is padded with zero codes to a
    multiple of 64 values; each chunk of 64 is 16 little-endian int32 lanes, lane ``i`` holding values
    ``i``, ``16 + i``, ``32 + i``, ``48 + i`` of the chunk from its highest byte down, so 16
    consecutive values widen with two shifts of one 64-byte load in any vector ISA."""

    dtype = torch.float32

    def __init__(self, dim: int, huge_pages: bool = True) -> None:
        self.row_shape = (dim,)
        self._padded = self.padded(dim)
        self._codes = GrowableRows((self._padded,), torch.int8, huge_pages=huge_pages)  # packed
        self._scale = GrowableRows((), torch.float32, huge_pages=huge_pages)

    def __len__(self) -> int:
        return len(self._scale)

    @staticmethod
    def padded(dim: int) -> int:
        """Codes stored per row: ``dim`` rounded up to a multiple of 64."""
        return -(-dim // 64) * 64

    @staticmethod
    def row_bytes(dim: int) -> int:
        """Bytes per row: the padded codes and the fp32 scale."""
        return Int8Rows.padded(dim) + 4

    @staticmethod
    def quantize(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``rows [n, D]`` -> (codes ``[n, D]`` int8, scales ``[n]`` fp32); non-finite rows are an error."""
        rows = rows.detach().float()
        if not bool(torch.isfinite(rows).all()):
            raise ValueError("Int8Rows: rows must be finite to be quantized")
        scale = rows.abs().amax(dim=1) / 127 if rows.shape[0] else rows.new_zeros(0)  # [n]
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = torch.round(rows / safe.unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
        return codes, scale

    def append(self, rows: torch.Tensor) -> None:
        """Quantize ``rows [n, D]`` (any float dtype) and append them."""
        codes, scale = self.quantize(rows)
        self._codes.append(self.pack(codes, self._padded))
        self._scale.append(scale)

    def truncate(self, rows: int) -> None:
        self._codes.truncate(rows)
        self._scale.truncate(rows)

    @staticmethod
    def pack(codes: torch.Tensor, padded: int) -> torch.Tensor:
        """``codes [n, D]`` int8 -> ``[n, padded]`` in the packed layout (see the class docstring)."""
        n, d = codes.shape
        full = torch.zeros((n, padded), dtype=torch.int8)
        full[:, :d] = codes
        # [n, chunk, group, lane] -> [n, chunk, lane, byte]: byte 3 - g of lane i = value 16 g + i
        return full.view(n, padded // 64, 4, 16).transpose(2, 3).flip(3).reshape(n, padded)

    def codes(self) -> torch.Tensor:
        """``[n, D]`` int8 codes in row order (unpacked: a fresh tensor)."""
        packed = self._codes.view()
        n = packed.shape[0]
        return packed.view(n, self._padded // 64, 16, 4).flip(3).transpose(2, 3).reshape(n, self._padded)[:, : self.row_shape[0]]

    def view(self) -> torch.Tensor:
        """The dequantized rows ``[n, D]`` fp32 (a fresh tensor: ``codes * scale``)."""
        return self.codes().float() * self._scale.view().unsqueeze(1)

    def scales(self) -> torch.Tensor:
        """``[n]`` fp32 (a view)."""
        return self._scale.view()

    def address(self) -> int:
        return self._codes.address()

    def scale_address(self) -> int:
        return self._scale.address()

    def nbytes(self) -> int:
        return self._codes.nbytes() + self._scale.nbytes()
