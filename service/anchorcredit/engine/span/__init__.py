"""Span statistics (SPEC.md: per-head span, WAAD, FAI) and the one front that picks a backend.

The room holds every way we compute them, side by side:
  reference.py      materialised attention, the oracle (float64 capable)
  chunked.py        blocks of query rows, O(N * block) memory: the CPU path
  triton_kernel.py  fused GPU kernel: plans and runs a call (its docstring states contract,
                    limits, hardware); its kernels are kernel_row.py, kernel_col.py,
                    kernel_lse.py (the one-pass path given the row LSE) with the helpers
                    of tiles.py; defaults.py picks tiles per device, plan.py holds the
                    block tables and launches
  fallback.py       a Triton failure answered by the chunked backend, counted
  checks.py         argument checks every backend shares
Their tests are tests/engine/span/. The dev tools beside the other benchmarks:
bench/span_benchmark.py (every backend, one table per device) and bench/span_aot.py (the
kernels compiled for sm_80/86/89/90 as a launch compiles them: registers, spills, shared
memory and SASS loops, no GPU needed).

span_stats()         one sequence
span_stats_packed()  a packed batch (the runner's entry point): sequences end to end

Model-true attention. Every backend takes three optional per-layer keywords, so that the
statistics read the probabilities the layer really computes (as transformers' eager
attention does; reference.attention_matrix is the definition):
  softcap=c           logit soft-capping, scores = c * tanh(scale * q.k / c) (Gemma 2)
  sinks=[Hq] tensor   a learned per-head logit in the softmax denominator that attends to
                      nothing: rows sum to less than 1 (gpt-oss)
  sliding_window=w    token t attends to s in (t - w, t] only (Gemma 2/3, gpt-oss, Mistral)
SPEC.md's formulas are then applied literally to that A: the sink's share adds no distance
(span, WAAD) and no FAI; keys outside the window have A = 0 (mass the layer never sees is
not counted as W in WAAD, and such rows still count in FAI's |T(s)|).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from collections.abc import Sequence

import torch

from anchorcredit.contract import DEFAULTS
from anchorcredit.engine.span import fallback
from anchorcredit.engine.span.checks import (
    check_attention_variant,
    check_horizon,
    check_qk,
    check_scale,
)
from anchorcredit.engine.span.chunked import span_stats_chunked
from anchorcredit.engine.span.reference import span_stats_reference
from anchorcredit.engine.types import PackedStats, SpanStats

BACKENDS = ("reference", "chunked", "triton", "auto")
# The kernel's largest head dim (triton_kernel.MAX_HEAD_DIM, kept here so that choosing a
# backend never imports triton).
TRITON_MAX_HEAD_DIM = 256

__all__ = [
    "BACKENDS",
    "TRITON_MAX_HEAD_DIM",
    "resolve_backend",
    "span_stats",
    "span_stats_packed",
]


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
        importlib.import_module("anchorcredit.engine.span.triton_kernel")
    except Exception:  # ImportError, or triton failing to initialise
        return False
    return True


def span_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    prompt_len: int,
    window: int = DEFAULTS.window,
    h_lo: int = DEFAULTS.h_lo,
    h_hi: int | None = DEFAULTS.h_hi,
    scale: float | None = None,
    backend: str = "auto",
    *,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> SpanStats:
    """Per-head span [Hq], WAAD [Hq, R] and FAI [Hq, R] of one sequence (SPEC.md).

    q: [Hq, N, d], k: [Hkv, N, d] post-RoPE (Hq a multiple of Hkv). h_hi=None runs the FAI
    horizon to the end of the response. scale defaults to 1/sqrt(d). softcap, sinks and
    sliding_window describe the layer's attention (module docstring); None = plain causal.
    """
    check_qk(q, k, prompt_len)
    window, h_lo, h_hi = check_horizon(window, h_lo, h_hi)
    scale = check_scale(scale, q.shape[-1])
    softcap, sinks, sliding_window = check_attention_variant(softcap, sinks, sliding_window, q)
    if sliding_window is not None and sliding_window >= q.shape[1]:
        sliding_window = None  # the window holds the whole sequence: plain causal
    backend = resolve_backend(backend, q.device, q.shape[-1])
    args = (q, k, prompt_len, window, h_lo, h_hi, scale)
    variant = {"softcap": softcap, "sinks": sinks, "sliding_window": sliding_window}
    if backend == "reference":
        return span_stats_reference(*args, **variant)
    if backend == "chunked":
        return span_stats_chunked(*args, **variant)
    from anchorcredit.engine.span.triton_kernel import span_stats_triton

    return span_stats_triton(*args, **variant)


def span_stats_packed(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens: Sequence[int],
    prompt_lens: Sequence[int],
    window: int,
    h_lo: int,
    h_hi: int | None,
    scale: float,
    backend: str,
    *,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    sliding_window: int | None = None,
    lse: torch.Tensor | None = None,
) -> PackedStats:
    """Statistics of every sequence of a packed batch (PackedStats: indexing it gives each
    sequence's SpanStats): q [Hq, T, d], k [Hkv, T, d] with the sequences end to end
    (cu_seqlens [B+1], prompt_lens [B]); `backend` already resolved. softcap / sinks /
    sliding_window: the layer's attention (module docstring), checked here. lse [Hq, T]:
    the layer's own row log-sum-exp (natural log) where the forward computed it; the triton
    backend then scores h_hi=None in one pass (triton_kernel.plan_packed), the others
    ignore it.

    The runner's hot path: shapes and horizons were checked when the request was parsed, so
    this skips span_stats()' per-call checks (an isfinite pass over q and k costs ~25% of the
    statistics on the CPU, and on a GPU each value check is a host sync per layer; the
    triton path makes none). A non-finite q/k or sink still fails loudly: it makes a head's
    span non-finite, which the credit stage rejects once per batch after the forward.

    A Triton failure (compile or launch) never fails the call: it is answered by the
    chunked backend, with one warning per kind of call and a count (fallback.py).
    """
    softcap, sinks, sliding_window = check_attention_variant(
        softcap, sinks, sliding_window, q, check_finite=False
    )
    variant = {"softcap": softcap, "sinks": sinks}
    if backend == "triton":
        kind = (str(q.device), q.dtype, q.shape[-1], softcap is not None, sinks is not None,
                sliding_window is not None, h_hi is None, lse is not None)  # fmt: skip
        if not fallback.known_failure(kind):
            try:
                return _triton_packed(q, k, cu_seqlens, prompt_lens, window, h_lo, h_hi,
                                      scale, sliding_window, lse, variant)  # fmt: skip
            except torch.OutOfMemoryError:
                raise  # the scorer halves the batch and retries
            except Exception as err:  # noqa: BLE001 - any compile/launch failure
                fallback.record(kind, err)
        else:
            fallback.record(kind)
        backend = "chunked"
    if backend not in ("chunked", "reference"):
        raise ValueError(f"span_stats_packed needs a resolved backend, got {backend!r}")
    fn = span_stats_chunked if backend == "chunked" else span_stats_reference
    out = []
    for a, b, p in zip(cu_seqlens[:-1], cu_seqlens[1:], prompt_lens, strict=True):
        # A window holding the whole sequence is plain causal attention.
        slide = None if sliding_window is None or sliding_window >= b - a else sliding_window
        out.append(
            fn(q[:, a:b], k[:, a:b], p, window, h_lo, h_hi, scale, sliding_window=slide, **variant)
        )
    return PackedStats.of_sequences(out)


def _triton_packed(
    q, k, cu_seqlens, prompt_lens, window, h_lo, h_hi, scale, sliding_window, lse, variant
) -> PackedStats:
    from anchorcredit.engine.span import triton_kernel

    # No value scans here (check_finite=False): each is a device sync per layer.
    return triton_kernel.span_stats_packed(
        q, k, cu_seqlens, list(prompt_lens), window, h_lo, h_hi, scale,
        sliding_window=sliding_window, check_finite=False, lse=lse, **variant,
    )  # fmt: skip
