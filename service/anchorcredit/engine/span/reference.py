"""The oracle: SPEC.md's statistics computed literally from the materialised attention.

O(Hq * N^2) memory. Every fast path (chunked, triton) is tested against this. Use float64
inputs for the tightest checks; it computes in the input dtype (at least float32).
"""

from __future__ import annotations

import torch

from anchorcredit.engine.types import SpanStats


def attention_matrix(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal row-stochastic softmax attention A [Hq, N, N]; GQA head h uses kv h // group."""
    hq, n, _ = q.shape
    group = hq // k.shape[0]
    kk = k.repeat_interleave(group, dim=0)
    scores = torch.einsum("hid,hjd->hij", q, kk) * scale
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    return torch.softmax(scores, dim=-1)


def stats_from_attention(
    attn: torch.Tensor, prompt_len: int, window: int, h_lo: int, h_hi: int | None
) -> SpanStats:
    """SPEC.md span, WAAD and FAI from a materialised A [H, N, N]."""
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
) -> SpanStats:
    dtype = q.dtype if q.dtype in (torch.float32, torch.float64) else torch.float32
    attn = attention_matrix(q.to(dtype), k.to(dtype), scale)
    return stats_from_attention(attn, prompt_len, window, h_lo, h_hi)
