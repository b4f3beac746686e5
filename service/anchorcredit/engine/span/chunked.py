"""CPU path: exact SPEC.md statistics in blocks of query rows, O(Hq * N * block) memory.

Each block of response rows gets its full softmax rows once (the unclipped span needs whole
rows). From those rows only the band is read for the rest: WAAD = W - sum_{d<W} (W-d) p[t,t-d]
(mass further than W back, prompt included, counts as W), and FAI takes the column sums of
p over h_lo <= t-s <= h_hi. Probabilities are never normalised in place: each row's 1/l
scales the few numbers read from it, which saves a full pass over the block.

Model-true attention (see reference.attention_matrix): soft-capping transforms the scores
before the softmax; a sink adds exp(sink - m) to each row's denominator l, so rows sum to
l_keys / l < 1 and WAAD = W * l_keys / l - sum_{d<W} (W-d) p / l; a sliding window masks
keys with t - s >= window (they are still computed, then zeroed: the block memory bound is
unchanged, the time is not reduced).
"""

from __future__ import annotations

import torch

from anchorcredit.engine.types import SpanStats

# Scores of one block hold at most this many elements (64 MiB in float32).
DEFAULT_BLOCK_ELEMENTS = 1 << 24


def fai_target_counts(n: int, prompt_len: int, h_lo: int, h_hi: int | None) -> torch.Tensor:
    """|T(s)| for every response position s (SPEC.md FAI), as int64 [R]."""
    s = torch.arange(prompt_len, n)
    last = torch.full_like(s, n - 1) if h_hi is None else (s + h_hi).clamp(max=n - 1)
    return (last - (s + h_lo) + 1).clamp(min=0)


def span_stats_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    prompt_len: int,
    window: int,
    h_lo: int,
    h_hi: int | None,
    scale: float,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    *,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> SpanStats:
    hq, n, d = q.shape
    hkv = k.shape[0]
    group = hq // hkv
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device
    qs = q.to(dtype) * scale  # scale folded into q once
    kt = k.to(dtype).transpose(1, 2)  # [Hkv, d, N]
    r = n - prompt_len
    pos = torch.arange(n, device=dev, dtype=dtype)
    ipos = torch.arange(n, device=dev)
    band = torch.arange(window, device=dev)  # distances 0..W-1 that WAAD reads exactly
    band_weight = (window - band).to(dtype)

    span_sum = torch.zeros(hq, dtype=dtype, device=dev)
    waad = torch.empty(hq, r, dtype=dtype, device=dev)
    fai_num = torch.zeros(hq, r, dtype=dtype, device=dev)
    rows_per_block = max(1, min(r, block_elements // max(1, hq * n)))
    variant = (softcap, None if sinks is None else sinks.to(dtype)[:, None], sliding_window)

    for t0 in range(prompt_len, n, rows_per_block):
        t1 = min(n, t0 + rows_per_block)
        # A function per block, so one block's scores are freed before the next is allocated.
        span_part, waad_rows, c0, col_sums = _block_stats(
            qs, kt, t0, t1, group, window, h_lo, h_hi, prompt_len, pos, ipos, band, band_weight,
            variant,
        )  # fmt: skip
        span_sum += span_part
        waad[:, t0 - prompt_len : t1 - prompt_len] = waad_rows
        if col_sums is not None:
            fai_num[:, c0 - prompt_len : c0 - prompt_len + col_sums.shape[1]] += col_sums

    counts = fai_target_counts(n, prompt_len, h_lo, h_hi).to(device=dev, dtype=dtype)
    fai = torch.where(counts > 0, fai_num / counts.clamp(min=1), torch.zeros_like(fai_num))
    return SpanStats(span=span_sum / r, waad=waad, fai=fai)


def _block_stats(
    qs: torch.Tensor,
    kt: torch.Tensor,
    t0: int,
    t1: int,
    group: int,
    window: int,
    h_lo: int,
    h_hi: int | None,
    prompt_len: int,
    pos: torch.Tensor,
    ipos: torch.Tensor,
    band: torch.Tensor,
    band_weight: torch.Tensor,
    variant: tuple[float | None, torch.Tensor | None, int | None] = (None, None, None),
) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None]:
    """Span sum, WAAD rows and FAI column sums contributed by response rows [t0, t1)."""
    hkv, d, _ = kt.shape
    hq, b = hkv * group, t1 - t0
    # GQA without copying K: the `group` query heads of one kv head share one bmm.
    qb = qs[:, t0:t1].reshape(hkv, group * b, d)
    softcap, sinks, sliding_window = variant  # sinks: [Hq, 1] in the compute dtype
    scores = torch.bmm(qb, kt[:, :, :t1]).view(hq, b, t1)
    if softcap is not None:
        scores = scores.div_(softcap).tanh_().mul_(softcap)
    rows = ipos[t0:t1]
    hidden = ipos[None, :t1] > rows[:, None]
    if sliding_window is not None:
        hidden |= ipos[None, :t1] <= rows[:, None] - sliding_window
    scores.masked_fill_(hidden, float("-inf"))
    m = scores.amax(-1)  # [Hq, b], finite: key t is always visible from row t
    if sinks is not None:
        m = torch.maximum(m, sinks)
    p = scores.sub_(m[:, :, None]).exp_()  # unnormalised probabilities
    l_keys = p.sum(-1)
    if sinks is None:
        inv_l, key_share = l_keys.reciprocal_(), 1.0  # [Hq, b]
    else:  # the sink joins the denominator and attends to nothing
        inv_l = (l_keys + (sinks - m).exp()).reciprocal_()
        key_share = l_keys * inv_l

    # Unclipped span: sum_s A (t - s) = (t * l_keys - sum_s p s) / l.
    span_part = (pos[t0:t1] * key_share - torch.matmul(p, pos[:t1]) * inv_l).sum(-1)

    # WAAD from the band: W - sum_{d<W} (W-d) p[t, t-d] (columns before 0 do not exist).
    near_cols = rows[:, None] - band[None, :]  # [b, W]
    near = p.gather(-1, near_cols.clamp(min=0).expand(hq, b, window))
    waad_rows = window * key_share - (near * (band_weight * (near_cols >= 0))).sum(-1) * inv_l

    # FAI partial column sums over the band h_lo <= t - s <= h_hi, s in the response.
    c0 = prompt_len if h_hi is None else max(prompt_len, t0 - h_hi)
    c1 = t1 - h_lo  # exclusive
    if c1 <= c0:
        return span_part, waad_rows, c0, None
    if h_hi is not None and h_hi - h_lo + 1 < (c1 - c0) // 2:
        return span_part, waad_rows, c0, _band_column_sums(p, inv_l, rows, c0, c1, h_lo, h_hi)
    # Wide band (h_hi=None): mask the dense column slice. Comparisons go straight to bool.
    cols = ipos[None, c0:c1]
    in_band = cols <= rows[:, None] - h_lo
    if h_hi is not None:
        in_band &= cols >= rows[:, None] - h_hi
    # p is not read again: mask and normalise the band in place and reduce the strided view
    # directly (a bmm would first copy it into a contiguous block-sized buffer).
    band_p = p[:, :, c0:c1].mul_(in_band).mul_(inv_l[:, :, None])
    return span_part, waad_rows, c0, band_p.sum(1)


def _band_column_sums(
    p: torch.Tensor, inv_l: torch.Tensor, rows: torch.Tensor, c0: int, c1: int, h_lo: int, h_hi: int
) -> torch.Tensor:
    """Column sums of the normalised p over h_lo <= t - s <= h_hi for columns [c0, c1).

    Narrow band: gather the (h_hi - h_lo + 1) diagonals, O(b * band) instead of O(b * N).
    """
    hq, b, _ = p.shape
    dist = torch.arange(h_lo, h_hi + 1, device=p.device)
    cols = rows[:, None] - dist[None, :]  # [b, D]
    valid = (cols >= c0) & (cols < c1)
    vals = p.gather(-1, cols.clamp(min=0).expand(hq, b, dist.numel()))
    vals = vals * (valid * inv_l[:, :, None])
    out = torch.zeros(hq, c1 - c0, dtype=p.dtype, device=p.device)
    index = (cols - c0).clamp(0, c1 - c0 - 1).reshape(1, -1).expand(hq, -1)
    return out.scatter_add_(1, index, vals.reshape(hq, -1))
