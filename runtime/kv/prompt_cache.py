"""A prompt cache on storage: the KV blocks of a prompt prefix, written once, loaded instead of
prefilled by a later request or a later process with the same prefix.

Each full KV block of a prompt (``block_size`` tokens, every layer's keys and values) is one file
named by a chained hash: ``h_i = sha256(h_{i-1}, tokens of block i)`` with ``h_{-1}`` the hash of
the model (config, tensor shapes and types, and a probe of every tensor's leading bytes) and the
KV format (dtype, block size, shapes, the compute settings that change the numbers). A prefix is
found by walking its blocks until one is missing, so a request that shares only part of a cached
prompt (the same system prompt, another question) loads the shared blocks.

Loads stop at a multiple of the prefill chunk: the tokens left are then prefilled in the very
chunks a full prefill would use, so the logits are identical to prefilling the whole prompt (a
chunk computed over other rows could round differently). Only prompts prefilled from position 0
(or from this cache) are stored: KV written by one-token decode steps may round differently.

Files: ``magic | u32 header length | header JSON | payload | u32 crc32 of all before``, written to
a temporary sibling and renamed (``write_atomic``). Every read checks the crc32, the header's model
and format keys and the block's own hash: a corrupt or foreign file is deleted and its block
recomputed, never used. A byte budget bounds the folder: after each store the least recently used
files (modification time, refreshed on every hit; within a prefix its first block is the most
recent) are deleted until it fits, so eviction shortens cached prefixes from their end. Concurrent writers of
one block write the same bytes; the rename makes either complete file win.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from flashtier.errors import ConfigError, StorageError
from flashtier.runtime.kv.cache import BlockKVCache
from flashtier.storage_backends.atomic import write_atomic

MAGIC = b"FTPCACHE"
VERSION = 1
SUFFIX = ".kvb"
PROBE_BYTES = 4096


def model_key(checkpoint: Any, settings: dict[str, Any]) -> str:
    """Hash of what makes KV numbers: the model's config, every tensor's name, shape, type and
    leading bytes, and the compute ``settings`` (dtype, kernel, activations, KV format)."""
    h = hashlib.sha256()
    config = checkpoint.config
    h.update(json.dumps(asdict(config) if hasattr(config, "__dataclass_fields__") else repr(config),
                        sort_keys=True, default=str).encode())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for name in sorted(checkpoint.tensors):
        info = checkpoint.tensors[name]
        h.update(f"{name}:{tuple(info.shape)}:{getattr(info, 'dtype', '')}:{info.nbytes}".encode())
        try:
            with open(info.path, "rb", buffering=0) as f:
                h.update(os.pread(f.fileno(), min(PROBE_BYTES, info.nbytes), info.offset))
        except OSError as e:
            raise StorageError(f"prompt cache: cannot read {info.path} to identify the model: {e.strerror or e}") from e
    return h.hexdigest()


@dataclass
class PromptCacheStats:
    """Counters since the cache was opened."""

    hits: int = 0
    """Requests that loaded at least one block."""
    blocks_loaded: int = 0
    blocks_written: int = 0
    dropped_corrupt: int = 0
    """Files deleted because their crc32, header or hash did not match."""
    evicted: int = 0
    """Files deleted to keep the folder within its budget."""
    load_s: float = 0.0


class PromptCache:
    """The cache folder of one model and KV format (see module docstring)."""

    def __init__(self, directory: str | os.PathLike[str], budget_bytes: int | None, key: str, block_size: int,
                 align_tokens: int) -> None:
        """``align_tokens``: loads stop at a multiple of it (the prefill chunk; a multiple of the
        block size is taken)."""
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"--prompt-cache {directory}: cannot create the folder: {e.strerror or e}") from e
        if not self.directory.is_dir():
            raise ConfigError(f"--prompt-cache {directory} is not a folder")
        if budget_bytes is not None and budget_bytes <= 0:
            raise ConfigError(f"--prompt-cache-budget must be positive, got {budget_bytes}")
        self.budget, self.key, self.block_size = budget_bytes, key, block_size
        self.align = max(block_size, align_tokens // block_size * block_size)
        self.stats = PromptCacheStats()

    # ------------------------------------------------------------------ names
    def block_hashes(self, ids: Sequence[int], n_blocks: int) -> list[str]:
        """Chained hashes of the first ``n_blocks`` full blocks of ``ids``."""
        out, prev = [], self.key
        b = self.block_size
        for i in range(n_blocks):
            h = hashlib.sha256(prev.encode())
            h.update(struct.pack(f"<{b}q", *ids[i * b:(i + 1) * b]))
            prev = h.hexdigest()
            out.append(prev)
        return out

    def _path(self, block_hash: str) -> Path:
        return self.directory / f"{block_hash}{SUFFIX}"

    # ------------------------------------------------------------------ load
    def load(self, cache: BlockKVCache, ids: Sequence[int], at_least: int = 0) -> int:
        """Load the longest cached prefix of ``ids`` (a multiple of the alignment, leaving at least
        one token to prefill) into ``cache`` from position 0 when it is longer than ``at_least``
        tokens (what the cache already holds); returns the tokens loaded (0: none, the cache
        untouched)."""
        t0 = time.perf_counter()
        limit = (len(ids) - 1) // self.align * self.align
        if limit <= at_least:
            return 0
        hashes = self.block_hashes(ids, limit // self.block_size)
        blocks: list[torch.Tensor] = []
        for h in hashes:
            block = self._read(h, cache)
            if block is None:
                break
            blocks.append(block)
        n = len(blocks) * self.block_size // self.align * self.align
        if n <= at_least:
            return 0
        cache.truncate(0)
        cache.reserve(n)
        for i, block in enumerate(blocks[: n // self.block_size]):  # block [L, 2, H, B, D]
            for layer in range(cache.num_layers):
                cache.write(layer, block[layer, 0], block[layer, 1], i * self.block_size)
        self._touch(hashes[: n // self.block_size])
        self.stats.hits += 1
        self.stats.blocks_loaded += n // self.block_size
        self.stats.load_s += time.perf_counter() - t0
        return n

    def _read(self, block_hash: str, cache: BlockKVCache) -> torch.Tensor | None:
        path = self._path(block_hash)
        try:
            with open(path, "rb", buffering=0) as f:
                raw = f.read()
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # no hidden page-cache tier
        except OSError:
            return None  # missing or unreadable: recompute
        shape = (cache.num_layers, 2, cache.num_kv_heads, self.block_size, cache.head_dim)
        try:
            if raw[:8] != MAGIC or len(raw) < 16:
                raise ValueError("not a prompt-cache block")
            (crc,) = struct.unpack_from("<I", raw, len(raw) - 4)
            if zlib.crc32(memoryview(raw)[:-4]) != crc:
                raise ValueError("crc32 mismatch")
            (hlen,) = struct.unpack_from("<I", raw, 8)
            header = json.loads(raw[12:12 + hlen])
            if (header.get("version"), header.get("key"), header.get("hash"), header.get("shape"),
                    header.get("dtype")) != (VERSION, self.key, block_hash, list(shape), str(cache.dtype)):
                raise ValueError("another model, format or block")
            payload = memoryview(raw)[12 + hlen:-4]
            block = torch.frombuffer(bytearray(payload), dtype=cache.dtype).reshape(shape)
        except (ValueError, KeyError, TypeError, RuntimeError, struct.error):
            self.stats.dropped_corrupt += 1
            path.unlink(missing_ok=True)  # never used: the block is recomputed and stored again
            return None
        return block

    # ------------------------------------------------------------------ store
    def store(self, cache: BlockKVCache, ids: Sequence[int], computed: int) -> int:
        """Write the full blocks of ``ids[:computed]`` (prefilled KV in ``cache``) that are not
        stored yet; then evict down to the budget. Returns the blocks written."""
        n_blocks = min(computed, cache.length) // self.block_size
        written = 0
        if n_blocks == 0:
            return 0
        hashes = self.block_hashes(ids, n_blocks)
        missing = [i for i, h in enumerate(hashes) if not self._path(h).exists()]
        kv = ([cache.read(layer, n_blocks * self.block_size) for layer in range(cache.num_layers)]  # [H, S, D] x2
              if missing else [])
        for i in missing:
            h, path = hashes[i], self._path(hashes[i])
            lo, hi = i * self.block_size, (i + 1) * self.block_size
            block = torch.stack([torch.stack([k[:, lo:hi], v[:, lo:hi]]) for k, v in kv]).contiguous()  # [L, 2, H, B, D]
            header = json.dumps({"version": VERSION, "key": self.key, "hash": h, "shape": list(block.shape),
                                 "dtype": str(block.dtype)}).encode()
            head = MAGIC + struct.pack("<I", len(header)) + header
            payload = block.view(torch.uint8).reshape(-1).numpy().tobytes()
            crc = zlib.crc32(payload, zlib.crc32(head))
            try:
                write_atomic(str(path), [head, payload, struct.pack("<I", crc)])
            except StorageError:
                break  # a full disk: the cache is an optimisation, the answer does not need it
            written += 1
        self.stats.blocks_written += written
        self._touch(hashes)
        self._evict()
        return written

    def _touch(self, hashes: list[str]) -> None:
        """Mark a chain of blocks used now, its first block the most recent: eviction (oldest
        first) then takes a prefix's last blocks before its first ones, so what stays is a prefix."""
        now = time.time_ns()
        for i, h in enumerate(hashes):
            try:
                os.utime(self._path(h), ns=(now - i, now - i))
            except OSError:
                pass

    def _evict(self) -> None:
        if self.budget is None:
            return
        files = []
        for p in self.directory.glob(f"*{SUFFIX}"):
            try:
                st = p.stat()
            except OSError:
                continue
            files.append((st.st_mtime_ns, st.st_size, p))
        total = sum(size for _, size, _ in files)
        for _, size, p in sorted(files, key=lambda x: x[0]):
            if total <= self.budget:
                break
            p.unlink(missing_ok=True)
            total -= size
            self.stats.evicted += 1

    def report(self) -> dict[str, Any]:
        s = self.stats
        return {"prompt_cache_hits": s.hits, "prompt_cache_blocks_loaded": s.blocks_loaded,
                "prompt_cache_blocks_written": s.blocks_written, "prompt_cache_dropped_corrupt": s.dropped_corrupt,
                "prompt_cache_evicted": s.evicted, "prompt_cache_load_s": round(s.load_s, 6)}
