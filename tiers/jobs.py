"""Transfer jobs: bringing one page up to a target tier, in one or two hops.

A job is created by ``prefetch`` (or internally by ``acquire``), has an increasing id, and ends in
one of three ways: the page reached ``target``; a prefetch stopped short because a faster tier had
no evictable room (``wait()`` returns the tier it reached); or a hop failed (``wait()`` raises the
StorageError; the page stays in the tier it was in). The outcome is recorded under the store's lock
before the job is marked done, so the page table never lags the job.
"""

from __future__ import annotations

from concurrent.futures import Future

from flashtier.errors import FlashtierError
from flashtier.tiers.page import PageId


class TransferJob:
    """One page on its way to ``target``. ``done()`` polls, ``wait()`` blocks (see module doc)."""

    __slots__ = ("job_id", "page_id", "target", "demand", "reached", "error", "_future")

    def __init__(self, job_id: int, page_id: PageId, target: str, demand: bool) -> None:
        self.job_id = job_id
        self.page_id = page_id
        self.target = target
        self.demand = demand
        """Whether a caller is blocked on it (hops then may evict prefetched-unused pages)."""
        self.reached: str | None = None
        """Tier the page reached when the job ended without error (set under the store lock)."""
        self.error: FlashtierError | None = None
        """Why the job failed (set under the store lock)."""
        self._future: Future[str] = Future()

    def __repr__(self) -> str:
        state = "done" if self.done() else "running"
        return f"TransferJob(#{self.job_id} {self.page_id!r} -> {self.target}, {state})"

    def done(self) -> bool:
        """Whether the job has ended. Never blocks."""
        return self._future.done()

    def wait(self, timeout: float | None = None) -> str:
        """Block until the job ends; return the tier reached or raise its error."""
        return self._future.result(timeout)

    def settle(self) -> None:
        """Publish the outcome recorded in ``reached`` / ``error`` (call without the store lock)."""
        if self.error is not None:
            self._future.set_exception(self.error)
        else:
            self._future.set_result(self.reached or self.target)
