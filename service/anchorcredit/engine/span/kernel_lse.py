"""The one-pass span kernel for a row LSE computed elsewhere (the model's own attention).

With every response row's log-sum-exp known, no pass needs an online max: probabilities are
exact from the first tile. `lse_pass` then walks the causal triangle ONCE, column-major, one
program per (key tile of the whole sequence, prompt included; query head), over the response
rows that see its columns:
  - FAI: column sums of p over h_lo <= t - s <= h_hi (or to the end), as the column pass;
  - span: the mean over response rows of sum_s p (t - s) equals the sum over every column s
    of sum_t p[t, s] (t - s), divided by |R|; per column it is accumulated in an offset form,
    sum_t p (t - j0) - (s - j0) sum_t p with j0 the tile's first column: both terms grow
    with t - j0, not with t, so nothing cancels at 32K (t * sum p - s * sum p would lose
    every digit of a local head's few-token span);
and `waad_pass` reads WAAD's W-token band per row block (about (BLOCK_M + W) / BLOCK_N key
tiles). Against the row pass + column pass this does the triangle's QK^T and exp2 once
instead of twice at h_hi = end (docs/KERNEL.md counts the FLOPs and bytes).

The LSE arrives as `lse * lse_scale` in base 2 of the scaled (soft-capped) scores: the
model's natural-log LSE with lse_scale = log2 e, the row pass's own with 1.
"""

from __future__ import annotations

from anchorcredit.engine.span.tiles import SUM, load_k_tile, load_q_tile, qk_scores, tl


def lse_pass(
    Q, K, LSE, SPAN_COL, FAI,
    BLK_SEQ, BLK_START, CU, RESP_START, OUT_SHIFT,
    stride_qh, stride_qn, stride_kh, stride_kn, stride_oh, stride_sh, stride_lh,
    qk_scale, lse_scale, group, head_dim, h_lo, h_hi, cap_in, cap_out, slide,
    HAS_HI: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_SLIDE: tl.constexpr,
):  # fmt: skip
    blk = tl.program_id(0)
    h = tl.program_id(1)
    seq = tl.load(BLK_SEQ + blk)
    j0 = tl.load(BLK_START + blk)
    seq_end = tl.load(CU + seq + 1)
    resp0 = tl.load(RESP_START + seq)  # the sequence's first response row
    kvh = h // group

    offs_n = j0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < seq_end
    d_ok = offs_d < head_dim
    k_base = K + kvh.to(tl.int64) * stride_kh
    kt = load_k_tile(k_base, offs_n, offs_d, d_ok[:, None] & col_ok[None, :], stride_kn, UPCAST)
    q_base = Q + h.to(tl.int64) * stride_qh
    lse_base = LSE + h.to(tl.int64) * stride_lh

    # Rows [t_lo, t_mid) need masks (causal and FAI's band edges, or the sliding window);
    # rows from t_mid on see every column of the tile, beyond any band edge.
    t_lo = tl.maximum(j0, resp0)
    t_hi = seq_end
    if HAS_HI:
        t_mid = tl.minimum(t_hi, j0 + BLOCK_N + h_hi)
    else:
        t_mid = tl.minimum(t_hi, j0 + BLOCK_N - 1 + h_lo)
    if HAS_SLIDE:  # rows at or past s + slide do not see column s: all of them masked
        t_hi = tl.minimum(t_hi, j0 + BLOCK_N - 1 + slide)
        t_mid = t_hi
    t_mid = tl.maximum(t_mid, t_lo)

    acc_f = tl.full([BLOCK_M, BLOCK_N], 0.0, dtype=tl.float32)  # FAI: p inside the band
    acc_d = tl.full([BLOCK_M, BLOCK_N], 0.0, dtype=tl.float32)  # span: p (t - s)
    for start_m in range(t_lo, t_mid, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < t_mid
        q = load_q_tile(q_base, offs_m, offs_d, row_ok[:, None] & d_ok[None, :], stride_qn,
                        UPCAST)  # fmt: skip
        lse = tl.load(lse_base + offs_m, mask=row_ok, other=0.0) * lse_scale
        s = qk_scores(q, kt, cap_in, cap_out, DOT_PRECISION, SOFTCAP)
        delta = offs_m[:, None] - offs_n[None, :]
        seen = row_ok[:, None] & col_ok[None, :] & (delta >= 0)
        if HAS_SLIDE:
            seen = seen & (delta < slide)
        # Mask before exp2: the future (and past the end) would overflow.
        p = tl.exp2(tl.where(seen, s * qk_scale - lse[:, None], float("-inf")))
        acc_d += p * delta.to(tl.float32)
        band = delta >= h_lo
        if HAS_HI:
            band = band & (delta <= h_hi)
        acc_f += tl.where(band, p, 0.0)
    span_c = tl.reduce(acc_d, 0, SUM)
    fai_c = tl.reduce(acc_f, 0, SUM)

    if not HAS_SLIDE:
        # The bulk, unmasked: one exp2 and two FMAs per score. Rows past the end read
        # LSE +inf (probability 0). acc_f now sums every p: FAI's to-the-end share, and the
        # sum_t p of the offset form.
        acc_f = tl.full([BLOCK_M, BLOCK_N], 0.0, dtype=tl.float32)
        acc_d = tl.full([BLOCK_M, BLOCK_N], 0.0, dtype=tl.float32)
        for start_m in range(t_mid, t_hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < t_hi
            q = load_q_tile(q_base, offs_m, offs_d, row_ok[:, None] & d_ok[None, :],
                            stride_qn, UPCAST)  # fmt: skip
            lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf")) * lse_scale
            s = qk_scores(q, kt, cap_in, cap_out, DOT_PRECISION, SOFTCAP)
            p = tl.exp2(s * qk_scale - lse[:, None])
            acc_f += p
            acc_d += p * (offs_m - j0).to(tl.float32)[:, None]
        bulk = tl.reduce(acc_f, 0, SUM)
        span_c += tl.reduce(acc_d, 0, SUM) - (offs_n - j0).to(tl.float32) * bulk
        if not HAS_HI:
            fai_c += bulk

    tl.store(SPAN_COL + h.to(tl.int64) * stride_sh + offs_n, span_c, mask=col_ok)
    # |T(s)| = min(end - 1, s + h_hi) - (s + h_lo) + 1, clipped at 0 (empty -> FAI 0);
    # stored for the response columns only, at their slot among the response positions.
    if HAS_HI:
        last = tl.minimum(seq_end - 1, offs_n + h_hi)
    else:
        last = seq_end - 1 + offs_n * 0
    count = (last - offs_n - h_lo + 1).to(tl.float32)
    fai = tl.where(count > 0, fai_c / tl.maximum(count, 1.0), 0.0)
    out = h.to(tl.int64) * stride_oh + offs_n + tl.load(OUT_SHIFT + seq)
    tl.store(FAI + out, fai, mask=col_ok & (offs_n >= resp0))


def waad_pass(
    Q, K, LSE, WAAD,
    BLK_SEQ, BLK_START, CU, SINKS, OUT_SHIFT,
    stride_qh, stride_qn, stride_kh, stride_kn, stride_oh, stride_lh,
    qk_scale, lse_scale, group, head_dim, window, cap_in, cap_out, slide,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_SINK: tl.constexpr, HAS_SLIDE: tl.constexpr,
):  # fmt: skip
    """WAAD of one response row block: W - sum_{d<W} (W - d) p[t, t - d] (a sink's share
    attends to nothing: W (1 - share) - ...), from the key tiles within W of its rows."""
    blk = tl.program_id(0)
    h = tl.program_id(1)
    seq = tl.load(BLK_SEQ + blk)
    t0 = tl.load(BLK_START + blk)
    seq_start = tl.load(CU + seq)
    seq_end = tl.load(CU + seq + 1)
    kvh = h // group

    offs_m = t0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seq_end
    d_ok = offs_d < head_dim
    q_base = Q + h.to(tl.int64) * stride_qh
    q = load_q_tile(q_base, offs_m, offs_d, row_ok[:, None] & d_ok[None, :], stride_qn, UPCAST)
    lse = tl.load(LSE + h.to(tl.int64) * stride_lh + offs_m, mask=row_ok, other=0.0) * lse_scale
    k_base = K + kvh.to(tl.int64) * stride_kh

    near = tl.full([BLOCK_M], 0.0, dtype=tl.float32)  # sum_{d<W} (W - d) p
    for start_n in range(tl.maximum(seq_start, t0 - window + 1), tl.minimum(t0 + BLOCK_M, seq_end),
                         BLOCK_N):  # fmt: skip
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < seq_end
        kt = load_k_tile(k_base, offs_n, offs_d, d_ok[:, None] & col_ok[None, :], stride_kn,
                         UPCAST)  # fmt: skip
        s = qk_scores(q, kt, cap_in, cap_out, DOT_PRECISION, SOFTCAP)
        delta = offs_m[:, None] - offs_n[None, :]
        close = row_ok[:, None] & col_ok[None, :] & (delta >= 0) & (delta < window)
        if HAS_SLIDE:
            close = close & (delta < slide)
        p = tl.exp2(tl.where(close, s * qk_scale - lse[:, None], float("-inf")))
        near += tl.reduce(p * (window - delta).to(tl.float32), 1, SUM)
    waad = window - near
    if HAS_SINK:  # the sink's share, 2^(sink - LSE), adds no distance
        waad = waad - window * tl.exp2(tl.load(SINKS + h) - lse)
    out = h.to(tl.int64) * stride_oh + offs_m + tl.load(OUT_SHIFT + seq)
    tl.store(WAAD + out, waad, mask=row_ok)
