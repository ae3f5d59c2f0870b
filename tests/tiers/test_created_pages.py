"""Pages created in memory (KV blocks): a slot arena of the store, written back once on eviction,
read back verified, read through without caching, forgotten with their storage copies; and a
property test that random create / acquire / read / limit / forget sequences keep every page's
bytes and the arena's budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from flashtier.errors import BudgetError, IntegrityError
from flashtier.tiers import StoreConfig, TieredStore

R = 64


class Medium:
    """A write-back medium in memory that counts writes and can corrupt what it holds."""

    def __init__(self) -> None:
        self.files: dict[object, bytes] = {}
        self.writes = 0
        self.reads = 0

    def write(self, page_id, data: torch.Tensor) -> None:
        if page_id in self.files:
            return
        self.files[page_id] = data.numpy().tobytes()
        self.writes += 1

    def read(self, page_ids):
        out = []
        for pid in page_ids:
            raw = self.files[pid]
            if raw[:4] == b"BAD!":
                raise IntegrityError(f"page {pid!r}: checksum mismatch")
            out.append(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
            self.reads += 1
        return out

    def discard(self, page_ids) -> None:
        for pid in page_ids:
            self.files.pop(pid, None)


def record(i: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(i).integers(0, 256, R, dtype=np.uint8))


@pytest.fixture
def kv():
    store = TieredStore(StoreConfig(host_budget=4096), None)
    medium = Medium()
    where: dict[object, int | None] = {}

    def listener(pid, tier, block):
        where[pid] = None if block is None else block.offset // R

    store.add_slot_arena("kv", R, 3, medium, listener)
    yield store, medium, where
    store.check_invariants()
    store.close()


def test_created_pages_spill_once_and_come_back_verified(kv):
    store, medium, where = kv
    for i in range(5):
        store.tick(["kv"])
        store.create(i, record(i), "kv")
    # three slots: the two oldest were written back and left host memory
    assert [where[i] is None for i in range(5)] == [True, True, False, False, False]
    assert medium.writes == 2 and store.location(0).tier == "storage"
    table = store.slot_table("kv")
    assert torch.equal(table[where[4]], record(4))
    with store.use(0) as page:  # read back from the medium into a slot (evicting page 2, the LRU)
        assert torch.equal(page, record(0))
    assert where[0] is not None and where[2] is None and medium.writes == 3
    store.tick(["kv"])
    store.create(5, record(5), "kv")  # page 0 is clean now: evicting it again writes nothing new
    assert medium.writes == 3 + (where[3] is None)  # only the victim that was never written
    assert [torch.equal(d, record(i)) for i, d in enumerate(store.read_through(range(6)))] == [True] * 6
    assert store.stats(["kv"]).tiers["host"].used_bytes == 3 * R


def test_touching_slots_keeps_pages_and_pins_refuse_room(kv):
    store, _, where = kv
    for i in range(3):
        store.tick(["kv"])
        store.create(i, record(i), "kv")
    store.tick(["kv"])
    store.touch_slots("kv", np.array([where[0]]))  # 0 is now the most recent: 1 goes first
    store.create(3, record(3), "kv")
    assert where[1] is None and where[0] is not None
    held = [store.acquire(i) for i in (0, 2, 3)]
    with pytest.raises(BudgetError, match="arena 'kv'"):
        store.create(4, record(4), "kv")
    with pytest.raises(KeyError):
        store.location(4)  # a refused page is not half-created
    for i in (0, 2, 3):
        store.release(i)
    assert all(torch.equal(h, record(i)) for h, i in zip(held, (0, 2, 3)))


def test_limit_and_forget(kv):
    store, medium, where = kv
    for i in range(3):
        store.tick(["kv"])
        store.create(i, record(i), "kv")
    store.set_slot_limit("kv", 1)
    assert [where[i] is None for i in range(3)] == [True, True, False]
    store.forget([0, 2])
    assert 0 not in medium.files and where[2] is None
    with pytest.raises(KeyError):
        store.location(0)
    with pytest.raises(ValueError, match="has no storage backend"):
        from flashtier.tiers import PageDesc, PageSource

        store.register(PageDesc("w", PageSource("weights.bin", 0, 8)))


def test_a_corrupt_written_back_page_raises_and_is_not_used(kv):
    store, medium, where = kv
    for i in range(4):
        store.tick(["kv"])
        store.create(i, record(i), "kv")
    medium.files[0] = b"BAD!" + medium.files[0][4:]
    with pytest.raises(IntegrityError):
        store.acquire(0)
    with pytest.raises(IntegrityError):
        store.read_through([0])
    assert store.location(0).tier == "storage" and store.location(0).pins == 0
    assert torch.equal(store.acquire(1), record(1))  # the others are fine
    store.release(1)


def test_removing_an_arena_forgets_its_pages_and_files(kv):
    store, medium, _ = kv
    store.add_slot_arena("kv2", R, None, medium)  # unbudgeted: grows
    for i in range(40):
        store.create(("b", i), record(i), "kv2")
    assert medium.writes == 0 and store.stats(["kv2"]).tiers["host"].used_bytes == 40 * R
    assert torch.equal(store.slot_table("kv2")[39], record(39))
    store.remove_arena("kv2")
    assert "kv2" not in store.arenas
    with pytest.raises(KeyError):
        store.location(("b", 0))


class CreatedMachine(RuleBasedStateMachine):
    """Random operations on a slot arena beside a file arena: every page keeps its bytes, the host
    slots never exceed the limit, and a page is written back at most once."""

    @initialize(limit=st.integers(1, 5))
    def build(self, limit: int) -> None:
        self.store = TieredStore(StoreConfig(host_budget=4096), None)
        self.medium = Medium()
        self.where: dict[int, int | None] = {}
        self.store.add_slot_arena("kv", R, limit, self.medium,
                                  lambda pid, tier, block: self.where.__setitem__(pid, None if block is None else block.offset // R))
        self.limit = limit
        self.pages: list[int] = []
        self.next = 0

    @rule(n=st.integers(1, 4))
    def create(self, n: int) -> None:
        self.store.tick(["kv"])
        for _ in range(n):
            self.store.create(self.next, record(self.next), "kv")
            self.pages.append(self.next)
            self.next += 1

    @rule(i=st.integers(0, 50))
    def use(self, i: int) -> None:
        if self.pages:
            pid = self.pages[i % len(self.pages)]
            with self.store.use(pid) as page:
                assert torch.equal(page, record(pid))

    @rule(i=st.integers(0, 50))
    def prefetch(self, i: int) -> None:
        if self.pages:
            job = self.store.prefetch(self.pages[i % len(self.pages)])
            if job is not None:
                self.store.wait(job)

    @rule()
    def read_all(self) -> None:
        for pid, data in zip(self.pages, self.store.read_through(self.pages)):
            assert torch.equal(data, record(pid))

    @rule(slots=st.integers(1, 5))
    def limit_to(self, slots: int) -> None:
        self.store.set_slot_limit("kv", slots)
        self.limit = slots

    @rule(k=st.integers(1, 3))
    def forget_last(self, k: int) -> None:
        gone, self.pages = self.pages[-k:], self.pages[:-k]
        self.store.forget(gone)

    @invariant()
    def consistent(self) -> None:
        self.store.check_invariants()
        on_host = [p for p in self.pages if self.where.get(p) is not None]
        assert len(on_host) <= self.limit
        assert self.store.stats(["kv"]).tiers["host"].used_bytes == len(on_host) * R
        table = self.store.slot_table("kv")
        for p in on_host:
            assert torch.equal(table[self.where[p]], record(p))
        assert self.medium.writes <= self.next  # write-once

    def teardown(self) -> None:
        self.store.close()


CreatedMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)
test_created_pages_state_machine = CreatedMachine.TestCase


def test_one_host_budget_for_every_arena():
    """The tier budget is checked as arenas are added; a separately granted share (the KV flag)
    extends it while its arena lives; the memory report states it."""
    from flashtier.tiers import ArenaConfig

    store = TieredStore(StoreConfig(host_budget=4096, host_tier_budget=3 * 4096), None)
    try:
        store.add_arena(ArenaConfig("a", 4096))
        with pytest.raises(BudgetError, match="arena 'b' asks for 8192 bytes .* budget of 12288 bytes"):
            store.add_arena(ArenaConfig("b", 2 * 4096))
        store.add_slot_arena("kv", R, 10, Medium(), extends_tier=True)
        assert store.host_tier_budget == 3 * 4096 + 10 * R
        store.add_arena(ArenaConfig("c", 4096))  # the tier is full again
        with pytest.raises(BudgetError):
            store.add_slot_arena("kv2", R, 1, Medium())
        assert store.memory_report()["host"]["total"]["tier_budget_bytes"] == 3 * 4096 + 10 * R
        store.remove_arena("kv")
        assert store.host_tier_budget == 3 * 4096
        store.add_slot_arena("kv3", R, None, Medium(), extends_tier=True)
        assert store.host_tier_budget is None  # an unbudgeted share makes the tier unbounded
        store.check_invariants()
    finally:
        store.close()
