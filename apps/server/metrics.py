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
``flashtier_peak_rss_bytes``.
"""

from __future__ import annotations

import re
import threading
import time
from typing import Any

from flashtier.apps.reporting import hit_rates, is_number, tier_fields

_COUNTERS = {
    "requests_total": "Completion requests received.",
    "requests_failed_total": "Requests answered with an error, or whose generation failed.",
    "requests_cancelled_total": "Generations stopped because their client went away.",
    "requests_refused_busy_total": "Requests refused with 503 because the queue was full (--max-queue).",
    "prompt_tokens_total": "Prompt tokens of finished generations (cached ones included).",
    "generated_tokens_total": "Tokens generated.",
}


class ServerMetrics:
    """Thread-safe counters, the last generation's statistics, the live one's progress."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._last: dict[str, Any] = {}
        self._memory: dict[str, Any] = {}
        self._live_tokens = 0
        self._live_started: float | None = None

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

    def job_started(self) -> None:
        with self._lock:
            self._live_tokens, self._live_started = 0, time.perf_counter()

    def job_progress(self, generated_tokens: int) -> None:
        with self._lock:
            self._live_tokens = generated_tokens

    def job_finished(self, stats: dict[str, Any], *, cancelled: bool) -> None:
        with self._lock:
            self._last = dict(stats)
            self._counts["prompt_tokens_total"] += int(stats.get("prompt_tokens", 0))
            self._counts["generated_tokens_total"] += int(stats.get("generated_tokens", 0))
            self._counts["requests_cancelled_total"] += int(cancelled)
            self._live_started = None

    def job_skipped(self) -> None:
        """A job whose client went away before its turn."""
        with self._lock:
            self._counts["requests_cancelled_total"] += 1

    def job_failed(self) -> None:
        with self._lock:
            self._counts["requests_failed_total"] += 1
            self._live_started = None

    def set_memory(self, report: dict[str, Any]) -> None:
        with self._lock:
            self._memory = report

    # ---------------------------------------------------------------- reads
    def snapshot(self) -> dict[str, Any]:
        """JSON of everything: counters, ``last`` statistics, ``memory`` report, ``live`` progress."""
        with self._lock:
            live = None
            if self._live_started is not None:
                elapsed = time.perf_counter() - self._live_started
                live = {"generated_tokens": self._live_tokens,
                        "tok_s": round(self._live_tokens / elapsed, 3) if elapsed > 0 else 0.0}
            return {"counters": dict(self._counts), "last": dict(self._last), "memory": self._memory,
                    "tiers": tier_fields(self._memory), "hit_rates": hit_rates(self._last), "live": live}

    def prometheus(self, gauges: dict[str, tuple[float, str]]) -> str:
        """Prometheus text exposition (format 0.0.4); ``gauges`` adds server-level ``name: (value, help)``."""
        snap = self.snapshot()
        lines: list[str] = []
        for name, help_text in _COUNTERS.items():
            _metric(lines, f"flashtier_{name}", "counter", help_text, [("", snap["counters"][name])])
        for name, (value, help_text) in gauges.items():
            _metric(lines, f"flashtier_{name}", "gauge", help_text, [("", value)])
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
