"""Column pass of the span kernel: one program per (response key tile, query head).

Shaped like the dK/dV loop of a FlashAttention backward: with the row LSE known (the row
pass stored it), recompute exact probabilities for the query tiles with h_lo <= t - s <=
h_hi and sum them per column into a per-tile fp32 accumulator, reduced over the rows once
after the loops (a per-step column sum would cross warps: shuffles, shared memory and
barriers on every step). A finite h_hi touches only ~(BLOCK_N + h_hi - h_lo) rows per key
tile (the band epilogue); h_hi=None runs to the end of the sequence. Per key tile rather
than per query block keeps FAI deterministic without an atomics buffer.
"""

from __future__ import annotations

from anchorcredit.engine.span.tiles import SUM, load_k_tile, load_q_tile, qk_scores, tl


def col_pass(
    Q, K, LSE, FAI,
    BLK_SEQ, BLK_START, CU, OUT_SHIFT,
    stride_qh, stride_qn, stride_kh, stride_kn, stride_oh, stride_lh,
    qk_scale, group, head_dim, h_lo, h_hi, cap_in, cap_out, slide,
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
    kvh = h // group

    offs_n = j0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < seq_end
    d_ok = offs_d < head_dim
    k_base = K + kvh.to(tl.int64) * stride_kh
    kt = load_k_tile(k_base, offs_n, offs_d, d_ok[:, None] & col_ok[None, :], stride_kn, UPCAST)
    q_base = Q + h.to(tl.int64) * stride_qh
    lse_base = LSE + h.to(tl.int64) * stride_lh

    # Rows that can see these columns inside the horizon; j0 is a response position and
    # h_lo >= 0, so every such row is a response row (its LSE was stored by the row pass).
    t_lo = j0 + h_lo
    if HAS_HI:
        t_hi = tl.minimum(seq_end, j0 + BLOCK_N + h_hi)  # exclusive
        t_mid = t_hi
    else:
        t_hi = seq_end
        # Rows from t_mid on are >= h_lo past every column of the tile: no band mask.
        t_mid = tl.minimum(t_hi, j0 + BLOCK_N - 1 + h_lo)
    if HAS_SLIDE:
        # Rows at or past s + slide do not see column s: stop there, all rows masked (the
        # unmasked bulk loop below is skipped). |T(s)| still counts them (A = 0).
        t_hi = tl.minimum(t_hi, j0 + BLOCK_N - 1 + slide)
        t_mid = t_hi
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, dtype=tl.float32)
    for start_m in range(t_lo, t_mid, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < t_mid
        q = load_q_tile(q_base, offs_m, offs_d, row_ok[:, None] & d_ok[None, :], stride_qn,
                        UPCAST)  # fmt: skip
        lse = tl.load(lse_base + offs_m, mask=row_ok, other=0.0)
        s = qk_scores(q, kt, cap_in, cap_out, DOT_PRECISION, SOFTCAP)
        delta = offs_m[:, None] - offs_n[None, :]
        band = row_ok[:, None] & col_ok[None, :] & (delta >= h_lo)
        if HAS_HI:
            band = band & (delta <= h_hi)
        if HAS_SLIDE:
            band = band & (delta < slide)
        # Mask before exp2: entries outside the band (the future included) would overflow.
        acc += tl.exp2(tl.where(band, s * qk_scale - lse[:, None], float("-inf")))
    if not HAS_HI:
        # The horizon runs to the end: the bulk of a causal pass, unmasked. Rows past the
        # end get LSE +inf (probability 0); columns past the end are never stored.
        for start_m in range(t_mid, t_hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < t_hi
            q = load_q_tile(q_base, offs_m, offs_d, row_ok[:, None] & d_ok[None, :],
                            stride_qn, UPCAST)  # fmt: skip
            lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
            s = qk_scores(q, kt, cap_in, cap_out, DOT_PRECISION, SOFTCAP)
            acc += tl.exp2(s * qk_scale - lse[:, None])

    # |T(s)| = min(end - 1, s + h_hi) - (s + h_lo) + 1, clipped at 0 (empty -> FAI 0).
    if HAS_HI:
        last = tl.minimum(seq_end - 1, offs_n + h_hi)
    else:
        last = seq_end - 1 + offs_n * 0
    count = (last - offs_n - h_lo + 1).to(tl.float32)
    col_sum = tl.reduce(acc, 0, SUM)
    fai = tl.where(count > 0, col_sum / tl.maximum(count, 1.0), 0.0)
    out = h.to(tl.int64) * stride_oh + offs_n + tl.load(OUT_SHIFT + seq)
    tl.store(FAI + out, fai, mask=col_ok)
