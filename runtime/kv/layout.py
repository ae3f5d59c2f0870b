"""The shape of one KV block, shared by the KV tiers (device window, host pool, storage spill).

A block holds ``block_size`` consecutive positions of one layer, keys and values of every kv head:
a tensor ``[2, H_kv, B, D]`` (index 0 = keys, 1 = values). Block ``b`` holds positions
``b * B .. b * B + B - 1``. Blocks are immutable once they left the device window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flashtier.errors import ConfigError

BlockKey = tuple[int, int]
"""``(layer, block)``."""


@dataclass(frozen=True, slots=True)
class KVBlockLayout:
    """Model-side shape of the KV blocks."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        if min(self.num_layers, self.num_kv_heads, self.head_dim) <= 0:
            raise ConfigError(f"KV layout needs positive layers, kv heads and head dim, got {self}")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"KV block_size must be a positive power of two, got {self.block_size}")

    @property
    def block_shape(self) -> tuple[int, int, int, int]:
        """``(2, H_kv, B, D)``."""
        return (2, self.num_kv_heads, self.block_size, self.head_dim)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block (keys and values of every kv head of one layer)."""
        return 2 * self.num_kv_heads * self.block_size * self.head_dim * self.dtype.itemsize

    @property
    def token_bytes(self) -> int:
        """KV bytes of one position over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype.itemsize
