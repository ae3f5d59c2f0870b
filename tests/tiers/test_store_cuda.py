"""The device tier on a real GPU: pinned host slab, copies on a side stream, views on the GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flashtier.storage_backends import MemoryBackend
from flashtier.tiers import PageDesc, PageSource, StoreConfig, TieredStore

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

PAGE = 1 << 20


def test_pages_stream_through_a_small_device_budget_and_compute_on_the_gpu():
    data = np.random.default_rng(0).integers(0, 256, 8 * PAGE, dtype=np.uint8).tobytes()
    with MemoryBackend(alignment=4096, chunk_size=PAGE) as backend:
        backend.add_file("w", data)
        config = StoreConfig(host_budget=4 * PAGE, device_budget=2 * PAGE, device="cuda")
        with TieredStore(config, backend) as store:
            assert store.compute_tier == "device"
            descs = [PageDesc(i, PageSource("w", i * PAGE, PAGE), torch.float16, (512, 1024))
                     for i in range(8)]
            store.register_many(descs)
            for _ in range(2):
                for i in range(8):
                    store.prefetch((i + 1) % 8)
                    with store.use(i) as w:
                        assert w.is_cuda
                        ref = torch.frombuffer(bytearray(data[i * PAGE : (i + 1) * PAGE]),
                                               dtype=torch.float16).view(512, 1024)
                        # use it on the compute stream right away
                        assert torch.equal(w.float().sum(0).cpu(), ref.float().sum(0))
            store.check_invariants()
            stats = store.stats()
            assert stats.tiers["device"].used_bytes <= 2 * PAGE
