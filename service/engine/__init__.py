"""Spec-level math, no model: span statistics, head-class aggregation, credit.

span_stats() is the one front that picks a backend:
  reference  materialised attention, the oracle (float64 capable)
  chunked    blocks of query rows, O(N * block) memory: the CPU path
  triton     fused GPU kernel (anchorcredit.engine.triton_span)
  auto       triton on CUDA, chunked otherwise
"""

from __future__ import annotations

import functools
import importlib
import importlib.util

import torch
from anchorcredit.engine.aggregate import aggregate, classify_heads
from anchorcredit.engine.chunked import span_stats_chunked
from anchorcredit.engine.credit import STRATEGIES, credit, top_q_mask, waad_delta
from anchorcredit.engine.reference import span_stats_reference
from anchorcredit.engine.types import Aggregate, SpanStats
from anchorcredit.engine.validate import check_horizon, check_qk, check_scale

BACKENDS = ("reference", "chunked", "triton", "auto")

__all__ = [
    "TRITON_MAX_HEAD_DIM",
    "BACKENDS",
    "STRATEGIES",
    "Aggregate",
    "SpanStats",
    "aggregate",
    "classify_heads",
    "credit",
    "resolve_backend",
    "span_stats",
    "top_q_mask",
    "waad_delta",
]


# The kernel's largest head dim (anchorcredit.engine.triton_span.MAX_HEAD_DIM, kept here so
# that choosing a backend never imports triton).
TRITON_MAX_HEAD_DIM = 256


def resolve_backend(backend: str, device: torch.device, head_dim: int = 128) -> str:
    """The backend `backend` means on `device`: "auto" is triton where it can run, else chunked."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        # Triton only where it compiles to a GPU and the head fits; a CUDA box without a
        # working triton still works. The import is tried on CUDA only, so choosing a backend
        # on the CPU never imports triton.
        usable = device.type == "cuda" and head_dim <= TRITON_MAX_HEAD_DIM and _triton_imports()
        return "triton" if usable else "chunked"
    return backend


@functools.lru_cache(maxsize=1)
def _triton_imports() -> bool:
    """True when the span kernel's module imports (triton present and initialising)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        importlib.import_module("anchorcredit.engine.triton_span")
    except Exception:  # ImportError, or triton failing to initialise
        return False
    return True


def span_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    prompt_len: int,
    window: int = 10,
    h_lo: int = 10,
    h_hi: int | None = 100,
    scale: float | None = None,
    backend: str = "auto",
) -> SpanStats:
    """Per-head span [Hq], WAAD [Hq, R] and FAI [Hq, R] of one sequence (SPEC.md).

    q: [Hq, N, d], k: [Hkv, N, d] post-RoPE (Hq a multiple of Hkv). h_hi=None runs the FAI
    horizon to the end of the response. scale defaults to 1/sqrt(d).
    """
    check_qk(q, k, prompt_len)
    check_horizon(window, h_lo, h_hi)
    scale = check_scale(scale, q.shape[-1])
    backend = resolve_backend(backend, q.device, q.shape[-1])
    args = (q, k, prompt_len, int(window), int(h_lo), None if h_hi is None else int(h_hi), scale)
    if backend == "reference":
        return span_stats_reference(*args)
    if backend == "chunked":
        return span_stats_chunked(*args)
    from anchorcredit.engine.triton_span import span_stats_triton

    return span_stats_triton(*args)
