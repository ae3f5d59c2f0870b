"""Streaming real files through a small host budget with the O_DIRECT backend: every page comes
back exact, prefetch runs ahead, the budget holds, and the compute tier is the host tier."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flashtier.storage_backends import DirectFileBackend, DirectFileConfig
from flashtier.tiers import PageDesc, PageSource, StoreConfig, TieredStore, stream_pages

KiB = 1024
PAGE = 64 * KiB
N = 24


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A file of N fp16 [64, 512] pages, each starting 4 KiB + 2 * i bytes past a page boundary."""
    data = np.random.default_rng(3).integers(0, 256, (N + 1) * PAGE + 8 * KiB, dtype=np.uint8)
    path = tmp_path_factory.mktemp("stream") / "weights.bin"
    path.write_bytes(data.tobytes())
    descs = [
        PageDesc(("layer", i), PageSource(str(path), i * PAGE + 4 * KiB + 2 * i, 64 * 512 * 2),
                 torch.float16, (64, 512))
        for i in range(N)
    ]
    return data.tobytes(), descs


def expected(data: bytes, desc: PageDesc) -> bytes:
    return data[desc.source.offset : desc.source.offset + desc.source.length]


@pytest.mark.parametrize("ahead", [0, 2, 8])
def test_stream_twice_through_a_budget_of_five_pages(weights, ahead):
    data, descs = weights
    budget = 5 * (PAGE + 8 * KiB)  # five aligned spans
    with DirectFileBackend(DirectFileConfig(chunk_size=32 * KiB, queue_depth=4)) as backend, \
            TieredStore(StoreConfig(host_budget=budget), backend) as store:
        store.register_many(descs)
        assert store.compute_tier == "host"
        ids = [d.page_id for d in descs]
        for _ in range(2):
            for page_id, w in stream_pages(store, ids, ahead=ahead):
                assert w.shape == (64, 512) and w.dtype == torch.float16
                assert w.numpy().tobytes() == expected(data, descs[page_id[1]])
                assert store.location(page_id).pins == 1
            store.check_invariants()
        stats = store.stats()
        host = stats.tiers["host"]
        assert host.used_bytes <= host.capacity_bytes == budget
        # a cyclic scan larger than the budget: every page is read each pass
        assert stats.tiers["storage"].bytes_read == 2 * N * 64 * 512 * 2
        assert stats.acquires == 2 * N
        if ahead:
            assert stats.prefetches > 0
        assert backend.stats().bounce_copies == 0  # fp16 at even offsets: read in place


def test_closing_the_stream_early_releases_the_current_page(weights):
    _, descs = weights
    with DirectFileBackend() as backend, \
            TieredStore(StoreConfig(host_budget=4 * (PAGE + 8 * KiB)), backend) as store:
        store.register_many(descs)
        stream = stream_pages(store, [d.page_id for d in descs], ahead=2)
        page_id, _ = next(stream)
        assert store.location(page_id).pins == 1
        stream.close()
        assert store.location(page_id).pins == 0
        with pytest.raises(ValueError, match="ahead"):
            next(stream_pages(store, [], ahead=-1))
