"""Prometheus cache hit/miss counters, when prometheus_client is importable (optional)."""

from __future__ import annotations

from typing import Any

_metrics: tuple[Any, Any] | None | bool = None


def count_cache(hits: int, misses: int) -> None:
    """Add one call's hits and misses to anchorcredit_cache_{hits,misses}_total."""
    counters = _cache_counters()
    if counters is not None:
        counters[0].inc(hits)
        counters[1].inc(misses)


def _cache_counters() -> tuple[Any, Any] | None:
    """The two counters, created once; None without prometheus_client."""
    global _metrics
    if _metrics is None:
        try:
            from prometheus_client import Counter

            _metrics = (
                Counter("anchorcredit_cache_hits_total", "Credit results served from the cache"),
                Counter("anchorcredit_cache_misses_total", "Credit results not in the cache"),
            )
        except Exception:  # not installed, or already registered by another import path
            _metrics = False
    return _metrics or None
