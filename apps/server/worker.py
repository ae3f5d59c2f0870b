"""The model worker: one thread that loads the model, then runs generation jobs one at a time.

Contract:

* :meth:`ModelWorker.start` returns at once; the model loads on the worker thread, so the server
  is already listening (and answers 503) while it loads. ``state`` goes LOADING -> READY, or
  LOADING -> FAILED with ``error`` set.
* Jobs start in submission order (FIFO: one queue, no job overtakes an earlier one, so none
  starves while others keep arriving): one at a time, or with ``max_batch`` > 1 up to that many
  decoding together, a waiting job joining as soon as a running one leaves. The worker thread is
  the only thread that runs the model; request handlers use only its tokenizer and config, which
  generation does not change.
* :meth:`ModelWorker.stream` is the async face of a job: it yields the engine's
  :class:`TokenEvent` s, then one :class:`Finished`, delivered to the caller's event loop with
  ``call_soon_threadsafe``. Leaving the iteration early (a client went away) cancels the job: the
  worker drops it before computing its next token (its KV and batch slot are freed; with one job
  at a time the engine's token iterator is closed, which releases the model for the next job). A
  job cancelled before its turn is skipped.
* With ``request_timeout_s``, :meth:`ModelWorker.stream` raises :class:`RequestTimeout` once that
  many seconds have passed since the job was queued (waiting time included) and it has not
  finished: at the deadline itself, even while a prefill or a decode step runs; the job is then
  cancelled as above, so the worker stops it at its next token boundary.
* Latency: each job's first token and every next one are timed when the worker delivers them
  (:meth:`ServerMetrics.first_token` from the job's acceptance, :meth:`ServerMetrics.next_token`
  from its previous token).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from flashtier.apps.server.metrics import Outcome, ServerMetrics
from flashtier.runtime import Model, SamplingConfig, TokenEvent
from flashtier.runtime.generate import GenerationStats
from flashtier.runtime.kv.cache import KVBudgetFull

log = logging.getLogger("flashtier.server")


class WorkerState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One generation as the worker runs it: prompt ids checked against the model already."""

    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingConfig
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True, slots=True)
class Finished:
    """The last item of a job: why it ended, its token counts and the engine's statistics."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    stats: dict


@dataclass(frozen=True, slots=True)
class _Failed:
    error: BaseException


JobItem = TokenEvent | Finished | _Failed


@dataclass(eq=False)
class _Job:
    request: GenerationRequest
    deliver: Callable[[JobItem], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    timed_out: bool = False
    """Set (before ``cancelled``) by its consumer when the job ran past the request timeout."""
    accepted_at: float = field(default_factory=time.perf_counter)
    last_token_at: float | None = None
    """When the worker delivered the job's latest token (None before the first)."""

    @property
    def outcome(self) -> Outcome:
        """How the job ends if the worker stops it now."""
        return Outcome.TIMED_OUT if self.timed_out else Outcome.CANCELLED


class RequestTimeout(Exception):
    """A job ran past the server's request timeout (``--request-timeout``) and was stopped."""

    def __init__(self, timeout_s: float, generated_tokens: int) -> None:
        super().__init__(f"the request did not finish within --request-timeout {timeout_s:g} s and was stopped "
                         f"after {generated_tokens} generated tokens; ask for fewer tokens (max_tokens) or raise "
                         f"--request-timeout")
        self.timeout_s = timeout_s
        self.generated_tokens = generated_tokens


class WorkerUnavailable(Exception):
    """The model cannot take jobs: it is still loading, failed to load, or the worker stopped."""

    def __init__(self, state: WorkerState, error: BaseException | None) -> None:
        reason = {WorkerState.LOADING: "the model is still loading; retry shortly",
                  WorkerState.FAILED: f"the model failed to load: {error}",
                  WorkerState.STOPPED: "the server is shutting down"}.get(state, state.value)
        super().__init__(reason)
        self.state = state


class ModelWorker:
    """Owns the model: loads it, then serves :class:`GenerationRequest` s in FIFO order."""

    def __init__(self, loader: Callable[[], Model], metrics: ServerMetrics, live_interval_s: float = 0.5,
                 max_batch: int = 1, request_timeout_s: float | None = None) -> None:
        """``max_batch`` > 1: up to that many jobs decode together (continuous batching: a job joins
        at a token boundary, after its prompt is prefilled, and leaves when done or cancelled).
        ``request_timeout_s``: seconds from queueing after which a job is stopped (None: never)."""
        self._loader = loader
        self._max_batch = max_batch
        self._kv_waiting: collections.deque[_Job] = collections.deque()
        """Jobs admitted while the KV budget was held by running ones (``--kv-sequences`` below
        ``--max-batch``): they join, in arrival order, as running jobs finish."""
        self._request_timeout_s = request_timeout_s
        self._batch: list[_Job] = []
        self._joining: list[_Job] = []
        """Jobs taken from the queue and being prefilled (batched mode)."""
        self._stopping = threading.Event()
        self.peak_batch = 0
        """The most jobs that decoded together so far."""
        self._metrics = metrics
        self._live_interval_s = live_interval_s
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._current: _Job | None = None
        self.state = WorkerState.LOADING
        self.error: BaseException | None = None
        self.model: Model | None = None

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start the worker thread (loads the model, then serves jobs). Returns at once."""
        if self._thread is not None:
            raise RuntimeError("the model worker is already started")
        self._thread = threading.Thread(target=self._run, name="flashtier-model-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel the running job and the queued ones (their consumers get
        :class:`WorkerUnavailable`), wait for the thread; it closes the model."""
        self._stopping.set()
        current = self._current
        if current is not None:
            current.cancelled.set()
        for job in [*self._batch, *self._joining]:
            job.cancelled.set()
        for job in list(self._kv_waiting):
            job.cancelled.set()
            _deliver_quietly(job, _Failed(WorkerUnavailable(WorkerState.STOPPED, None)))
        with contextlib.suppress(queue.Empty):
            while True:
                job = self._jobs.get_nowait()
                if job is not None:
                    job.cancelled.set()
                    _deliver_quietly(job, _Failed(WorkerUnavailable(WorkerState.STOPPED, None)))
        self._jobs.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until the model is loaded (True) or failed / timed out (False)."""
        self._ready.wait(timeout)
        return self.state is WorkerState.READY

    def require_model(self) -> Model:
        """The loaded model, for tokenizer and config; raises :class:`WorkerUnavailable` otherwise."""
        if self.state is not WorkerState.READY or self.model is None:
            raise WorkerUnavailable(self.state, self.error)
        return self.model

    @property
    def queue_depth(self) -> int:
        """Jobs waiting plus the ones running (being prefilled included)."""
        return (self._jobs.qsize() + (1 if self._current is not None else 0) + len(self._batch) + len(self._joining)
                + len(self._kv_waiting))

    @property
    def waiting(self) -> int:
        """Jobs queued and not started (the queue length; ones whose client already left count until
        their turn skips them), those waiting for KV budget included."""
        return self._jobs.qsize() + len(self._kv_waiting)

    @property
    def batch_size(self) -> int:
        """Jobs decoding together now (continuous batching; 0 or 1 without it)."""
        return len(self._batch) if self._max_batch > 1 else int(self._current is not None)

    # ---------------------------------------------------------------- jobs
    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenEvent | Finished]:
        """Queue ``request``; yield its tokens, then a :class:`Finished`. Closing this cancels it.

        Engine errors raised while the job runs are re-raised here. With a request timeout,
        :class:`RequestTimeout` is raised once it has passed since the job was queued (items the
        worker delivered but this iteration has not yet taken are dropped), and the job is cancelled.
        """
        self.require_model()
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[JobItem] = asyncio.Queue()

        def deliver(item: JobItem) -> None:
            loop.call_soon_threadsafe(inbox.put_nowait, item)

        job = _Job(request, deliver)
        timeout = self._request_timeout_s
        deadline = None if timeout is None else loop.time() + timeout
        tokens = 0
        self._jobs.put(job)
        try:
            while True:
                try:
                    item = await _next_before(inbox, deadline)
                except TimeoutError:
                    job.timed_out = True
                    raise RequestTimeout(timeout or 0.0, tokens) from None
                if isinstance(item, _Failed):
                    raise item.error
                if isinstance(item, TokenEvent) and item.token_id is not None:
                    tokens += 1
                yield item
                if isinstance(item, Finished):
                    return
        finally:
            job.cancelled.set()  # no-op for a finished job; synchronous, so safe while being cancelled

    # ---------------------------------------------------------------- worker thread
    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            model = self._loader()
        except BaseException as e:  # a loader fault must not kill the thread silently
            self.error, self.state = e, WorkerState.FAILED
            log.error("model failed to load: %s", e)
            self._ready.set()
            return
        self.model, self.state = model, WorkerState.READY
        self._metrics.set_memory(model.memory_report())
        log.info("model %s loaded in %.2f s", model.name, time.perf_counter() - t0)
        self._ready.set()
        if self._max_batch > 1:
            try:
                self._run_batched(model)
            finally:
                self.state = WorkerState.STOPPED
                model.close()
            return
        try:
            while (job := self._jobs.get()) is not None:
                if job.cancelled.is_set():
                    self._metrics.job_skipped(job.outcome)  # its client left, or it timed out, while it waited
                    continue
                self._current = job
                try:
                    last = self._serve(model, job)
                finally:
                    self._current = None
                _deliver_quietly(job, last)  # after the job left: its consumer sees the worker idle
        finally:
            self.state = WorkerState.STOPPED
            model.close()

    def _serve(self, model: Model, job: _Job) -> Finished | _Failed:
        """Run ``job`` alone, delivering its tokens; its last item, for the caller to deliver."""
        req = job.request
        stats = GenerationStats()
        self._metrics.job_started(id(job))
        cancelled = False
        last_live = time.perf_counter()
        try:
            events = model.stream(list(req.prompt_ids), max_new_tokens=req.max_new_tokens, sampling=req.sampling,
                                  stop=req.stop, stats=stats, ignore_eos=req.ignore_eos)
            with contextlib.closing(events):
                for event in events:
                    if job.cancelled.is_set():
                        cancelled = True
                        break
                    self._emit(job, event)
                    self._metrics.job_progress(id(job), stats.generated_tokens)
                    if time.perf_counter() - last_live >= self._live_interval_s:
                        self._metrics.set_memory(model.memory_report())
                        last_live = time.perf_counter()
            result = model.stats_dict(stats)
            self._metrics.job_finished(id(job), result, job.outcome if cancelled else Outcome.DONE)
            self._metrics.set_memory(model.memory_report())
            if cancelled:  # usually nobody listens any more; at shutdown the request gets an error
                return _Failed(WorkerUnavailable(WorkerState.STOPPED, None))
            return Finished(stats.finish_reason, stats.prompt_tokens, stats.generated_tokens,
                            stats.cached_prompt_tokens, result)
        except Exception as e:
            log.warning("generation failed: %s", e)
            self._metrics.job_failed(id(job))
            return _Failed(e)

    def _run_batched(self, model: Model) -> None:
        """Continuous batching: admit queued jobs up to ``max_batch`` between decode steps (waiting
        for one only when none runs), step every running job once, deliver each its events."""
        import torch

        from flashtier.runtime.engine import BatchSession

        seqs: dict[int, object] = {}
        with BatchSession(model, self._max_batch) as session:
            if model.engine_config.threads is not None:  # --threads, as Model.stream and generate_batch apply it
                torch.set_num_threads(model.engine_config.threads)
            stopping = False
            while not stopping or self._batch:
                self._drop_cancelled(session, seqs)  # first, so that their slots go to waiting jobs now
                joining = self._joining
                while self._kv_waiting and len(self._batch) + len(joining) < self._max_batch:
                    job = self._kv_waiting.popleft()  # first: they arrived before the queue
                    if job.cancelled.is_set():  # it was started (its admission was tried): it ends here
                        self._metrics.job_finished(id(job), {}, job.outcome)
                    else:
                        joining.append(job)
                while not stopping and not self._kv_waiting and len(self._batch) + len(joining) < self._max_batch:
                    try:
                        job = self._jobs.get(block=not self._batch and not joining)
                    except queue.Empty:
                        break
                    if job is None:
                        stopping = True
                        break
                    if job.cancelled.is_set():
                        self._metrics.job_skipped(job.outcome)
                        continue
                    joining.append(job)
                if joining:
                    try:
                        self._admit(session, joining, seqs)
                    finally:
                        joining.clear()
                self._drop_cancelled(session, seqs)
                if not self._batch:
                    continue
                self.peak_batch = max(self.peak_batch, len(self._batch))
                try:
                    stepped = session.step()
                except Exception as e:  # a fault in the step fails every job in it, the server goes on
                    log.warning("batched generation failed: %s", e)
                    for job in self._batch:
                        self._metrics.job_failed(id(job))
                        _deliver_quietly(job, _Failed(e))
                        session.drop(seqs.pop(id(job)))  # type: ignore[arg-type]
                    self._batch.clear()
                    continue
                by_seq = {id(seq): events for seq, events in stepped}
                for job in list(self._batch):
                    seq = seqs[id(job)]
                    for event in by_seq.get(id(seq), []):
                        self._emit(job, event)
                    self._metrics.job_progress(id(job), seq.stats.generated_tokens)  # type: ignore[attr-defined]
                    if seq.finished:  # type: ignore[attr-defined]
                        batch_size = len(self._batch)
                        seqs.pop(id(job))
                        self._batch.remove(job)
                        self._finish(model, job, seq, batch_size)

    def _drop_cancelled(self, session: object, seqs: dict[int, object]) -> None:
        """Take the batch's cancelled (client gone, timed out, shutdown) jobs out of the session,
        which frees their KV; at shutdown their consumers get :class:`WorkerUnavailable`."""
        for job in [j for j in self._batch if j.cancelled.is_set()]:
            session.drop(seqs.pop(id(job)))  # type: ignore[attr-defined]
            self._batch.remove(job)
            self._metrics.job_finished(id(job), {}, job.outcome)
            if self._stopping.is_set():
                _deliver_quietly(job, _Failed(WorkerUnavailable(WorkerState.STOPPED, None)))

    def _emit(self, job: _Job, event: TokenEvent) -> None:
        """Deliver ``event`` to ``job``'s consumer; time it when it carries a token."""
        if event.token_id is not None:
            now = time.perf_counter()
            if job.last_token_at is None:
                self._metrics.first_token(now - job.accepted_at)
            else:
                self._metrics.next_token(now - job.last_token_at)
            job.last_token_at = now
        job.deliver(event)

    def _admit(self, session: object, jobs: list[_Job], seqs: dict[int, object]) -> None:
        """Admit the joining jobs (their prompts are prefilled a chunk per step, interleaved with the
        running jobs' decode steps; their first events come from the step that completes them);
        each job leaves ``jobs`` for the batch, or before its last item is delivered (failed, or
        already done)."""
        for job in jobs:
            self._metrics.job_started(id(job))
        try:
            # interleaved: their prompts are prefilled a chunk per step, between the running ones' tokens
            admitted = session.admit_many([(list(j.request.prompt_ids), j.request.max_new_tokens,  # type: ignore[attr-defined]
                                            j.request.sampling, j.request.stop, j.request.ignore_eos) for j in jobs],
                                          interleave=True)
        except Exception as e:  # a fault in the prefill pass fails the joining jobs, the server goes on
            log.warning("generation failed: %s", e)
            failed = list(jobs)
            jobs.clear()
            for job in failed:
                self._metrics.job_failed(id(job))
                _deliver_quietly(job, _Failed(e))
            return
        waiting = []
        for job, result in zip(list(jobs), admitted):
            if isinstance(result, KVBudgetFull) and self._batch:  # KV held by running jobs: it waits, in order
                jobs.remove(job)
                waiting.append(job)
                continue
            if isinstance(result, Exception):
                jobs.remove(job)
                self._metrics.job_failed(id(job))
                _deliver_quietly(job, _Failed(result))
                continue
            seq, events = result
            if not seq.finished:
                seqs[id(job)] = seq
                self._batch.append(job)
            jobs.remove(job)
            for event in events:
                self._emit(job, event)
            if seq.finished:
                self._finish(session.model, job, seq, len(self._batch) + 1)  # type: ignore[attr-defined]
        self._kv_waiting.extendleft(reversed(waiting))

    def _finish(self, model: Model, job: _Job, seq: object, batch_size: int) -> None:
        """Deliver the :class:`Finished` of a job that has left the batch (``batch_size``: the
        batch it decoded its last token in)."""
        stats = seq.stats  # type: ignore[attr-defined]
        result = model.stats_dict(stats)
        result["batch_size"] = batch_size
        self._metrics.job_finished(id(job), result, Outcome.DONE)
        self._metrics.set_memory(model.memory_report())  # as the one-at-a-time path does after each request
        job.deliver(Finished(stats.finish_reason, stats.prompt_tokens, stats.generated_tokens,
                             stats.cached_prompt_tokens, result))


async def _next_before(inbox: asyncio.Queue[JobItem], deadline: float | None) -> JobItem:
    """The next item of ``inbox``; TimeoutError once the event loop's clock reaches ``deadline``
    (checked first, so items already waiting do not outlive it)."""
    if deadline is None:
        return await inbox.get()
    if asyncio.get_running_loop().time() >= deadline:
        raise TimeoutError
    async with asyncio.timeout_at(deadline):
        return await inbox.get()


def _deliver_quietly(job: _Job, item: JobItem) -> None:
    """Deliver ``item`` unless the consumer's event loop is gone (server shutdown)."""
    with contextlib.suppress(RuntimeError):
        job.deliver(item)
