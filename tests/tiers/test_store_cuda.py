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
    # finite fp16 values (random bytes would hold NaNs, and NaN != NaN)
    values = torch.from_numpy(np.random.default_rng(0).standard_normal(8 * PAGE // 2).astype(np.float16))
    data = values.view(torch.uint8).numpy().tobytes()
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
                        ref = values[i * PAGE // 2 : (i + 1) * PAGE // 2].view(512, 1024)
                        # use it on the compute stream right away (the copy's event orders it)
                        col_sums = w.float().sum(0)
                        torch.testing.assert_close(col_sums.cpu(), ref.float().sum(0), rtol=1e-5, atol=1e-4)
                        assert torch.equal(w.cpu(), ref)  # bit-exact bytes
            store.check_invariants()
            stats = store.stats()
            assert stats.tiers["device"].used_bytes <= 2 * PAGE
