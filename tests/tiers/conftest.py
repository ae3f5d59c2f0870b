"""Helpers for store tests: an in-memory backend with one file per name, pages of known bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flashtier.storage_backends import MemoryBackend
from flashtier.tiers import PageDesc, PageSource, StoreConfig, TieredStore

PAGE = 4096
"""Page size in most scenarios: one host block each (the host tier's alignment)."""


def file_bytes(name: str, size: int) -> bytes:
    """Deterministic bytes for a named file."""
    seed = sum(name.encode())
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


class Pages:
    """A MemoryBackend holding files "f" (shared by numbered pages) and any extra named files."""

    def __init__(self, backend: MemoryBackend, n_pages: int = 16, page: int = PAGE) -> None:
        self.backend = backend
        self.page = page
        self.data = {"f": file_bytes("f", n_pages * page)}
        backend.add_file("f", self.data["f"])

    def add_file(self, name: str, size: int) -> None:
        self.data[name] = file_bytes(name, size)
        self.backend.add_file(name, self.data[name])

    def desc(
        self,
        page_id,
        *,
        path: str = "f",
        offset: int | None = None,
        length: int | None = None,
        dtype: torch.dtype = torch.uint8,
        shape=None,
    ) -> PageDesc:
        if offset is None:
            offset = int(page_id) * self.page
        return PageDesc(page_id, PageSource(path, offset, length or self.page), dtype, shape)

    def expected(self, desc: PageDesc) -> bytes:
        src = desc.source
        return self.data[src.path][src.offset : src.offset + src.length]

    @staticmethod
    def bytes_of(t: torch.Tensor) -> bytes:
        """The bytes a tensor view covers."""
        return t.contiguous().view(torch.uint8).numpy().tobytes()


@pytest.fixture
def backend() -> MemoryBackend:
    b = MemoryBackend(alignment=1, chunk_size=1 << 20, queue_depth=4)
    yield b
    b.close()


@pytest.fixture
def pages(backend: MemoryBackend) -> Pages:
    return Pages(backend)


@pytest.fixture
def aligned_pages() -> Pages:
    """Pages over an O_DIRECT-like backend: reads are 4 KiB-aligned spans."""
    b = MemoryBackend(alignment=4096, chunk_size=8192)
    yield Pages(b)
    b.close()


@pytest.fixture
def make_store(backend: MemoryBackend, pages: Pages):
    """make_store(host_pages, device_pages=0, policy='lru', ids=range(16)) -> registered store."""
    stores: list[TieredStore] = []

    def make(
        host_pages: int, device_pages: int = 0, policy: str = "lru", ids=range(16)
    ) -> TieredStore:
        config = StoreConfig(
            host_budget=host_pages * PAGE,
            device_budget=device_pages * PAGE,
            host_policy=policy,
            device_policy=policy,
            device="cpu",
        )
        store = TieredStore(config, backend)
        store.register_many(pages.desc(i) for i in ids)
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.check_invariants()
        store.close()
