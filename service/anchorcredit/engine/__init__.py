"""Spec-level math, no model: span statistics, head-class aggregation, credit.

span/         per-head span, WAAD and FAI: the backends (reference, chunked, triton) and
              the front that picks one (span_stats, span_stats_packed)
aggregate.py  head classes and the local/global means (SPEC.md "Head classes")
credit.py     gamma_t per strategy (SPEC.md "Credit")
types.py      SpanStats (one sequence), PackedStats (a packed batch), Aggregate
"""

from __future__ import annotations

from anchorcredit.engine.aggregate import aggregate, classify_heads
from anchorcredit.engine.credit import STRATEGIES, credit, top_q_mask, waad_delta
from anchorcredit.engine.span import (
    BACKENDS,
    TRITON_MAX_HEAD_DIM,
    resolve_backend,
    span_stats,
    span_stats_packed,
)
from anchorcredit.engine.types import Aggregate, PackedStats, SpanStats

__all__ = [
    "BACKENDS",
    "STRATEGIES",
    "TRITON_MAX_HEAD_DIM",
    "Aggregate",
    "PackedStats",
    "SpanStats",
    "aggregate",
    "classify_heads",
    "credit",
    "resolve_backend",
    "span_stats",
    "span_stats_packed",
    "top_q_mask",
    "waad_delta",
]
