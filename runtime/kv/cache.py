"""KV cache in fixed-size blocks with a block table (one sequence), and the KV cache protocol.

The forward hands each layer's new keys / values and queries to the cache's ``attend``: the cache
decides where KV lives and how attention is computed over it. :class:`BlockKVCache` keeps all KV
in memory and attends exactly; a tiered / retrieval cache implements the same protocol.

Blocks live in a :class:`KVBlockPool` shared by every cache of a model: per layer, keys and values
``[H_kv, N, B, D]``, with a reference count per block. A cache owns a block table (logical block
i -> physical block). Capacity is reserved up front for the tokens a request may produce (more
blocks from the pool; nothing is copied). A cache may *share* the full blocks of another cache's
prefix (a system prompt both start with): the blocks are referenced, not copied, and a write into
a block that another cache still references copies it first (copy on write). Every position is
read through the block table in the same order whatever the layout (the native one-row attention
follows the table; longer passes take a view of blocks in order or gather scattered ones, which
torch's attention turns into the same bits), so a sequence's results do not depend on where its
blocks sit or whom it shares them with.

With a budget the pool has a fixed number of blocks (the planner's KV share, in the store's
``kv.blocks`` arena): a reservation that does not fit raises :class:`KVBudgetFull` (the batch
waits for blocks to come back). Without one it grows by doubling. Blocks are the unit that later
tiers demote to host / storage and index for retrieval attention.
"""

from __future__ import annotations

import heapq
import itertools
import math
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from flashtier.errors import BudgetError, ConfigError
from flashtier.runtime import decode_ops

if TYPE_CHECKING:
    from flashtier.tiers.store import TieredStore

KV_BLOCKS_ARENA = "kv.blocks"
"""The store arena of the full-attention caches' block pools (working pages, accounted, bounded by
the planner's KV share per sequence rather than by the store)."""

_POOL_IDS = itertools.count()


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


class KVBlockPool:
    """The KV blocks of every full-attention cache of one model (module docstring). One thread
    uses it at a time (the model's lock)."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", store: "TieredStore | None" = None,
                 fixed_blocks: int | None = None) -> None:
        """``store``: keep the per-layer tensors as working pages of its ``kv.blocks`` arena (CPU).
        ``fixed_blocks``: exactly that many blocks, allocated now (a budget's share); None: grow."""
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.block_size, self.dtype, self.device = block_size, dtype, torch.device(device)
        self.block_bytes = 2 * num_layers * num_kv_heads * block_size * head_dim * dtype.itemsize
        """Bytes of one block: keys and values of every layer."""
        self.fixed = fixed_blocks is not None
        self._store = store if store is not None and self.device.type == "cpu" else None
        self._id = next(_POOL_IDS)
        self._gen = 0
        self._pages: list[tuple] = []
        self.k: list[torch.Tensor] = []  # per layer [H_kv, N, B, D]
        self.v: list[torch.Tensor] = []
        self.np_k: list[np.ndarray] = []  # per layer [H_kv, N, B, D] fp32 numpy views (native one-row paths)
        self.np_v: list[np.ndarray] = []
        self.flat_k: list[np.ndarray] = []
        self.flat_v: list[np.ndarray] = []
        self.refs = np.zeros(0, dtype=np.int64)  # [N] caches referencing each block
        self._free: list[int] = []  # a heap: the lowest free block first
        if self._store is not None:
            try:
                self._store.add_heap_arena(KV_BLOCKS_ARENA, zeroed=False)
            except ValueError:
                pass  # the weights made it (budgeted), or another pool of this model did
            weakref.finalize(self, _forget_pages, self._store, self._pages)
        if fixed_blocks:
            self._grow(fixed_blocks)

    @property
    def num_blocks(self) -> int:
        return self.refs.shape[0]

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int]:
        """``n`` fresh blocks (referenced once); all or none. KVBudgetFull when a fixed pool has
        fewer free."""
        if n > len(self._free):
            if self.fixed:
                raise KVBudgetFull(
                    f"the KV cache needs {n} more blocks of {self.block_size} positions ({n * self.block_bytes} "
                    f"bytes); the KV budget ({self.num_blocks} blocks: --kv-sequences contexts of --max-context "
                    f"positions) has {len(self._free)} free, the rest held by other sequences; wait for one to "
                    "finish, or raise --kv-sequences (and --dram-budget)")
            self._grow(max(2 * self.num_blocks, self.num_blocks + n - len(self._free), 4))
        ids = [heapq.heappop(self._free) for _ in range(n)]
        self.refs[ids] = 1
        return ids

    def incref(self, ids: list[int]) -> None:
        self.refs[ids] += 1

    def decref(self, ids: list[int]) -> None:
        """Drop one reference of each block; blocks no cache references go back to the pool."""
        for b in ids:
            self.refs[b] -= 1
            if self.refs[b] == 0:
                heapq.heappush(self._free, b)

    def copy_block(self, src: int, dst: int) -> None:
        """Every layer's keys and values of block ``src`` into block ``dst``."""
        for layer in range(self.num_layers):
            self.k[layer][:, dst] = self.k[layer][:, src]
            self.v[layer][:, dst] = self.v[layer][:, src]

    def _grow(self, blocks: int) -> None:
        old = self.num_blocks
        shape = (self.num_kv_heads, blocks, self.block_size, self.head_dim)
        old_pages = list(self._pages)
        self._pages.clear()
        self._gen += 1
        new_k = [self._tensor(shape, ("k", layer)) for layer in range(self.num_layers)]
        new_v = [self._tensor(shape, ("v", layer)) for layer in range(self.num_layers)]
        for layer in range(len(self.k)):
            new_k[layer][:, :old] = self.k[layer]
            new_v[layer][:, :old] = self.v[layer]
        self.k, self.v = new_k, new_v
        if old_pages:
            assert self._store is not None
            self._store.forget(old_pages)
        native = decode_ops.native_attend() and self.dtype == torch.float32 and self.device.type == "cpu"
        self.np_k = [t.numpy() for t in new_k] if native else []
        self.np_v = [t.numpy() for t in new_v] if native else []
        self.flat_k = [a.reshape(-1) for a in self.np_k]  # the same, flat (the attention kernel's view)
        self.flat_v = [a.reshape(-1) for a in self.np_v]
        self.refs = np.concatenate([self.refs, np.zeros(blocks - old, dtype=np.int64)])
        for b in range(old, blocks):
            heapq.heappush(self._free, b)

    def _tensor(self, shape: tuple[int, ...], what: tuple[str, int]) -> torch.Tensor:
        """A layer's ``[H_kv, N, B, D]`` keys or values: a working page of the store, or a tensor.
        Not zeroed: a position is read only once written."""
        if self._store is None:
            with torch.inference_mode(False):  # grown inside a forward, written outside (prompt cache loads)
                return torch.empty(shape, dtype=self.dtype, device=self.device)
        key = (KV_BLOCKS_ARENA, self._id, self._gen, *what)
        page = self._store.reserve(key, math.prod(shape) * self.dtype.itemsize, KV_BLOCKS_ARENA)
        self._pages.append(key)
        return page.view(self.dtype).view(shape)


class BlockKVCache:
    """Keys and values of one sequence, in blocks of ``block_size`` tokens of a :class:`KVBlockPool`."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        config: KVCacheConfig = KVCacheConfig(),
        device: torch.device | str = "cpu",
        store: "TieredStore | None" = None,
        pool: KVBlockPool | None = None,
        threads: int | None = None,
    ) -> None:
        """``device``: where the blocks live (the device the model computes on). ``pool``: the
        model's shared block pool; None = a pool of this cache's own (its tensors pages of
        ``store``'s ``kv.blocks`` arena when given). ``threads``: of the native one-row attention
        (each head on one thread: the same results with any count; the model's kernel threads,
        since decode steps set torch to one thread; None = torch's count at each call)."""
        self.threads = threads
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        self.block_size = config.block_size
        self.sliding_window = config.sliding_window
        if pool is None:
            pool = KVBlockPool(num_layers, num_kv_heads, head_dim, config.block_size, dtype, device, store)
        elif (pool.num_layers, pool.num_kv_heads, pool.head_dim, pool.block_size, pool.dtype) != \
                (num_layers, num_kv_heads, head_dim, config.block_size, dtype):
            raise ConfigError("a KV cache must have its pool's shape (layers, kv heads, head dim, block size, dtype)")
        self.pool = pool
        self.length = 0  # tokens written (all layers agree after a full forward)
        self.block_table: list[int] = []  # logical block -> physical block of the pool (one reference each)
        self._table_np: np.ndarray | None = None  # block_table as int64, rebuilt after it changes
        weakref.finalize(self, pool.decref, self.block_table)  # a dropped cache gives its blocks back

    @property
    def capacity(self) -> int:
        return len(self.block_table) * self.block_size

    @property
    def _k(self) -> list[torch.Tensor]:
        """The pool's per-layer keys (for tests)."""
        return self.pool.k

    def reserve(self, num_tokens: int) -> None:
        """Make room for ``num_tokens`` tokens in total (keeps what is cached): more blocks from the
        pool (KVBudgetFull from a fixed pool without them; nothing is taken then)."""
        need = -(-num_tokens // self.block_size) - len(self.block_table)
        if need > 0:
            self.block_table.extend(self.pool.alloc(need))
            self._table_np = None

    def share(self, donor: BlockKVCache, num_tokens: int) -> int:
        """Reference (not copy) ``donor``'s blocks holding positions ``0 .. num_tokens-1`` that are
        full, into this empty cache; returns the positions shared (whole blocks)."""
        if self.block_table or self.length:
            raise ConfigError("only an empty KV cache can share another's prefix")
        if donor.pool is not self.pool:
            raise ConfigError("KV caches share blocks only within one pool")
        n = min(num_tokens, donor.length) // self.block_size
        blocks = donor.block_table[:n]
        self.pool.incref(blocks)
        self.block_table.extend(blocks)
        self._table_np = None
        self.length = n * self.block_size
        return self.length

    def _writable(self, blk: int) -> int:
        """The physical block of logical block ``blk``, made this cache's own first if another
        cache references it too (copy on write)."""
        phys = self.block_table[blk]
        if self.pool.refs[phys] > 1:
            (fresh,) = self.pool.alloc(1)
            self.pool.copy_block(phys, fresh)
            self.pool.decref([phys])
            self.block_table[blk] = phys = fresh
            self._table_np = None
        return phys

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        """Store ``k``/``v`` ``[H_kv, T, D]`` for positions ``start .. start+T-1`` of ``layer``."""
        t = k.shape[1]
        end = start + t
        pool = self.pool
        if t == 1 and end <= self.capacity and pool.np_k and k.dtype == torch.float32 and not k.requires_grad:
            blk, off = divmod(start, self.block_size)
            phys = self._writable(blk)
            pool.np_k[layer][:, phys, off] = k.numpy()[:, 0]  # [H_kv, D]
            pool.np_v[layer][:, phys, off] = v.numpy()[:, 0]
            self.wrote(layer, end)
            return
        if end > self.capacity:
            self.reserve(max(end, 2 * self.capacity))
        pos = start
        while pos < end:
            blk, off = divmod(pos, self.block_size)
            n = min(self.block_size - off, end - pos)
            phys = self._writable(blk)
            pool.k[layer][:, phys, off : off + n] = k[:, pos - start : pos - start + n]
            pool.v[layer][:, phys, off : off + n] = v[:, pos - start : pos - start + n]
            pos += n
        self.wrote(layer, end)

    def decode_slot(self, layer: int, start: int) -> tuple | None:
        """Room for one fp32 token at position ``start`` of ``layer``, for a native step that writes
        its key and value and attends (:func:`~flashtier.runtime.decode_ops.attn_step`): (keys,
        values, head stride, block table, block size, lo, end) with the position's block made
        this cache's own (copy on write) and the block table current; None where the native
        one-row path does not apply (a pool that is not fp32 numpy). Call :meth:`wrote` after
        the step."""
        pool = self.pool
        if not pool.np_k:
            return None
        end = start + 1
        if end > self.capacity:
            self.reserve(max(end, 2 * self.capacity))
        self._writable(start // self.block_size)
        return (pool.flat_k[layer], pool.flat_v[layer], pool.num_blocks * self.block_size * self.head_dim,
                self._table(), self.block_size, self._window_start(end), end)

    def wrote(self, layer: int, end: int) -> None:
        """``layer``'s keys and values are written up to position ``end - 1`` (by :meth:`write`,
        or by a native step after :meth:`decode_slot`): the last layer's write sets the length."""
        if layer == self.num_layers - 1:
            self.length = max(self.length, end)

    def _table(self) -> np.ndarray:
        """The block table as int64 (the native attention's form), rebuilt after it changed."""
        if self._table_np is None:
            self._table_np = np.asarray(self.block_table, dtype=np.int64)
        return self._table_np

    def _window_start(self, end: int) -> int:
        """The first position a query at ``end - 1`` attends to (its sliding window, if any)."""
        return 0 if self.sliding_window is None else max(0, end - self.sliding_window)

    def read(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[H_kv, end, D]`` of positions ``0 .. end-1``: a view when the blocks
        sit in order in the pool, else gathered through the block table. Attention over either
        gives the same bits (``test_attention_over_a_view_or_a_gather_is_the_same``), so a
        sequence's results do not depend on where its blocks sit."""
        nblk = -(-end // self.block_size)
        table = self.block_table[:nblk]
        first = table[0] if table else 0
        if table == list(range(first, first + nblk)):
            kb = self.pool.k[layer][:, first:first + nblk]  # [H_kv, nblk, B, D]
            vb = self.pool.v[layer][:, first:first + nblk]
        else:
            idx = torch.tensor(table, device=self.device)
            kb = self.pool.k[layer].index_select(1, idx)  # [H_kv, nblk, B, D]
            vb = self.pool.v[layer].index_select(1, idx)
        shape = (self.num_kv_heads, nblk * self.block_size, self.head_dim)
        return kb.reshape(shape)[:, :end], vb.reshape(shape)[:, :end]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        """Exact attention over all cached positions (see :class:`KVCache`)."""
        t = q.shape[1]
        self.write(layer, k, v, start)
        end = start + t
        pool = self.pool
        if t == 1 and pool.np_k and q.dtype == torch.float32 and q.is_contiguous() and not q.requires_grad:
            return decode_ops.attend_row(q, pool.flat_k[layer], pool.flat_v[layer], self.num_kv_heads,
                                         pool.num_blocks * self.block_size * self.head_dim, self._window_start(end),
                                         end, self.threads or torch.get_num_threads(), self._table(), self.block_size)
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
        """Forget positions ``length ..`` (e.g. to reuse a shared chat prefix); blocks no longer
        needed go back to the pool."""
        self.length = min(self.length, length)
        keep = -(-self.length // self.block_size)
        self.pool.decref(self.block_table[keep:])
        del self.block_table[keep:]
        self._table_np = None

    def nbytes(self) -> int:
        """Bytes of the blocks this cache references (blocks shared with others counted here too)."""
        return len(self.block_table) * self.pool.block_bytes


def _forget_pages(store: "TieredStore", pages: list[tuple]) -> None:
    """A dropped pool's tensors leave the store (its finalizer)."""
    try:
        store.forget(list(pages))
    except (KeyError, ValueError):
        pass  # already gone (the store was torn down first)
