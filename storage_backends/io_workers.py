"""A fixed pool of IO threads fed by one priority queue.

The pool size is the queue depth: at most ``n_threads`` reads are in the kernel at once. Lower
priority numbers run first (a demand read jumps ahead of queued prefetches); equal priorities run
in submission order. Reads release the GIL (``os.preadv``), so threads overlap with compute.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

_STOP_PRIORITY = float("inf")


class IoWorkerPool:
    """``n_threads`` daemon threads running submitted callables by (priority, submission order).

    A task must not raise: errors belong to the job the task serves (tasks catch and record them).
    ``close()`` lets queued tasks finish, then joins the threads; submitting after close raises.
    """

    def __init__(self, n_threads: int, name: str) -> None:
        if n_threads < 1:
            raise ValueError(f"an IO pool needs at least one thread, got {n_threads}")
        self._queue: queue.PriorityQueue[tuple[float, int, Callable[[], None] | None]] = (
            queue.PriorityQueue()
        )
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True)
            for i in range(n_threads)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def n_threads(self) -> int:
        """Number of worker threads (the queue depth)."""
        return len(self._threads)

    def submit(self, task: Callable[[], None], priority: int = 0) -> None:
        """Queue ``task``; lower ``priority`` runs first."""
        with self._lock:
            if self._closed:
                raise RuntimeError("IO pool is closed")
            self._queue.put((priority, next(self._seq), task))

    def close(self) -> None:
        """Finish queued tasks, stop the threads and wait for them. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for _ in self._threads:
                self._queue.put((_STOP_PRIORITY, next(self._seq), None))
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join()

    def _run(self) -> None:
        while True:
            _, _, task = self._queue.get()
            if task is None:
                return
            try:
                task()
            except Exception:  # a task must record its own errors; never kill the worker
                log.exception("IO task raised; the worker keeps running")
