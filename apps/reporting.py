"""Reading the engine's limits and reports the same way in every app (chat, server, web page).

:func:`context_limit` is the most tokens one request may hold.

:meth:`Model.memory_report` gives ``{"tiers": ..., "kv_bytes", "peak_rss_bytes"}`` where a tier is
either a number of resident bytes (the paged weight store) or a dict of numeric fields (the
in-memory weights: ``{"resident_bytes": n}``). :meth:`Model.stats_dict` may carry per-tier
counters named ``<tier>_hits`` / ``<tier>_misses``. These helpers normalise both.
"""

from __future__ import annotations

from typing import Any

from flashtier.runtime import Model


def context_limit(model: Model) -> int:
    """Tokens (prompt + generated) one request may hold: the model's context, or the engine's
    ``max_context`` (``--max-context``) when that is smaller."""
    limit = model.config.max_position_embeddings
    configured = model.engine_config.max_context
    return min(limit, configured) if configured else limit


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def tier_fields(report: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{tier: {field: number}}`` from a memory report; a bare number is ``resident_bytes``."""
    out: dict[str, dict[str, float]] = {}
    for tier, fields in (report.get("tiers") or {}).items():
        if is_number(fields):
            out[str(tier)] = {"resident_bytes": fields}
        elif isinstance(fields, dict):
            out[str(tier)] = {str(k): v for k, v in fields.items() if is_number(v)}
    return out


def hit_rates(stats: dict[str, Any]) -> dict[str, float]:
    """``{tier: hits / (hits + misses)}`` for every ``<tier>_hits`` / ``<tier>_misses`` pair with traffic."""
    rates = {}
    for key, hits in stats.items():
        if key.endswith("_hits") and is_number(hits):
            tier = key.removesuffix("_hits")
            misses = stats.get(f"{tier}_misses")
            if is_number(misses) and hits + misses > 0:
                rates[tier] = hits / (hits + misses)
    return rates


def format_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB`` (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
