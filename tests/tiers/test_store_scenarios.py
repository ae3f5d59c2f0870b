"""TieredStore scenarios, narrated: budgets, pins, prefetch, eviction order, views, failures.

Pages are 4 KiB (one host block); ``make_store(n)`` gives a host budget of n pages, compute on the
host tier (no device) unless a device budget is given (the CPU stand-in).
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from flashtier.errors import BudgetError, ConfigError, StorageError
from flashtier.tiers import PageDesc, PageSource, StoreConfig, TieredStore

PAGE = 4096  # as in conftest


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def where(store: TieredStore, *ids) -> list[str]:
    return [store.location(i).tier for i in ids]


def wait_until(predicate, timeout: float = 5.0) -> None:
    """Test helper: re-check ``predicate`` until true (a consumer thread reached its wait)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.001)


def touch(store: TieredStore, *ids) -> None:
    for i in ids:
        with store.use(i):
            pass


# -- budgets and eviction --------------------------------------------------------------------


def test_acquire_three_pages_with_budget_for_two_evicts_the_oldest(make_store, pages):
    store = make_store(host_pages=2)
    # acquire [1, 2, 3] with budget for 2 -> evicts 1
    touch(store, 1, 2, 3)
    assert where(store, 1, 2, 3) == ["storage", "host", "host"]
    # acquire 2 again: a hit, and 2 becomes most recent; acquire 1 -> evicts 3
    touch(store, 2, 1)
    assert where(store, 1, 2, 3) == ["host", "host", "storage"]
    stats = store.stats()
    host = stats.tiers["host"]
    assert (host.hits, host.misses, host.evictions) == (1, 4, 2)
    assert stats.tiers["storage"].bytes_read == 4 * PAGE
    assert host.used_bytes == 2 * PAGE <= host.capacity_bytes


def test_acquired_view_is_the_page_in_place_and_stays_the_same(make_store, pages):
    store = make_store(host_pages=4)
    a = store.acquire(1)
    b = store.acquire(2)
    assert tensor_bytes(a) == pages.expected(pages.desc(1))
    # both views live in the one host slab: no per-page allocation, no copy
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    again = store.acquire(1)
    assert again.data_ptr() == a.data_ptr()
    store.release(1), store.release(1), store.release(2)


def test_pinned_pages_are_never_evicted_and_full_pins_raise_budget_error(make_store):
    store = make_store(host_pages=2)
    store.acquire(1)
    store.acquire(2)
    # acquire 3 while 1 and 2 are held -> nothing evictable: BudgetError naming the need
    with pytest.raises(BudgetError) as info:
        store.acquire(3)
    message = str(info.value)
    assert "page 3" in message and "needs 4096 bytes" in message and "budget is 8192" in message
    assert "8192 bytes are held" in message and "--dram-budget" in message
    assert store.location(3).pins == 0 and where(store, 1, 2, 3) == ["host", "host", "storage"]
    store.check_invariants()
    # release 1 -> acquire 3 evicts 1, never the still-held 2
    store.release(1)
    with store.use(3):
        pass
    assert where(store, 1, 2, 3) == ["storage", "host", "host"]
    store.release(2)


def test_page_larger_than_the_budget_is_a_budget_error(make_store, pages, backend):
    store = make_store(host_pages=2)
    pages.add_file("big", 3 * PAGE)
    store.register(pages.desc("big", path="big", offset=0, length=3 * PAGE))
    with pytest.raises(BudgetError, match="needs 12288 bytes, the budget is 8192"):
        store.acquire("big")


def test_release_more_than_acquire_is_an_error(make_store):
    store = make_store(host_pages=2)
    with pytest.raises(ValueError, match="released more often"):
        store.release(1)


def test_unknown_page_is_named(make_store):
    store = make_store(host_pages=2)
    with pytest.raises(KeyError, match="'nope' is not registered"):
        store.acquire("nope")


# -- prefetch --------------------------------------------------------------------------------


def test_prefetch_then_acquire_is_a_hit(make_store):
    store = make_store(host_pages=2)
    job = store.prefetch(1)
    assert job is not None and store.wait(job) == "host"
    assert store.poll(job)
    touch(store, 1)
    stats = store.stats()
    assert stats.tiers["host"].hits == 1 and stats.prefetches == 1
    # prefetching a page already there starts nothing: the job it returns has ended
    again = store.prefetch(1)
    assert again is not None and again.done() and again.wait() == "host"
    assert store.stats().prefetches == 1


def test_prefetch_never_evicts_prefetched_unused_pages_but_demand_does(make_store):
    store = make_store(host_pages=2)
    # prefetch [1, 2] -> both arrive; prefetch 3 -> declined (1 and 2 are wanted soon)
    store.wait(store.prefetch(1))
    store.wait(store.prefetch(2))
    assert store.prefetch(3) is None
    assert store.stats().prefetches_declined == 1
    assert where(store, 1, 2, 3) == ["host", "host", "storage"]
    # acquire 3 (demand) -> may evict an unused prefetch: the one prefetched last, 2
    # (prefetches are issued in order of need, so it is the one needed furthest ahead)
    touch(store, 3)
    assert where(store, 1, 2, 3) == ["host", "storage", "host"]


def test_consumed_pages_go_before_prefetched_ones(make_store):
    store = make_store(host_pages=3)
    # use 1, then prefetch 2 and 3 -> prefetch 4 evicts only the consumed page 1
    touch(store, 1)
    store.wait(store.prefetch(2))
    store.wait(store.prefetch(3))
    store.wait(store.prefetch(4))
    assert where(store, 1, 2, 3, 4) == ["storage", "host", "host", "host"]


def test_cancel_prefetch_lets_other_prefetches_evict_it(make_store):
    store = make_store(host_pages=1)
    store.wait(store.prefetch(1))
    assert store.prefetch(2) is None
    # the predictor was wrong about 1 -> cancel; prefetch 2 now evicts it
    store.cancel_prefetch(1)
    store.wait(store.prefetch(2))
    assert where(store, 1, 2) == ["storage", "host"]


def test_mru_keeps_a_fixed_subset_of_a_cyclic_scan(make_store):
    store = make_store(host_pages=3, policy="mru")
    # scan 0..5 with room for 3: 0, 1, 2 fill it; 3, 4, 5 each evict the page just used
    touch(store, *range(6))
    assert where(store, *range(6)) == ["host", "host", "storage", "storage", "storage", "host"]
    # second pass: 0, 1 hit; 2, 3, 4 evict the page just used; 5 hits -> 3 hits (LRU: none)
    touch(store, *range(6))
    host = store.stats().tiers["host"]
    assert host.hits == 3 and host.misses == 9


def test_prefetch_priority_must_be_non_negative(make_store):
    store = make_store(host_pages=1)
    with pytest.raises(ValueError, match="priority"):
        store.prefetch(1, priority=-1)


# -- resident pages --------------------------------------------------------------------------


def test_resident_pages_stay_while_others_stream_through(make_store):
    store = make_store(host_pages=3)
    store.make_resident([0])
    # stream 1..8 through the 2 remaining slots -> 0 is never evicted
    for i in range(1, 9):
        touch(store, i)
    assert store.location(0) == store.location(0).__class__("host", None, 0, True, ("host",))
    assert store.stats().tiers["host"].evictions == 6
    # resident pages past the budget -> BudgetError, and none of them is marked resident
    with pytest.raises(BudgetError, match="keep resident"):
        store.make_resident([5, 6, 7])
    assert not any(store.location(i).resident for i in (5, 6, 7))
    # release_resident -> 0 is evictable again
    store.release_resident([0])
    touch(store, 10, 11, 12)
    assert where(store, 0) == ["storage"]


# -- views: dtype, shape, alignment ------------------------------------------------------------


def test_view_has_descriptor_dtype_and_shape_from_an_unaligned_offset(aligned_pages):
    # an O_DIRECT-like backend (4 KiB alignment): the page starts 1000 bytes into its span
    pages, backend = aligned_pages, aligned_pages.backend
    desc = pages.desc("w", offset=5096, length=4 * 512 * 2, dtype=torch.float16, shape=(4, 512))
    with TieredStore(StoreConfig(host_budget=4 * PAGE), backend) as store:
        store.register(desc)
        with store.use("w") as w:
            assert w.shape == (4, 512) and w.dtype == torch.float16
            assert tensor_bytes(w) == pages.expected(desc)
    # the read landed in place: no bounce copy
    assert backend.stats().bounce_copies == 0


def test_misaligned_dtype_offset_goes_through_a_bounce_buffer_and_is_exact(aligned_pages):
    pages, backend = aligned_pages, aligned_pages.backend
    # float32 at offset 4098: in place it would start 2 bytes into a block -> not viewable
    desc = pages.desc("odd", offset=4098, length=4000, dtype=torch.float32)
    with TieredStore(StoreConfig(host_budget=4 * PAGE), backend) as store:
        store.register(desc)
        with store.use("odd") as w:
            assert w.dtype == torch.float32 and tensor_bytes(w) == pages.expected(desc)
    assert backend.stats().bounce_copies == 1


def test_acquire_can_override_dtype_and_shape(make_store, pages):
    store = make_store(host_pages=2)
    with store.use(1, dtype=torch.int32, shape=(32, 32)) as w:
        assert w.shape == (32, 32) and tensor_bytes(w) == pages.expected(pages.desc(1))
    with store.use(1) as w:  # the descriptor's default view is unaffected
        assert w.shape == (PAGE,) and w.dtype == torch.uint8


def test_register_rejects_a_range_past_the_end_of_the_file(make_store, pages):
    store = make_store(host_pages=2)
    with pytest.raises(StorageError, match="truncated or the index is wrong"):
        store.register(pages.desc(99))


# -- failures --------------------------------------------------------------------------------


def test_failed_read_raises_and_the_next_acquire_works(make_store, backend, pages):
    store = make_store(host_pages=2)
    touch(store, 1)
    # a read error on page 2 -> StorageError; 2 stays in storage, unpinned, no block leaked
    backend.inject_fault("fail")
    with pytest.raises(StorageError, match="injected IO error reading f"):
        store.acquire(2)
    assert store.location(2) == store.location(2).__class__("storage", None, 0, False)
    assert store.stats().tiers["host"].used_bytes == PAGE
    assert store.stats().transfers_failed == 1
    store.check_invariants()
    # the next request retries from scratch and works
    with store.use(2) as w:
        assert tensor_bytes(w) == pages.expected(pages.desc(2))


def test_short_read_fails_the_prefetch_job_then_acquire_retries(make_store, backend, pages):
    store = make_store(host_pages=2)
    backend.inject_fault("short")
    job = store.prefetch(3)
    with pytest.raises(StorageError, match=r"short read from f: asked 4096 bytes at offset 12288"):
        store.wait(job)
    store.check_invariants()
    with store.use(3) as w:
        assert tensor_bytes(w) == pages.expected(pages.desc(3))


def test_acquire_waiting_on_a_prefetch_that_fails_raises(make_store, backend, pages):
    store = make_store(host_pages=2)
    backend.hold_reads("f")
    backend.inject_fault("fail")
    job = store.prefetch(1)
    errors: list[BaseException] = []

    def consumer() -> None:
        try:
            store.acquire(1)
        except StorageError as e:
            errors.append(e)

    thread = threading.Thread(target=consumer)
    thread.start()
    wait_until(lambda: store.stats().late == 1)  # the consumer waits on the prefetch's read
    backend.release_reads()
    thread.join(5)
    assert len(errors) == 1 and "injected" in str(errors[0])
    with pytest.raises(StorageError):
        job.wait(5)
    assert store.location(1).pins == 0
    store.check_invariants()


# -- concurrency -------------------------------------------------------------------------------


def test_page_in_flight_is_never_evicted_while_others_come_and_go(make_store, backend, pages):
    pages.add_file("slow", PAGE)
    store = make_store(host_pages=2)
    store.register(pages.desc("s", path="slow", offset=0))
    backend.hold_reads("slow")
    # prefetch s -> in flight, holding one of the two host blocks
    job = store.prefetch("s")
    assert store.location("s").in_flight_to == "host"
    # acquire 1, 2, 3 one after the other -> they share the one other block; s is untouched
    touch(store, 1, 2, 3)
    assert where(store, 1, 2, 3) == ["storage", "storage", "host"]
    assert store.location("s").in_flight_to == "host"
    store.check_invariants()
    # prefetching s again returns the same job; a second consumer waits on it too
    assert store.prefetch("s") is job
    got: list[bytes] = []
    thread = threading.Thread(target=lambda: got.append(tensor_bytes(store.acquire("s"))))
    thread.start()
    wait_until(lambda: store.stats().late == 1)
    backend.release_reads()
    assert store.wait(job) == "host"
    thread.join(5)
    assert got == [pages.expected(pages.desc("s", path="slow", offset=0))]
    assert store.stats().late == 1
    store.release("s")
    # one read for s in all
    assert sum(1 for path, _, _ in backend.read_log if path == "slow") == 1


def test_demand_waits_for_room_held_by_transfers_in_flight(make_store, backend, pages):
    pages.add_file("slow", 2 * PAGE)
    store = make_store(host_pages=2)
    store.register(pages.desc("s0", path="slow", offset=0))
    store.register(pages.desc("s1", path="slow", offset=PAGE))
    backend.hold_reads("slow")
    # prefetch s0, s1 -> both in flight, the whole budget reserved
    jobs = [store.prefetch("s0"), store.prefetch("s1")]
    # acquire 1 now -> no room, but the room is held by transfers, not by pins: it waits
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(store.acquire(1)))
    thread.start()
    thread.join(0.2)
    assert thread.is_alive() and not result
    backend.release_reads()
    thread.join(5)
    assert len(result) == 1 and isinstance(result[0], torch.Tensor)
    # the other prefetch may still be landing when the demand returns (seen on a 16-core machine)
    for job in jobs:
        store.wait(job, timeout=5)
    # it evicted one of the unused prefetches (whichever had landed when it woke up)
    assert sorted(where(store, "s0", "s1")) == ["host", "storage"]
    assert where(store, 1) == ["host"]
    assert store.stats().wait_s > 0
    store.release(1)


def test_two_threads_stream_different_pages_concurrently(make_store, pages):
    store = make_store(host_pages=4)
    errors: list[BaseException] = []

    def worker(ids) -> None:
        try:
            for _ in range(20):
                for i in ids:
                    store.prefetch(i)
                for i in ids:
                    with store.use(i) as w:
                        assert tensor_bytes(w) == pages.expected(pages.desc(i))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(ids,)) for ids in ([0, 1, 2], [5, 6, 7])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    # a BudgetError is allowed when both threads hold pages at once; corruption is not
    assert all(isinstance(e, BudgetError) for e in errors), errors
    store.check_invariants()


def test_close_waits_for_transfers_in_flight(make_store, backend):
    store = make_store(host_pages=2)
    backend.hold_reads()
    job = store.prefetch(1)
    closer = threading.Thread(target=store.close)
    closer.start()
    closer.join(0.2)
    assert closer.is_alive()
    backend.release_reads()
    closer.join(5)
    assert not closer.is_alive() and job.done()


# -- device tier (CPU stand-in) ----------------------------------------------------------------


def test_device_tier_two_hops_and_host_keeps_a_copy(make_store, pages, backend):
    store = make_store(host_pages=3, device_pages=1)
    assert store.compute_tier == "device"
    # acquire 1 -> storage -> host -> device
    with store.use(1) as w:
        assert tensor_bytes(w) == pages.expected(pages.desc(1))
    assert where(store, 1) == ["device"]
    # acquire 2 -> device full: 1 is evicted from the device but its host copy remains
    touch(store, 2)
    assert where(store, 1, 2) == ["host", "device"]
    reads = len(backend.read_log)
    # acquire 1 again -> device miss, host hit, no storage read
    touch(store, 1)
    assert len(backend.read_log) == reads
    stats = store.stats()
    assert (stats.tiers["device"].hits, stats.tiers["device"].misses) == (0, 3)
    assert (stats.tiers["host"].hits, stats.tiers["host"].misses) == (1, 2)
    assert stats.tiers["host"].bytes_read == 3 * PAGE  # host -> device copies


def test_device_prefetch_goes_both_hops_and_stops_short_without_room(make_store):
    store = make_store(host_pages=3, device_pages=1)
    assert store.wait(store.prefetch(1)) == "device"
    # device holds the unused prefetch 1 -> prefetch 2 reaches host only
    assert store.wait(store.prefetch(2)) == "host"
    assert where(store, 1, 2) == ["device", "host"]


def test_acquire_refused_at_the_device_leaves_the_prefetch_job_stopped_short(make_store, backend):
    store = make_store(host_pages=3, device_pages=1)
    store.acquire(1)  # holds the only device slot
    backend.hold_reads("f")
    job = store.prefetch(2)  # storage -> host in flight
    errors: list[BaseException] = []

    def consumer() -> None:
        try:
            store.acquire(2)
        except BudgetError as e:
            errors.append(e)

    thread = threading.Thread(target=consumer)
    thread.start()
    wait_until(lambda: store.stats().late == 1)
    backend.release_reads()
    thread.join(5)
    # the consumer joined the prefetch's job; the device is pinned full -> it gets BudgetError,
    # while the prefetch job just ends at the host tier
    assert len(errors) == 1 and "device tier cannot take page 2" in str(errors[0])
    assert job.wait(5) == "host"
    assert where(store, 1, 2) == ["device", "host"] and store.location(2).pins == 0
    store.release(1)


def test_config_validation_names_the_fix():
    with pytest.raises(ConfigError, match="--dram-budget"):
        StoreConfig(host_budget=0)
    with pytest.raises(ConfigError, match="unknown; choose one of"):
        StoreConfig(host_budget=PAGE, host_policy="fifo")
    with pytest.raises(ConfigError, match="device"):
        StoreConfig(host_budget=PAGE, device="tpu")  # type: ignore[arg-type]


def test_page_descriptor_checks_shape_against_length():
    with pytest.raises(ValueError, match="shape"):
        PageDesc("x", PageSource("f", 0, 100), torch.float16, (10, 10))
    assert PageDesc("x", PageSource("f", 0, 100), torch.float16).shape == (50,)


# -- arenas -----------------------------------------------------------------------------------


def test_arenas_share_one_page_table_but_never_evict_each_other(backend, pages):
    from flashtier.tiers import ArenaConfig

    store = TieredStore(StoreConfig(host_budget=2 * PAGE, device="cpu"), backend)
    try:
        store.add_arena(ArenaConfig("experts", 1 * PAGE, device_budget=1 * PAGE))
        store.register_many([pages.desc(0), pages.desc(1)])
        store.register_many([pages.desc(2), pages.desc(3)], arena="experts")
        touch(store, 0, 1)
        assert where(store, 0, 1) == ["host", "host"]
        # the expert arena computes on its device pool; cycling its pages leaves the default's alone
        assert store.compute_tier == "host" and store.compute_tier_of(2) == "device"
        touch(store, 2, 3, 2)
        assert where(store, 0, 1) == ["host", "host"]
        assert where(store, 2) == ["device"]
        with store.use(3) as w:
            assert tensor_bytes(w) == pages.expected(pages.desc(3))
        stats, experts, default = store.stats(), store.stats(["experts"]), store.stats(["default"])
        assert default.acquires == 2 and experts.acquires == 4 and stats.acquires == 6
        assert default.tiers["host"].evictions == 0 and experts.tiers["device"].evictions >= 2
        assert stats.tiers["host"].capacity_bytes == 3 * PAGE
        assert "device" not in default.tiers and experts.tiers["device"].capacity_bytes == PAGE
        # an arena that cannot hold a page names itself
        store.add_arena(ArenaConfig("small", 16))
        store.register(pages.desc(4), arena="small")
        with pytest.raises(BudgetError, match="arena 'small'"):
            store.acquire(4)
        with pytest.raises(ValueError, match="already has an arena named 'small'"):
            store.add_arena(ArenaConfig("small", PAGE))
        with pytest.raises(KeyError, match="no arena 'nope'"):
            store.register(pages.desc(5), arena="nope")
        store.check_invariants()
    finally:
        store.close()


# -- copies kept below the compute tier (session 11: weights and experts paged onto a device) ------


def test_held_pages_keep_their_host_copy_while_the_device_window_cycles(make_store, pages):
    store = make_store(host_pages=4, device_pages=1)
    store.hold([0, 1], "host")
    assert [store.location(i).copies for i in (0, 1)] == [("host",), ("host",)]
    for _ in range(3):  # each use copies into the one-page device window, evicting the last
        for i in (0, 1, 2, 3):
            with store.use(i) as w:
                assert w.device.type == "cpu" and tensor_bytes(w) == pages.expected(pages.desc(i))
    for i in (0, 1):
        loc = store.location(i)
        assert loc.held == "host" and "host" in loc.copies
    reads = store.stats().tiers["storage"].bytes_read
    for i in (0, 1):  # the held pages hit the host: no storage read
        with store.use(i):
            pass
    assert store.stats().tiers["storage"].bytes_read == reads
    with pytest.raises(ValueError, match="in use"):
        store.unregister(0)
    store.release_hold([0])
    store.unregister(0)
    with pytest.raises(BudgetError, match="pages to hold"):
        store.hold([2, 3, 4, 5, 6], "host")
    assert store.location(2).held is None  # nothing held after a refusal


def test_acquire_at_pins_the_host_copy_of_a_device_arena_page(make_store, pages):
    store = make_store(host_pages=2, device_pages=1)
    w = store.acquire_at(0, "host")
    assert tensor_bytes(w) == pages.expected(pages.desc(0)) and store.location(0).copies == ("host",)
    # other pages cycle through both tiers; the pinned host copy stays
    for i in (1, 2, 3, 1, 2):
        with store.use(i):
            pass
    assert "host" in store.location(0).copies
    assert tensor_bytes(w) == pages.expected(pages.desc(0))
    store.release_at(0, "host")
    with pytest.raises(ValueError, match="more often than acquired"):
        store.release_at(0, "host")
    with store.use(3):  # on the device now; its host copy may go
        pass
    for i in (1, 2):
        with store.use(i):
            pass
    if store.location(3).copies == ("device",):
        with pytest.raises(ValueError, match="only in the device tier"):
            store.acquire_at(3, "host")
    with pytest.raises(ValueError, match="no device tier below"):
        store.acquire_at(0, "device")


def test_prefetch_to_a_lower_tier_stops_there(make_store):
    store = make_store(host_pages=2, device_pages=1)
    job = store.prefetch(0, tier="host")
    store.wait(job)
    assert store.location(0).copies == ("host",)
    store.wait(store.prefetch(0))  # the compute tier: copied on
    assert store.location(0).tier == "device"
