"""Page descriptors: what the store knows about a page (where its bytes rest, how to view them).

The store does not know what a page means to the model; it knows a page's source byte range and
the dtype and shape its bytes are viewed as when acquired.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass

import torch

PageId = Hashable
"""Any hashable key the caller chooses, e.g. ``('layers.3.mlp.up_proj', 0)`` or an int."""


@dataclass(frozen=True, slots=True)
class PageSource:
    """Where a page rests in storage: ``length`` bytes of ``path`` from ``offset``."""

    path: str
    """File holding the bytes."""
    offset: int
    """Byte offset of the page in the file."""
    length: int
    """Number of bytes."""

    def __post_init__(self) -> None:
        if self.offset < 0 or self.length <= 0:
            raise ValueError(
                f"page source needs offset >= 0 and length > 0, got {self.offset}, {self.length} "
                f"for {self.path}"
            )


@dataclass(frozen=True, slots=True)
class PageDesc:
    """A page: its id, its source, and how its bytes are viewed (``dtype``, ``shape``).

    Invariant: ``prod(shape) * dtype.itemsize == source.length``. ``shape`` defaults to 1-D.
    """

    page_id: PageId
    """The key the caller uses in acquire/prefetch/release."""
    source: PageSource
    """Where the bytes rest."""
    dtype: torch.dtype = torch.uint8
    """Element type of the acquired view."""
    shape: tuple[int, ...] | None = None
    """Shape of the acquired view; None means ``(length // itemsize,)``."""

    def __post_init__(self) -> None:
        itemsize = self.dtype.itemsize
        if self.shape is None:
            if self.source.length % itemsize:
                raise ValueError(
                    f"page {self.page_id!r}: {self.source.length} bytes is not a whole number of "
                    f"{self.dtype} elements"
                )
            object.__setattr__(self, "shape", (self.source.length // itemsize,))
        elif math.prod(self.shape) * itemsize != self.source.length:
            raise ValueError(
                f"page {self.page_id!r}: shape {self.shape} of {self.dtype} is "
                f"{math.prod(self.shape) * itemsize} bytes, the source holds {self.source.length}"
            )

    @property
    def nbytes(self) -> int:
        """Size of the page's bytes."""
        return self.source.length
