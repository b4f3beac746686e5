"""The oracle: SPEC.md's statistics computed literally from the materialised attention.

O(Hq * N^2) memory. Every fast path (chunked, triton) is tested against this. Use float64
inputs for the tightest checks; it computes in the input dtype (at least float32).
"""

from __future__ import annotations

import torch

from anchorcredit.engine.types import SpanStats


def attention_matrix(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    *,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """The layer's causal softmax attention A [Hq, N, N]; GQA head h uses kv h // group.

    Model-true variants, as transformers' eager attention computes them:
      softcap         scores = softcap * tanh(scores / softcap), after the scale (Gemma 2)
      sinks [Hq]      a per-head logit joins each row's softmax denominator and attends to
                      nothing, so a row sums to 1 - its sink share (gpt-oss)
      sliding_window  token t attends to s with 0 <= t - s < sliding_window (transformers'
                      `kv_idx > q_idx - sliding_window`; Mistral, Gemma 2/3, gpt-oss)
    """
    hq, n, _ = q.shape
    group = hq // k.shape[0]
    kk = k.repeat_interleave(group, dim=0)
    scores = torch.einsum("hid,hjd->hij", q, kk) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    pos = torch.arange(n, device=q.device)
    dist = pos[:, None] - pos[None, :]
    visible = dist >= 0
    if sliding_window is not None:
        visible &= dist < sliding_window
    scores = scores.masked_fill(~visible, float("-inf"))
    if sinks is None:
        return torch.softmax(scores, dim=-1)
    sink = sinks.to(scores.dtype)[:, None, None].expand(hq, n, 1)
    return torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :n]


def stats_from_attention(
    attn: torch.Tensor, prompt_len: int, window: int, h_lo: int, h_hi: int | None
) -> SpanStats:
    """SPEC.md span, WAAD and FAI from a materialised A [H, N, N], read literally: rows need
    not sum to 1 (a sink's share attends to nothing and adds no distance), and a key outside
    a sliding window has A = 0 (it still counts in |T(s)|)."""
    h, n, _ = attn.shape
    pos = torch.arange(n, device=attn.device)
    dist = (pos[:, None] - pos[None, :]).clamp(min=0).to(attn.dtype)  # t - s (0 above diag)
    rows = slice(prompt_len, n)

    span = (attn[:, rows] * dist[rows]).sum(-1).mean(-1)
    waad = (attn[:, rows] * dist[rows].clamp(max=window)).sum(-1)

    r = n - prompt_len
    fai = torch.zeros(h, r, dtype=attn.dtype, device=attn.device)
    for i, s in enumerate(range(prompt_len, n)):
        hi = n - 1 if h_hi is None else min(n - 1, s + h_hi)
        targets = [t for t in range(s + h_lo, hi + 1) if t >= prompt_len]
        if targets:  # empty T(s): FAI = 0 [ours]
            fai[:, i] = attn[:, targets, s].mean(-1)
    return SpanStats(span=span, waad=waad, fai=fai)


def span_stats_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    prompt_len: int,
    window: int,
    h_lo: int,
    h_hi: int | None,
    scale: float,
    *,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> SpanStats:
    dtype = q.dtype if q.dtype in (torch.float32, torch.float64) else torch.float32
    attn = attention_matrix(
        q.to(dtype), k.to(dtype), scale,
        softcap=softcap, sinks=sinks, sliding_window=sliding_window,
    )  # fmt: skip
    return stats_from_attention(attn, prompt_len, window, h_lo, h_hi)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|: the error relative to the statistic's own
    scale (FAI values are ~1e-2, spans ~1e3, so a shared floor such as max(1, |ref|) would
    make the bound absolute for one and loose for the other). All-zero expected: the
    absolute error. Computed in float64 on expected's device."""
    expected = expected.to(torch.float64)
    if expected.numel() == 0:
        return 0.0
    diff = float((actual.to(expected.device, torch.float64) - expected).abs().max())
    scale = float(expected.abs().max())
    return diff / scale if scale > 0 else diff


def max_relative_error(got: SpanStats, ref: SpanStats) -> float:
    """The largest relative_error over span, WAAD and FAI."""
    return max(relative_error(getattr(got, f), getattr(ref, f)) for f in ("span", "waad", "fai"))
