"""Server counters and the latest engine figures, as JSON and as Prometheus text.

Written by the worker thread and the request handlers, read by ``/metrics`` and
``/v1/flashtier/stats``; one lock guards every field, so a reader sees a consistent snapshot.

Prometheus names: counters ``flashtier_requests_total``, ``..._failed_total``,
``..._cancelled_total``, ``flashtier_prompt_tokens_total``, ``flashtier_generated_tokens_total``;
gauges ``flashtier_last_request_<stat>`` for every numeric statistic of the last generation
(:meth:`Model.stats_dict`: tokens/s, and bytes read / hits / misses when the weight store reports
them), ``flashtier_tier_<field>{tier="..."}`` for every numeric field of each tier in
:meth:`Model.memory_report` (``resident_bytes``), ``flashtier_tier_hit_rate{tier="..."}`` from
the last generation's ``<tier>_hits`` / ``<tier>_misses``, and ``flashtier_kv_bytes``,
``flashtier_peak_rss_bytes``; histograms (``_bucket{le="..."}``, ``_sum``, ``_count``)
``flashtier_time_to_first_token_seconds`` (from the request's acceptance into the worker's queue,
after it passed every check and was tokenized, to its first token leaving the worker: queue wait +
prefill) and ``flashtier_inter_token_latency_seconds`` (between consecutive tokens of one request:
a request of n tokens adds n - 1 observations, cancelled and timed-out ones included).
"""

from __future__ import annotations

import bisect
import enum
import math
import re
import threading
import time
from collections import deque
from typing import Any

from flashtier.apps.reporting import hit_rates, is_number, tier_fields

_COUNTERS = {
    "requests_total": "Completion requests received.",
    "requests_failed_total": "Requests answered with an error, or whose generation failed.",
    "generations_failed_total": "Generations that raised in the engine (their requests are in requests_failed_total).",
    "requests_cancelled_total": "Generations stopped because their client went away.",
    "requests_refused_busy_total": "Requests refused with 503 because the queue was full (--max-queue).",
    "requests_timed_out_total": "Requests stopped by --request-timeout (also counted as failed).",
    "prompt_tokens_total": "Prompt tokens of finished generations (cached ones included).",
    "generated_tokens_total": "Tokens generated.",
}


TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
"""Upper bounds of the time-to-first-token buckets (queue wait included, so up to minutes)."""
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Upper bounds of the inter-token latency buckets (one decode step: ms on small models, s on big)."""
RECENT_WINDOW = 4096
"""Observations a :class:`Histogram` keeps for its p50 / p99 (the most recent ones)."""


class Outcome(enum.Enum):
    """How a generation that did not fail ended."""

    DONE = "done"
    CANCELLED = "cancelled"
    """Its client went away (or the server is shutting down)."""
    TIMED_OUT = "timed_out"
    """It ran past ``--request-timeout``."""


class Histogram:
    """A Prometheus histogram (cumulative buckets, sum, count) plus the most recent observations
    for exact p50 / p99 over a window. Not locked itself: :class:`ServerMetrics` guards it."""

    def __init__(self, bounds: tuple[float, ...], window: int = RECENT_WINDOW) -> None:
        if list(bounds) != sorted(set(bounds)) or not bounds or not all(math.isfinite(b) for b in bounds):
            raise ValueError(f"histogram bounds must be finite and strictly increasing, got {bounds}")
        self.bounds = bounds
        self._per_bucket = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0
        self.count = 0
        self._recent: deque[float] = deque(maxlen=window)

    def observe(self, value: float) -> None:
        """Count ``value`` (seconds) in the first bucket whose bound is >= it."""
        self._per_bucket[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1
        self._recent.append(value)

    def cumulative(self) -> list[tuple[str, int]]:
        """``[(le, observations <= le)]`` for every bound, then ``("+Inf", count)``."""
        out, running = [], 0
        for bound, n in zip((*map(repr, self.bounds), "+Inf"), self._per_bucket):
            running += n
            out.append((bound, running))
        return out

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile (nearest rank) of the recent window; None before any observation."""
        if not self._recent:
            return None
        ordered = sorted(self._recent)
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    def summary(self) -> dict[str, Any]:
        """JSON: ``count`` and ``sum`` (all time), ``p50`` / ``p99`` over the last ``window``."""
        p50, p99 = self.quantile(0.5), self.quantile(0.99)
        return {"count": self.count, "sum": round(self.sum, 6), "window": len(self._recent),
                "p50": None if p50 is None else round(p50, 6), "p99": None if p99 is None else round(p99, 6)}


_HISTOGRAMS = {
    "time_to_first_token_seconds": ("Seconds from a request's acceptance (queued for the model) to its first token.",
                                    TTFT_BUCKETS_S),
    "inter_token_latency_seconds": ("Seconds between consecutive tokens of one request.", ITL_BUCKETS_S),
}


class ServerMetrics:
    """Thread-safe counters, latency histograms, the last generation's statistics, the live one's
    progress."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._histograms = {name: Histogram(bounds) for name, (_, bounds) in _HISTOGRAMS.items()}
        self._last: dict[str, Any] = {}
        self._memory: dict[str, Any] = {}
        self._live: dict[int, tuple[float, int]] = {}  # running generation -> (start, tokens so far)

    # ---------------------------------------------------------------- updates
    def request_received(self) -> None:
        with self._lock:
            self._counts["requests_total"] += 1

    def request_refused_busy(self) -> None:
        """A request refused with 503 because the queue was full."""
        with self._lock:
            self._counts["requests_refused_busy_total"] += 1

    def request_failed(self) -> None:
        with self._lock:
            self._counts["requests_failed_total"] += 1

    def job_started(self, key: int) -> None:
        """A generation started (``key`` names it until it ends; several run at once when batched)."""
        with self._lock:
            self._live[key] = (time.perf_counter(), 0)

    def job_progress(self, key: int, generated_tokens: int) -> None:
        with self._lock:
            if key in self._live:
                self._live[key] = (self._live[key][0], generated_tokens)

    def first_token(self, seconds: float) -> None:
        """A request's first token left the worker ``seconds`` after the request was accepted."""
        with self._lock:
            self._histograms["time_to_first_token_seconds"].observe(seconds)

    def next_token(self, seconds: float) -> None:
        """A request's next token left the worker ``seconds`` after its previous one."""
        with self._lock:
            self._histograms["inter_token_latency_seconds"].observe(seconds)

    def job_finished(self, key: int, stats: dict[str, Any], outcome: Outcome) -> None:
        """A generation ended (``stats``: :meth:`Model.stats_dict`, possibly empty)."""
        with self._lock:
            self._live.pop(key, None)
            self._last = dict(stats)
            self._counts["prompt_tokens_total"] += int(stats.get("prompt_tokens", 0))
            self._counts["generated_tokens_total"] += int(stats.get("generated_tokens", 0))
            self._count_outcome(outcome)

    def job_skipped(self, outcome: Outcome) -> None:
        """A job that ended before its turn: its client went away, or it timed out while queued."""
        with self._lock:
            self._count_outcome(outcome)

    def _count_outcome(self, outcome: Outcome) -> None:
        if outcome is Outcome.CANCELLED:
            self._counts["requests_cancelled_total"] += 1
        elif outcome is Outcome.TIMED_OUT:
            self._counts["requests_timed_out_total"] += 1

    def job_failed(self, key: int) -> None:
        """A generation raised; its request is counted failed where it is answered (the route)."""
        with self._lock:
            self._counts["generations_failed_total"] += 1
            self._live.pop(key, None)

    def set_memory(self, report: dict[str, Any]) -> None:
        with self._lock:
            self._memory = report

    # ---------------------------------------------------------------- reads
    def snapshot(self) -> dict[str, Any]:
        """JSON of everything: counters, ``latency`` (per histogram: count, sum, p50 / p99 of the
        recent window, in seconds), ``last`` statistics, ``memory`` report, ``live`` progress."""
        with self._lock:
            live = None
            if self._live:  # every running generation: how many, their tokens, their summed speed
                now = time.perf_counter()
                live = {"running": len(self._live), "generated_tokens": sum(t for _, t in self._live.values()),
                        "tok_s": round(sum(t / (now - s) for s, t in self._live.values() if now > s), 3)}
            latency = {name.removesuffix("_seconds"): h.summary() for name, h in self._histograms.items()}
            return {"counters": dict(self._counts), "latency": latency, "last": dict(self._last), "memory": self._memory,
                    "tiers": tier_fields(self._memory), "hit_rates": hit_rates(self._last), "live": live}

    def prometheus(self, gauges: dict[str, tuple[float, str]]) -> str:
        """Prometheus text exposition (format 0.0.4); ``gauges`` adds server-level ``name: (value, help)``."""
        snap = self.snapshot()
        with self._lock:
            buckets = {name: (h.cumulative(), h.sum, h.count) for name, h in self._histograms.items()}
        lines: list[str] = []
        for name, help_text in _COUNTERS.items():
            _metric(lines, f"flashtier_{name}", "counter", help_text, [("", snap["counters"][name])])
        for name, (value, help_text) in gauges.items():
            _metric(lines, f"flashtier_{name}", "gauge", help_text, [("", value)])
        for name, (cumulative, total, count) in buckets.items():
            metric = f"flashtier_{name}"
            lines.append(f"# HELP {metric} {_HISTOGRAMS[name][0]}")
            lines.append(f"# TYPE {metric} histogram")
            lines.extend(f'{metric}_bucket{{le="{le}"}} {n}' for le, n in cumulative)
            lines.append(f"{metric}_sum {float(total)!r}")
            lines.append(f"{metric}_count {count}")
        for key, value in sorted(snap["last"].items()):
            if is_number(value):
                _metric(lines, f"flashtier_last_request_{_name(key)}", "gauge",
                        f"{key} of the last generation.", [("", value)])
        memory = snap["memory"]
        by_field: dict[str, list[tuple[str, float]]] = {}
        for tier, fields in sorted(tier_fields(memory).items()):
            for key, value in sorted(fields.items()):
                by_field.setdefault(_name(key), []).append((f'{{tier="{_label(tier)}"}}', value))
        for tier, rate in sorted(snap["hit_rates"].items()):
            by_field.setdefault("hit_rate", []).append((f'{{tier="{_label(tier)}"}}', rate))
        for key, samples in by_field.items():
            _metric(lines, f"flashtier_tier_{key}", "gauge", f"{key} per memory tier (hit rate: last generation).",
                    samples)
        store: dict[str, list[tuple[str, Any]]] = {}
        for tier, arenas in sorted((memory.get("store") or {}).items()):
            for arena, row in sorted(arenas.items()):
                if arena != "total":
                    for key in ("used_bytes", "capacity_bytes"):
                        store.setdefault(key, []).append((f'{{tier="{_label(tier)}",arena="{_label(arena)}"}}', row[key]))
        for key, samples in store.items():
            _metric(lines, f"flashtier_store_{key}", "gauge",
                    f"{key} of each arena of the tiered store (streamed weights, expert caches, windows, KV).", samples)
        for key in ("kv_bytes", "peak_rss_bytes"):
            if is_number(memory.get(key)):
                _metric(lines, f"flashtier_{key}", "gauge", f"{key} of the memory report.", [("", memory[key])])
        return "\n".join(lines) + "\n"


def _metric(lines: list[str], name: str, kind: str, help_text: str, samples: list[tuple[str, Any]]) -> None:
    lines.append(f"# HELP {name} {help_text}")
    lines.append(f"# TYPE {name} {kind}")
    lines.extend(f"{name}{labels} {value!r}" if isinstance(value, float) else f"{name}{labels} {int(value)}"
                 for labels, value in samples)


def _name(key: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", str(key)).strip("_").lower() or "value"


def _label(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
