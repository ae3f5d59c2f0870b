"""KV cache in fixed-size blocks with a block table (one sequence), and the KV cache protocol.

The forward hands each layer's new keys / values and queries to the cache's ``attend``: the cache
decides where KV lives and how attention is computed over it. :class:`BlockKVCache` keeps all KV
in memory and attends exactly; a tiered / retrieval cache implements the same protocol.

Per layer, keys and values live in block pools ``[H_kv, num_blocks, B, D]``; the sequence owns a
block table (logical block i -> physical block). Capacity is reserved up front for the tokens a
request may produce, so the pools never reallocate during a request. Blocks are the unit that later
tiers demote to host / storage and index for retrieval attention.
"""

from __future__ import annotations

import itertools
import math
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F

from flashtier.errors import BudgetError, ConfigError
from flashtier.runtime import decode_ops

if TYPE_CHECKING:
    from flashtier.tiers.store import TieredStore

KV_BLOCKS_ARENA = "kv.blocks"
"""The store arena of the full-attention caches' block pools (working pages, accounted, bounded by
the planner's KV share per sequence rather than by the store)."""

_CACHE_IDS = itertools.count()


class KVBudgetFull(BudgetError):
    """The KV blocks arena has no room for a cache now (other sequences hold it)."""


class KVCache(Protocol):
    """What the forward needs from a KV cache (one sequence)."""

    length: int
    """Positions cached (all layers)."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        """Store ``k``/``v`` ``[Hkv, T, D]`` at positions ``start..start+T-1`` of ``layer`` and
        return causal attention of ``q`` ``[Hq, T, D]`` over positions ``0..start+T-1``: ``[Hq, T, D]``."""
        ...

    def reserve(self, num_tokens: int) -> None:
        """Make room for ``num_tokens`` positions in total."""
        ...

    def truncate(self, length: int) -> None:
        """Forget positions ``length..``."""
        ...

    def nbytes(self) -> int:
        """Bytes of KV held in memory."""
        ...


@dataclass(frozen=True, slots=True)
class KVCacheConfig:
    """Shape of the block KV cache."""

    block_size: int = 64
    """Tokens per block."""
    sliding_window: int | None = None
    """Attend only to the last ``sliding_window`` positions (Mistral); None = all."""

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"KV block_size must be a positive power of two, got {self.block_size}")


class BlockKVCache:
    """Keys and values of one sequence, stored in blocks of ``block_size`` tokens."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        config: KVCacheConfig = KVCacheConfig(),
        device: torch.device | str = "cpu",
        store: "TieredStore | None" = None,
    ) -> None:
        """``device``: where the blocks live (the device the model computes on). ``store``: keep
        the block pools as working pages of that store's ``kv.blocks`` arena (so its memory report
        and page table cover them; CPU only), else plain tensors."""
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        self.block_size = config.block_size
        self.sliding_window = config.sliding_window
        self.length = 0  # tokens written (all layers agree after a full forward)
        self.block_table: list[int] = []  # logical block -> physical block in the pools
        self._k: list[torch.Tensor] = []  # per layer [H_kv, N, B, D]
        self._v: list[torch.Tensor] = []
        self._np_k: list = []  # numpy views of _k / _v for the native one-row write and attention (see reserve)
        self._np_v: list = []
        self._capacity_blocks = 0
        self._store = store if store is not None and self.device.type == "cpu" else None
        self._pages: list[tuple] = []  # page ids of the current pools in the store
        self._id = next(_CACHE_IDS)
        self._gen = 0
        if self._store is not None:
            try:
                self._store.add_heap_arena(KV_BLOCKS_ARENA)
            except ValueError:
                pass  # another cache of this model added it
            weakref.finalize(self, _forget_pages, self._store, self._pages)

    @property
    def capacity(self) -> int:
        return self._capacity_blocks * self.block_size

    def reserve(self, num_tokens: int) -> None:
        """Make room for ``num_tokens`` tokens in total (keeps what is cached)."""
        need = -(-num_tokens // self.block_size)
        if need <= self._capacity_blocks:
            return
        shape = (self.num_kv_heads, need, self.block_size, self.head_dim)
        used = len(self.block_table)
        old_k = [k[:, self.block_table] for k in self._k]  # [H_kv, used, B, D] copies of what is cached
        old_v = [v[:, self.block_table] for v in self._v]
        if self._pages:  # the old pools leave the KV arena before the new ones are taken from it
            assert self._store is not None
            self._store.forget(list(self._pages))
            self._pages.clear()
        self._k, self._v, self._np_k, self._np_v = [], [], [], []
        self._capacity_blocks, self.block_table = 0, []
        self._gen += 1
        try:
            new_k = [self._pool(shape, ("k", layer)) for layer in range(self.num_layers)]
            new_v = [self._pool(shape, ("v", layer)) for layer in range(self.num_layers)]
        except BaseException:  # no room in the KV arena: the cache is left empty
            if self._pages:
                assert self._store is not None
                self._store.forget(list(self._pages))
                self._pages.clear()
            self.length = 0
            raise
        for layer in range(len(old_k)):
            new_k[layer][:, :used] = old_k[layer]
            new_v[layer][:, :used] = old_v[layer]
        self._k, self._v = new_k, new_v
        # flat numpy views of each layer's blocks for the native one-row attention (fp32 CPU only)
        native = decode_ops.native_attend() and self.dtype == torch.float32 and self.device.type == "cpu"
        self._np_k = [t.numpy() for t in new_k] if native else []  # [H_kv, N, B, D] each
        self._np_v = [t.numpy() for t in new_v] if native else []
        self.block_table = list(range(used))
        self._capacity_blocks = need

    def _pool(self, shape: tuple[int, ...], what: tuple[str, int]) -> torch.Tensor:
        """A zeroed block pool ``[H_kv, N, B, D]``: a working page of the store, or a tensor."""
        if self._store is None:
            return torch.zeros(shape, dtype=self.dtype, device=self.device)
        key = (KV_BLOCKS_ARENA, self._id, self._gen, *what)
        nbytes = math.prod(shape) * self.dtype.itemsize
        try:
            page = self._store.reserve(key, nbytes, KV_BLOCKS_ARENA)
        except BudgetError as e:
            held = self._store.stats([KV_BLOCKS_ARENA]).tiers["host"]
            raise KVBudgetFull(
                f"the KV cache needs {2 * self.num_layers * nbytes} bytes for {shape[1] * self.block_size} positions; "
                f"the KV budget ({held.capacity_bytes} bytes: --kv-sequences contexts of --max-context positions) "
                f"has {held.capacity_bytes - held.used_bytes} free, the rest held by other sequences; wait for one "
                "to finish, or raise --kv-sequences (and --dram-budget)") from e
        self._pages.append(key)
        return page.view(self.dtype).view(shape)  # the heap arena's pages start zeroed

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        """Store ``k``/``v`` ``[H_kv, T, D]`` for positions ``start .. start+T-1`` of ``layer``."""
        t = k.shape[1]
        end = start + t
        if t == 1 and end <= self.capacity and self._np_k and k.dtype == torch.float32 and not k.requires_grad:
            blk, off = divmod(start, self.block_size)
            if blk < len(self.block_table):
                phys = self.block_table[blk]
                self._np_k[layer][:, phys, off] = k.numpy()[:, 0]  # [H_kv, D]
                self._np_v[layer][:, phys, off] = v.numpy()[:, 0]
                if layer == self.num_layers - 1:
                    self.length = max(self.length, end)
                return
        if end > self.capacity:
            self.reserve(max(end, 2 * self.capacity))
        while len(self.block_table) * self.block_size < end:
            self.block_table.append(len(self.block_table))
        pos = start
        while pos < end:
            blk, off = divmod(pos, self.block_size)
            n = min(self.block_size - off, end - pos)
            phys = self.block_table[blk]
            self._k[layer][:, phys, off : off + n] = k[:, pos - start : pos - start + n]
            self._v[layer][:, phys, off : off + n] = v[:, pos - start : pos - start + n]
            pos += n
        if layer == self.num_layers - 1:
            self.length = max(self.length, end)

    def read(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[H_kv, end, D]`` of positions ``0 .. end-1`` (a view when the blocks
        are physically in order, which is the case for a single sequence)."""
        nblk = -(-end // self.block_size)
        table = self.block_table[:nblk]
        k, v = self._k[layer], self._v[layer]
        if table == list(range(nblk)):
            kb, vb = k[:, :nblk], v[:, :nblk]
        else:
            idx = torch.tensor(table, device=self.device)
            kb, vb = k.index_select(1, idx), v.index_select(1, idx)
        shape = (self.num_kv_heads, nblk * self.block_size, self.head_dim)
        return kb.reshape(shape)[:, :end], vb.reshape(shape)[:, :end]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        """Exact attention over all cached positions (see :class:`KVCache`)."""
        t = q.shape[1]
        self.write(layer, k, v, start)
        end = start + t
        if t == 1 and self._np_k and q.dtype == torch.float32 and q.is_contiguous() and not q.requires_grad:
            nblk = -(-end // self.block_size)
            if self.block_table[:nblk] == list(range(nblk)):  # one row over blocks in physical order
                lo = 0 if self.sliding_window is None else max(0, end - self.sliding_window)
                return decode_ops.attend_row(q, self._np_k[layer].reshape(-1), self._np_v[layer].reshape(-1),
                                             self.num_kv_heads, self._k[layer].stride(0), lo, end,
                                             torch.get_num_threads())
        keys, values = self.read(layer, end)  # [Hkv, S, D], S = start + T
        gqa = q.shape[0] != keys.shape[0]
        return F.scaled_dot_product_attention(
            q.unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0), attn_mask=self._mask(t, start),
            scale=q.shape[-1] ** -0.5, enable_gqa=gqa,
        )[0]

    def _mask(self, t: int, start: int) -> torch.Tensor | None:
        """Boolean mask ``[T, S]`` (True = attend): causal, plus the sliding window if any."""
        window = self.sliding_window
        s = start + t
        if t == 1 and (window is None or s <= window):
            return None
        qpos = torch.arange(start, s, device=self.device)[:, None]
        kpos = torch.arange(s, device=self.device)[None, :]
        mask = kpos <= qpos
        if window is not None:
            mask &= kpos > qpos - window
        return mask

    def truncate(self, length: int) -> None:
        """Forget positions ``length ..`` (e.g. to reuse a shared chat prefix)."""
        self.length = min(self.length, length)
        self.block_table = self.block_table[: -(-self.length // self.block_size)]

    def nbytes(self) -> int:
        return 2 * sum(t.numel() * t.element_size() for t in self._k)


def _forget_pages(store: "TieredStore", pages: list[tuple]) -> None:
    """A dropped cache's pools leave the store (its finalizer)."""
    try:
        store.forget(list(pages))
    except (KeyError, ValueError):
        pass  # already gone (the store was torn down first)
