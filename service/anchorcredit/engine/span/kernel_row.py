"""Row pass of the span kernel: one program per (response query block, query head).

Shaped like a FlashAttention forward without V: an online max/sum in base 2 with the softmax
scale folded into one multiplier, plus two accumulators rescaled alongside the row sum:
sum p (t - s) (span, unclipped) and sum_{t-s<W} (W - (t-s)) p (WAAD, only on the few tiles at
the diagonal). Stores each response row's LSE (base 2, internal), mean distance and WAAD.
Options (constexprs; the plain kernel is unchanged by them): GQA_PACK stacks a GQA group's
query heads into one program, FOLD_BAND sums FAI's finite band here instead of in a column
pass, SOFTCAP / HAS_SINK / HAS_SLIDE the model-true attention (docs/KERNEL.md).
"""

from __future__ import annotations

from anchorcredit.engine.span.tiles import MAX, SUM, load_k_tile, qk_scores, tl


def row_pass(
    Q, K, LSE, SPAN, WAAD,
    BLK_SEQ, BLK_START, CU, SINKS, OUT_SHIFT,
    stride_qh, stride_qn, stride_kh, stride_kn, stride_oh, stride_lh,
    qk_scale, group, head_dim, window, near, cap_in, cap_out, slide,
    PART, BLK_INDEX, stride_ph, stride_ps, h_lo, h_hi, slots,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_SINK: tl.constexpr, HAS_SLIDE: tl.constexpr,
    GQA_PACK: tl.constexpr = 1, FOLD_BAND: tl.constexpr = False,
):  # fmt: skip
    # GQA_PACK > 1 (gqa_pack=True; the GQA group padded to a power of two): one program per
    # (query block, kv head) stacks its group's query heads into one [GQA_PACK * BLOCK_M, d]
    # tile, row r = head r // BLOCK_M at position t0 + r % BLOCK_M, so every K tile is
    # loaded once for the whole group. GQA_PACK == 1 is the one-head-per-program kernel.
    ROWS: tl.constexpr = GQA_PACK * BLOCK_M
    blk = tl.program_id(0)
    seq = tl.load(BLK_SEQ + blk)
    t0 = tl.load(BLK_START + blk)
    seq_start = tl.load(CU + seq)
    seq_end = tl.load(CU + seq + 1)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    if GQA_PACK == 1:
        h = tl.program_id(1)
        kvh = h // group
        offs_m = t0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < seq_end
        q_ptrs = Q + h.to(tl.int64) * stride_qh + offs_m[:, None].to(tl.int64) * stride_qn
    else:
        kvh = tl.program_id(1)
        rows = tl.arange(0, ROWS)
        in_group = rows // BLOCK_M
        h = kvh * group + in_group  # [ROWS] each row's query head
        offs_m = t0 + rows % BLOCK_M
        row_ok = (offs_m < seq_end) & (in_group < group)  # padded heads are never stored
        q_ptrs = Q + (h.to(tl.int64) * stride_qh + offs_m.to(tl.int64) * stride_qn)[:, None]
    q = tl.load(q_ptrs + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + kvh.to(tl.int64) * stride_kh

    if HAS_SINK:
        # The sink (base 2) starts the online softmax: its term is 2^(sink - m) in l, and
        # m is finite from the start.
        if GQA_PACK == 1:
            sink = tl.load(SINKS + h)
        else:
            sink = tl.load(SINKS + h, mask=row_ok, other=0.0)
        m_i = tl.full([ROWS], 0.0, dtype=tl.float32) + sink
        l_i = tl.full([ROWS], 1.0, dtype=tl.float32)
    else:
        m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
        l_i = tl.full([ROWS], 0.0, dtype=tl.float32)
    dist_i = tl.full([ROWS], 0.0, dtype=tl.float32)  # sum p * (t - s)
    near_i = tl.full([ROWS], 0.0, dtype=tl.float32)  # sum_{t-s<W} (W - (t-s)) p

    # Stage 1: key tiles ending at least `near` = max(W, 1) before the block's first row:
    # no causal mask, no WAAD weight, always in bounds.
    gap = tl.maximum(t0 - seq_start - near + 1, 0)
    split = seq_start + (gap // BLOCK_N) * BLOCK_N
    first = seq_start
    if HAS_SLIDE:
        # Keys before t0 - slide + 1 are outside every row's window: skip their tiles.
        first = seq_start + (tl.maximum(t0 - slide + 1 - seq_start, 0) // BLOCK_N) * BLOCK_N
    # This loop is the bulk of the work: keep it at one FMA + exp2 + two multiply-adds per
    # score. sum_s p (t - s) = (t - n0) sum_s p - sum_s p (s - n0) over a tile starting at
    # n0 reads a per-column vector instead of a per-element distance; both terms are of the
    # tile's size, so the difference loses nothing worth measuring in fp32.
    col_rel = tl.arange(0, BLOCK_N).to(tl.float32)
    row_f = offs_m.to(tl.float32)
    for start_n in range(first, split, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt = load_k_tile(k_base, offs_n, offs_d, d_ok[:, None], stride_kn, UPCAST)
        s = qk_scores(q, kt, cap_in, cap_out, DOT_PRECISION, SOFTCAP)
        if HAS_SLIDE:  # the window's lower edge can cut through these tiles
            s = tl.where(offs_m[:, None] - offs_n[None, :] < slide, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 1, MAX) * qk_scale)  # qk_scale > 0
        m_use = m_new
        if HAS_SLIDE and not HAS_SINK:  # a row may have seen no key yet: keep exp2 finite
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s * qk_scale - m_use[:, None])
        l_tile = tl.reduce(p, 1, SUM)
        moment = tl.reduce(p * col_rel[None, :], 1, SUM)
        dist_i = dist_i * alpha + ((row_f - start_n) * l_tile - moment)
        l_i = l_i * alpha + l_tile
        # near_i stays 0 here: no key in these tiles is within W of any row.
        m_i = m_new

    # Stage 2: the diagonal tiles (the first holds a key <= every row, so m_i turns finite).
    hi = tl.minimum(t0 + BLOCK_M, seq_end)
    for start_n in range(tl.maximum(split, first), hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < seq_end
        kt = load_k_tile(k_base, offs_n, offs_d, d_ok[:, None] & col_ok[None, :], stride_kn,
                         UPCAST)  # fmt: skip
        s = qk_scores(q, kt, cap_in, cap_out, DOT_PRECISION, SOFTCAP) * qk_scale
        delta = offs_m[:, None] - offs_n[None, :]
        valid = (delta >= 0) & col_ok[None, :]  # causal, inside the sequence
        if HAS_SLIDE:
            valid = valid & (delta < slide)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 1, MAX))
        m_use = m_new
        if HAS_SLIDE and not HAS_SINK:
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        dist = delta.to(tl.float32)
        weight = tl.maximum(window - dist, 0.0)
        l_i = l_i * alpha + tl.reduce(p, 1, SUM)
        dist_i = dist_i * alpha + tl.reduce(p * dist, 1, SUM)
        near_i = near_i * alpha + tl.reduce(p * weight, 1, SUM)
        m_i = m_new

    # The LSE at the row's position; span and WAAD at its slot among the batch's response
    # positions (OUT_SHIFT: the sequence's offset between the two).
    lse_out = h.to(tl.int64) * stride_lh + offs_m
    out = h.to(tl.int64) * stride_oh + offs_m + tl.load(OUT_SHIFT + seq)
    if HAS_SLIDE:  # rows past the end may have seen no key at all (never stored)
        l_i = tl.where(row_ok, l_i, 1.0)
    tl.store(LSE + lse_out, m_i + tl.log2(l_i), mask=row_ok)
    tl.store(SPAN + out, dist_i / l_i, mask=row_ok)
    # Mass further than W back (prompt included) counts as W: WAAD = W - sum (W-d) p.
    # A sink's share attends to nothing: WAAD = W (1 - share) - sum (W-d) p.
    if HAS_SINK:
        near_i = near_i + window * tl.exp2(sink - m_i)
    tl.store(WAAD + out, window - near_i / l_i, mask=row_ok)

    if FOLD_BAND:
        # band="fold": FAI's column sums for a finite h_hi, here instead of in a column pass.
        # With these rows' final LSE, recompute the key tiles within [h_lo, h_hi] of them
        # (columns t0 - h_hi .. t0 + BLOCK_M - 1 - h_lo, ~(BLOCK_M + h_hi - h_lo) / BLOCK_N
        # tiles) and store each tile's column sums into slot k % slots of PART, k this
        # block's index in its sequence. Blocks sharing a slot never share a column (slots
        # = 1 + ceil((h_hi - h_lo) / BLOCK_M)): no atomics, and the host sums the slots in
        # a fixed order, so FAI stays deterministic. Rows past the end are masked out.
        lse_fin = m_i + tl.log2(l_i)
        slot = tl.load(BLK_INDEX + blk) % slots
        part_base = PART + h.to(tl.int64) * stride_ph + slot.to(tl.int64) * stride_ps
        c_hi = tl.minimum(t0 + BLOCK_M - h_lo, seq_end)  # exclusive
        for start_n in range(tl.maximum(t0 - h_hi, seq_start), c_hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            col_ok = offs_n < c_hi
            kt = load_k_tile(k_base, offs_n, offs_d, d_ok[:, None] & col_ok[None, :],
                             stride_kn, UPCAST)  # fmt: skip
            s = qk_scores(q, kt, cap_in, cap_out, DOT_PRECISION, SOFTCAP)
            delta = offs_m[:, None] - offs_n[None, :]
            band = row_ok[:, None] & col_ok[None, :] & (delta >= h_lo) & (delta <= h_hi)
            if HAS_SLIDE:
                band = band & (delta < slide)
            p = tl.exp2(tl.where(band, s * qk_scale - lse_fin[:, None], float("-inf")))
            tl.store(part_base + offs_n, tl.reduce(p, 0, SUM), mask=col_ok)
