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
