"""Property tests: random acquire / release / prefetch / cancel / fault sequences on random budgets,
page sizes and offsets, with the pages split between two arenas of one store. After every step: budgets are not exceeded, the page table is consistent
(each page at one location or in flight, pools account exactly for the blocks), and every page the
test holds is still in its arena's compute tier with its bytes intact (a pinned page is never
evicted nor overwritten); an arena never holds more than its own budgets."""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from flashtier.errors import BudgetError, StorageError
from flashtier.storage_backends import MemoryBackend
from flashtier.tiers import (
    ArenaConfig,
    PageDesc,
    PageSource,
    StoreConfig,
    TieredStore,
    TransferJob,
    available_policies,
)

KiB = 1024
N_PAGES = 8
FILE = np.random.default_rng(7).integers(0, 256, 96 * KiB, dtype=np.uint8).tobytes()

page_ids = st.integers(0, N_PAGES - 1)


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        # an O_DIRECT-like backend: aligned spans, so pages take one or more 4 KiB blocks
        self.backend = MemoryBackend(alignment=4096, chunk_size=8 * KiB, queue_depth=3)
        self.backend.add_file("f", FILE)
        self.store: TieredStore | None = None
        self.descs: dict[int, PageDesc] = {}
        self.held: Counter[int] = Counter()
        self.views: dict[int, torch.Tensor] = {}
        self.jobs: list[TransferJob] = []

    @initialize(
        host_blocks=st.integers(1, 6),
        device_blocks=st.integers(0, 3),
        policy=st.sampled_from(available_policies()),
        other=st.tuples(st.integers(1, 4), st.integers(0, 2), st.sampled_from(available_policies())),
        layout=st.lists(
            st.tuples(st.integers(0, 80 * KiB), st.integers(1, 10 * KiB)),
            min_size=N_PAGES,
            max_size=N_PAGES,
        ),
    )
    def build(self, host_blocks, device_blocks, policy, other, layout) -> None:
        config = StoreConfig(
            host_budget=host_blocks * 4096,
            device_budget=device_blocks * 4096,
            host_policy=policy,
            device_policy=policy,
            device="cpu",
        )
        self.store = TieredStore(config, self.backend)
        self.store.add_arena(ArenaConfig("b", other[0] * 4096, other[1] * 4096, other[2], other[2]))
        for pid, (offset, length) in enumerate(layout):
            desc = PageDesc(pid, PageSource("f", offset, length))
            self.descs[pid] = desc
            self.store.register(desc, "b" if pid % 2 else "default")

    def expected(self, pid: int) -> bytes:
        src = self.descs[pid].source
        return FILE[src.offset : src.offset + src.length]

    @rule(pid=page_ids)
    def acquire(self, pid: int) -> None:
        try:
            view = self.store.acquire(pid)
        except (BudgetError, StorageError):
            # refused or failed: nothing stays pinned by this call
            assert self.store.location(pid).pins == self.held[pid]
            return
        assert view.numpy().tobytes() == self.expected(pid)
        self.held[pid] += 1
        self.views[pid] = view

    @rule(pid=page_ids)
    def release(self, pid: int) -> None:
        # drawing does not depend on what is held (outcomes depend on thread timing, and
        # hypothesis needs the same draws when it replays a case): releasing a page not held
        # is a no-op here
        if self.held[pid]:
            self.store.release(pid)
            self.held[pid] -= 1

    @rule(pid=page_ids, priority=st.integers(0, 3))
    def prefetch(self, pid: int, priority: int) -> None:
        job = self.store.prefetch(pid, priority)
        if job is not None:
            self.jobs.append(job)

    @rule(pid=page_ids)
    def cancel_prefetch(self, pid: int) -> None:
        self.store.cancel_prefetch(pid)

    @rule(kind=st.sampled_from(["fail", "short"]))
    def inject_fault(self, kind: str) -> None:
        self.backend.inject_fault(kind)

    @rule()
    def wait_for_jobs(self) -> None:
        for job in self.jobs:
            try:
                reached = self.store.wait(job, timeout=10)
                assert reached in ("device", "host")
            except StorageError:
                pass
        self.jobs.clear()

    @invariant()
    def page_table_is_consistent(self) -> None:
        if self.store is None:
            return
        self.store.check_invariants()
        for arenas in (None, ["default"], ["b"]):
            stats = self.store.stats(arenas)
            for name, tier in stats.tiers.items():
                if name != "storage":
                    assert tier.used_bytes <= tier.capacity_bytes

    @invariant()
    def held_pages_stay_put_and_intact(self) -> None:
        if self.store is None:
            return
        for pid in +self.held:
            location = self.store.location(pid)
            assert location.tier == self.store.compute_tier_of(pid) and location.pins == self.held[pid]
            assert self.views[pid].numpy().tobytes() == self.expected(pid)

    def teardown(self) -> None:
        if self.store is not None:
            for pid, count in self.held.items():
                for _ in range(count):
                    self.store.release(pid)
            self.store.close()
            self.store.check_invariants()
        self.backend.close()


StoreMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None
)
test_store_state_machine = StoreMachine.TestCase
