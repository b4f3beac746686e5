"""Fused Triton span kernel: SPEC.md's per-head span, WAAD and FAI without the N x N matrix.

Contract
    Inputs: post-RoPE q [Hq, total_N, d] and k [Hkv, total_N, d] (bf16, fp16 or fp32;
    float64 is computed in fp32), Hq a multiple of Hkv (query head h reads kv head
    h // (Hq / Hkv)). Several sequences may be packed along the token axis: cu_seqlens [B+1]
    (cumulative lengths, 0 first, total_N last) and prompt_lens [B] (1 <= P_b < len_b). The
    mask is block-diagonal causal: a token attends only to earlier tokens of its sequence.
    Outputs: one SpanStats per sequence, float32, exactly SPEC.md's span [Hq], WAAD [Hq, R_b]
    and FAI [Hq, R_b] (per head; FAI already divided by |T(s)|, 0 where T(s) is empty).
    Accumulation is fp32 throughout; the result is deterministic (no atomics).

Passes (docs/KERNEL.md has the derivation)
    1. Row pass, one program per (response query block, q head), shaped like a
       FlashAttention forward without V: an online max/sum in base 2 with the softmax scale
       folded into one multiplier, plus two accumulators rescaled alongside the row sum:
       sum p * (t - s) (span, unclipped) and sum_{t-s<W} (W - (t-s)) p (WAAD, read only on
       the few tiles at the diagonal). Stores the row log-sum-exp, the row's mean distance
       and WAAD.
       Option gqa_pack=True: one program per (query block, kv head) with the GQA group's
       query heads stacked into one tile, each K tile loaded once per group (untimed).
       Option overlap_qk (default on for 16-bit inputs on sm_90+ where the registers allow):
       the bulk loop issues the next key tile's QK^T before the current softmax (the column
       pass's to-the-end loop likewise with the next query tile), so the asynchronous wgmma
       runs under the exp2s.
    2. Column pass, one program per (response key tile, q head), shaped like the dK/dV loop
       of a FlashAttention backward: with the row LSE known, recompute exact probabilities
       for the query tiles with h_lo <= t - s <= h_hi and sum the columns (into a per-tile
       fp32 accumulator, reduced over the rows once after the loop, not per step). For a
       finite h_hi this touches only ~(BLOCK_N + h_hi - h_lo) rows per key tile (the band
       epilogue); for h_hi=None it runs to the end of the sequence. Doing the band per key
       tile rather than per query block keeps FAI deterministic without an atomics buffer.
    Memory: O(Hq * total_N) fp32 (LSE, per-row span, WAAD, FAI) plus the block tables.
    The stored LSE is internal: base 2, of the scaled scores times log2(e).

Limits
    head dim <= 256 (padded to a power of two >= 16); block sizes powers of two >= 16.
    fp32 inputs use IEEE fp32 dot products (no TF32) on small tiles: a CPU/debug path, exact
    to ~1e-6 and slow on a GPU; the runner's dtype is bf16.
    Host side: no device sync when cu_seqlens/prompt_lens are Python ints and
    check_finite=False (the block tables are one pinned table copied asynchronously and
    cached per batch layout); runtime integers are not specialised (no recompiles).

Tested on
    Correctness verified under TRITON_INTERPRET=1 on CPU (fp32/bf16/fp16 inputs, N <= 512)
    against the float64 reference, and compiled ahead of time to sm_80 / sm_90 cubins
    through the JIT's own binder, with registers and spills read from the cubins (aot.py,
    tests/engine/span/test_aot.py). NOT yet run on a GPU: the bf16 correctness and no-sync
    tests (marked gpu) and the benchmark (python -m anchorcredit.engine.span.benchmark
    --device cuda) are written but unmeasured.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import astuple, dataclass
from typing import Any

import numpy as np
import torch

from anchorcredit.contract import DEFAULTS
from anchorcredit.engine.span.checks import (
    check_attention_variant,
    check_finite_qk,
    check_horizon,
    check_lengths,
    check_qk_pair,
    check_scale,
)
from anchorcredit.engine.types import SpanStats

try:  # triton is optional: importing anchorcredit.engine must work without it
    import triton
    import triton.language as tl

    # The combine functions behind tl.sum / tl.max, used through tl.reduce: tl.sum itself is
    # jitted when triton is imported, so it cannot run under an interpreter switched on
    # later, while the interpreter maps these two objects onto numpy reductions.
    _SUM = tl.standard._sum_combine
    _MAX = tl.standard._elementwise_max
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = tl = _SUM = _MAX = None

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256


def _row_pass(
    Q, K, LSE, SPAN, WAAD,
    BLK_SEQ, BLK_START, CU, SINKS,
    stride_qh, stride_qn, stride_kh, stride_kn, stride_oh,
    qk_scale, group, head_dim, window, near, cap_in, cap_out, slide,
    PART, BLK_INDEX, stride_ph, stride_ps, h_lo, h_hi, slots,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_SINK: tl.constexpr, HAS_SLIDE: tl.constexpr,
    GQA_PACK: tl.constexpr = 1, OVERLAP_QK: tl.constexpr = False,
    FOLD_BAND: tl.constexpr = False,
):  # fmt: skip
    # GQA_PACK > 1 (gqa_pack=True; the GQA group padded to a power of two): one program per
    # (query block, kv head) stacks its group's query heads into one [GQA_PACK * BLOCK_M, d]
    # tile, row r = head r // BLOCK_M at position t0 + r % BLOCK_M, so every K tile is
    # loaded once for the whole group. GQA_PACK == 1 is the one-head-per-program kernel,
    # written as before (the constexpr branches compile to exactly the same code).
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
    if OVERLAP_QK:
        # Software-pipelined QK^T (overlap_qk): the first tile's scores are issued before
        # the loop and every step issues the next tile's before its own softmax, so on
        # sm_90 the asynchronous wgmma runs under this tile's exp2s (its wait lands after
        # the softmax). The step past the last tile multiplies a masked, all-zero tile.
        offs_n = first + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[None, :].to(tl.int64) * stride_kn + offs_d[:, None]
        kt = tl.load(k_ptrs, mask=d_ok[:, None] & (offs_n[None, :] < split), other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
        s_next = tl.dot(q, kt, input_precision=DOT_PRECISION)
    for start_n in range(first, split, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if OVERLAP_QK:
            s = s_next
            offs_next = offs_n + BLOCK_N
            k_ptrs = k_base + offs_next[None, :].to(tl.int64) * stride_kn + offs_d[:, None]
            kt = tl.load(k_ptrs, mask=d_ok[:, None] & (offs_next[None, :] < split), other=0.0)
            if UPCAST:
                kt = kt.to(tl.float32)
            s_next = tl.dot(q, kt, input_precision=DOT_PRECISION)
        else:
            k_ptrs = k_base + offs_n[None, :].to(tl.int64) * stride_kn + offs_d[:, None]
            kt = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
            if UPCAST:
                kt = kt.to(tl.float32)
            s = tl.dot(q, kt, input_precision=DOT_PRECISION)
        if SOFTCAP:  # cap * tanh(x * scale / cap) in base 2; the host set qk_scale = 1
            y = s * cap_in
            e = tl.exp2(tl.abs(y) * -2.8853900817779268)  # exp(-2|y|)
            s = tl.where(y < 0, e - 1.0, 1.0 - e) / (1.0 + e) * cap_out
        if HAS_SLIDE:  # the window's lower edge can cut through these tiles
            s = tl.where(offs_m[:, None] - offs_n[None, :] < slide, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX) * qk_scale)  # qk_scale > 0
        m_use = m_new
        if HAS_SLIDE and not HAS_SINK:  # a row may have seen no key yet: keep exp2 finite
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s * qk_scale - m_use[:, None])
        l_tile = tl.reduce(p, 1, _SUM)
        moment = tl.reduce(p * col_rel[None, :], 1, _SUM)
        dist_i = dist_i * alpha + ((row_f - start_n) * l_tile - moment)
        l_i = l_i * alpha + l_tile
        # near_i stays 0 here: no key in these tiles is within W of any row.
        m_i = m_new

    # Stage 2: the diagonal tiles (the first holds a key <= every row, so m_i turns finite).
    hi = tl.minimum(t0 + BLOCK_M, seq_end)
    for start_n in range(tl.maximum(split, first), hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < seq_end
        k_ptrs = k_base + offs_n[None, :].to(tl.int64) * stride_kn + offs_d[:, None]
        kt = tl.load(k_ptrs, mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION)
        if SOFTCAP:
            y = s * cap_in
            e = tl.exp2(tl.abs(y) * -2.8853900817779268)
            s = tl.where(y < 0, e - 1.0, 1.0 - e) / (1.0 + e) * cap_out
        s = s * qk_scale
        delta = offs_m[:, None] - offs_n[None, :]
        valid = (delta >= 0) & col_ok[None, :]  # causal, inside the sequence
        if HAS_SLIDE:
            valid = valid & (delta < slide)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX))
        m_use = m_new
        if HAS_SLIDE and not HAS_SINK:
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        dist = delta.to(tl.float32)
        weight = tl.maximum(window - dist, 0.0)
        l_i = l_i * alpha + tl.reduce(p, 1, _SUM)
        dist_i = dist_i * alpha + tl.reduce(p * dist, 1, _SUM)
        near_i = near_i * alpha + tl.reduce(p * weight, 1, _SUM)
        m_i = m_new

    out = h.to(tl.int64) * stride_oh + offs_m  # h is one head, or one per row (packed)
    if HAS_SLIDE:  # rows past the end may have seen no key at all (never stored)
        l_i = tl.where(row_ok, l_i, 1.0)
    tl.store(LSE + out, m_i + tl.log2(l_i), mask=row_ok)
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
            k_ptrs = k_base + offs_n[None, :].to(tl.int64) * stride_kn + offs_d[:, None]
            kt = tl.load(k_ptrs, mask=d_ok[:, None] & col_ok[None, :], other=0.0)
            if UPCAST:
                kt = kt.to(tl.float32)
            s = tl.dot(q, kt, input_precision=DOT_PRECISION)
            if SOFTCAP:
                y = s * cap_in
                e = tl.exp2(tl.abs(y) * -2.8853900817779268)
                s = tl.where(y < 0, e - 1.0, 1.0 - e) / (1.0 + e) * cap_out
            delta = offs_m[:, None] - offs_n[None, :]
            band = row_ok[:, None] & col_ok[None, :] & (delta >= h_lo) & (delta <= h_hi)
            if HAS_SLIDE:
                band = band & (delta < slide)
            p = tl.exp2(tl.where(band, s * qk_scale - lse_fin[:, None], float("-inf")))
            tl.store(part_base + offs_n, tl.reduce(p, 0, _SUM), mask=col_ok)


def _col_pass(
    Q, K, LSE, FAI,
    BLK_SEQ, BLK_START, CU,
    stride_qh, stride_qn, stride_kh, stride_kn, stride_oh,
    qk_scale, group, head_dim, h_lo, h_hi, cap_in, cap_out, slide,
    HAS_HI: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_SLIDE: tl.constexpr, OVERLAP_QK: tl.constexpr = False,
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
    k_ptrs = K + kvh.to(tl.int64) * stride_kh + offs_n[None, :].to(tl.int64) * stride_kn
    kt = tl.load(k_ptrs + offs_d[:, None], mask=d_ok[:, None] & col_ok[None, :], other=0.0)
    if UPCAST:
        kt = kt.to(tl.float32)
    q_base = Q + h.to(tl.int64) * stride_qh
    lse_base = LSE + h.to(tl.int64) * stride_oh

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
    # One fp32 accumulator per tile element, reduced over the rows once after the loops:
    # a per-step column sum would cross warps (shuffles, shared memory and barriers on
    # every step; docs/KERNEL.md has the SASS counts).
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, dtype=tl.float32)
    for start_m in range(t_lo, t_mid, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < t_mid
        q_ptrs = q_base + offs_m[:, None].to(tl.int64) * stride_qn + offs_d[None, :]
        q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        lse = tl.load(lse_base + offs_m, mask=row_ok, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION)
        if SOFTCAP:
            y = s * cap_in
            e = tl.exp2(tl.abs(y) * -2.8853900817779268)
            s = tl.where(y < 0, e - 1.0, 1.0 - e) / (1.0 + e) * cap_out
        delta = offs_m[:, None] - offs_n[None, :]
        band = row_ok[:, None] & col_ok[None, :] & (delta >= h_lo)
        if HAS_HI:
            band = band & (delta <= h_hi)
        if HAS_SLIDE:
            band = band & (delta < slide)
        # Mask before exp2: entries outside the band (the future included) would overflow.
        p = tl.exp2(tl.where(band, s * qk_scale - lse[:, None], float("-inf")))
        acc += p
    if not HAS_HI:
        # The horizon runs to the end: the bulk of a causal pass, unmasked. Rows past the
        # end get LSE +inf (probability 0); columns past the end are never stored.
        if OVERLAP_QK:  # the next row tile's QK^T under this one's exp2 (as the row pass)
            offs_m = t_mid + tl.arange(0, BLOCK_M)
            row_ok = offs_m < t_hi
            q_ptrs = q_base + offs_m[:, None].to(tl.int64) * stride_qn + offs_d[None, :]
            q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            lse_next = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
            if UPCAST:
                q = q.to(tl.float32)
            s_next = tl.dot(q, kt, input_precision=DOT_PRECISION)
        for start_m in range(t_mid, t_hi, BLOCK_M):
            if OVERLAP_QK:
                s, lse = s_next, lse_next
                offs_m = start_m + BLOCK_M + tl.arange(0, BLOCK_M)
            else:
                offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < t_hi
            q_ptrs = q_base + offs_m[:, None].to(tl.int64) * stride_qn + offs_d[None, :]
            q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
            if OVERLAP_QK:
                lse_next = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
                s_next = tl.dot(q, kt, input_precision=DOT_PRECISION)
            else:
                lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
                s = tl.dot(q, kt, input_precision=DOT_PRECISION)
            if SOFTCAP:
                y = s * cap_in
                e = tl.exp2(tl.abs(y) * -2.8853900817779268)
                s = tl.where(y < 0, e - 1.0, 1.0 - e) / (1.0 + e) * cap_out
            acc += tl.exp2(s * qk_scale - lse[:, None])

    # |T(s)| = min(end - 1, s + h_hi) - (s + h_lo) + 1, clipped at 0 (empty -> FAI 0).
    if HAS_HI:
        last = tl.minimum(seq_end - 1, offs_n + h_hi)
    else:
        last = seq_end - 1 + offs_n * 0
    count = (last - offs_n - h_lo + 1).to(tl.float32)
    col_sum = tl.reduce(acc, 0, _SUM)
    fai = tl.where(count > 0, col_sum / tl.maximum(count, 1.0), 0.0)
    tl.store(FAI + h.to(tl.int64) * stride_oh + offs_n, fai, mask=col_ok)


# Runtime integers that change between calls must not pick a new specialisation (a compile
# inside the service): Triton specialises an int argument equal to 1 or divisible by 16, and
# a pointer aligned to 16 bytes. Horizons, the GQA group and the sliding window vary per
# request or model; the block tables are slices of one int32 table at any offset. The
# strides stay specialised, their divisibility is what lets the loads vectorise: the q/k
# strides are multiples of d (always divisible by 16 for d = 64, 80, 96, 128, 256), and
# the outputs' row stride is total_N rounded up to 16 (plan_packed pads it).
_DYNAMIC = ("group", "slide")
ROW_DYNAMIC = (*_DYNAMIC, "window", "near", "h_lo", "h_hi", "slots")
COL_DYNAMIC = (*_DYNAMIC, "h_lo", "h_hi")
TABLE_POINTERS = ("BLK_SEQ", "BLK_START", "CU", "BLK_INDEX")

# Jitted kernels per interpreter mode: TRITON_INTERPRET is read when a function is jitted,
# so jitting lazily (not at import) lets tests switch the interpreter on at any time.
_KERNELS: dict[bool, tuple] = {}


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError(
            "the triton span backend needs the `triton` package (pip install triton, Linux + "
            "CUDA); use backend='chunked' on machines without it"
        )


def _interpreting() -> bool:
    return bool(triton.knobs.runtime.interpret)


def _kernels() -> tuple:
    mode = _interpreting()
    if mode not in _KERNELS:
        _KERNELS[mode] = (
            triton.jit(_row_pass, do_not_specialize=ROW_DYNAMIC,
                       do_not_specialize_on_alignment=TABLE_POINTERS),
            triton.jit(_col_pass, do_not_specialize=COL_DYNAMIC,
                       do_not_specialize_on_alignment=TABLE_POINTERS),
        )  # fmt: skip
    return _KERNELS[mode]


@dataclass(frozen=True)
class Blocks:
    """One pass's launch configuration."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def default_blocks(dtype: torch.dtype, band: bool, interpreting: bool) -> tuple[Blocks, Blocks]:
    """(row pass, column pass) launch configs; hand-picked, benchmark.py sweeps them, and
    `python -m anchorcredit.engine.span.aot` prints their registers/spills per GPU.

    band: a finite h_hi. Its column pass reads only ~BLOCK_N + h_hi - h_lo rows per key
    tile, so it takes smaller tiles (more programs, less of each tile masked off)."""
    if interpreting:  # bigger tiles mean fewer (slow) Python steps
        cfg = Blocks(32, 32, 4, 1)
        return cfg, cfg
    if dtype == torch.float32:
        # IEEE fp32 dots run on the FMA units: a debug path, in tiles small enough not to
        # spill (64x32 spilled 3-6 KB a thread on sm_80/sm_90; docs/KERNEL.md).
        cfg = Blocks(16, 16, 4, 1)
        return cfg, cfg
    row = Blocks(128, 64, 8, 3)
    return row, Blocks(64, 32, 4, 2) if band else row


# Padded head dims (BLOCK_D) per pass where the pipelined QK^T pays on sm_90, read from the
# AOT table (docs/KERNEL.md, `python -m anchorcredit.engine.span.aot --overlap`): the exp2s
# run under the wgmma and the registers stay <= 128, so two 8-warp programs still fit an SM.
# Elsewhere (row pass at d=256, column pass at d=64/256) the carried scores cost an SM's
# second program for almost no overlap.
OVERLAP_HEAD_DIMS = {"row": (64, 128), "col": (128,)}


def default_overlap(
    dtype: torch.dtype, capability: tuple[int, int] | None, block_d: int
) -> dict[str, bool]:
    """plan_packed's overlap_qk=None, per pass ("row", "col"): on for 16-bit inputs on sm_90
    and newer (tl.dot an asynchronous wgmma whose wait the compiler can place after the
    softmax) at the head dims of OVERLAP_HEAD_DIMS. capability None: not a CUDA device."""
    asynchronous = capability is not None and capability[0] >= 9
    sixteen_bit = dtype in (torch.bfloat16, torch.float16)
    return {
        pass_: asynchronous and sixteen_bit and block_d in dims
        for pass_, dims in OVERLAP_HEAD_DIMS.items()
    }


def _as_int_list(x: torch.Tensor | Sequence[int], name: str) -> list[int]:
    if isinstance(x, torch.Tensor):
        if x.dim() != 1 or x.is_floating_point():
            raise ValueError(f"{name} must be a 1-D integer tensor, got {x.dtype} {tuple(x.shape)}")
        return [int(v) for v in x.tolist()]
    return [int(v) for v in x]


def _check_packed(
    q: torch.Tensor, k: torch.Tensor, cu: list[int], prompts: list[int], check_finite: bool
) -> None:
    check_qk_pair(q, k)
    n, d = q.shape[1], q.shape[2]
    if d > MAX_HEAD_DIM:
        raise ValueError(f"head dim {d} > {MAX_HEAD_DIM} is not supported by the kernel")
    if len(cu) < 2 or cu[0] != 0 or cu[-1] != n:
        raise ValueError(f"cu_seqlens must start at 0 and end at total_N={n}, got {cu}")
    if len(prompts) != len(cu) - 1:
        raise ValueError(f"{len(prompts)} prompt lengths for {len(cu) - 1} sequences")
    for b, p in enumerate(prompts):
        try:
            check_lengths(cu[b + 1] - cu[b], p)
        except ValueError as err:
            raise ValueError(f"sequence {b}: {err}") from None
    if check_finite:
        check_finite_qk(q, k)


def _check_block(value: int, name: str) -> int:
    if value < 16 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 16, got {value}")
    return value


@dataclass(frozen=True)
class Layout:
    """One batch layout's int32 tables on the device, slices of one tensor copied once.

    cu [B+1]; row blocks (sequence, first row, index in its sequence) and column tiles
    (sequence, first column), longest first; resp [n_resp] the response positions,
    resp_offsets [B+1] where each sequence's rows start among them, resp_counts [B] (the
    span's mean over rows), resp_end [n_resp] the end of each response position's sequence
    (FAI's |T(s)| when the band is folded into the row pass).
    """

    cu: torch.Tensor
    row_seq: torch.Tensor
    row_start: torch.Tensor
    row_index: torch.Tensor
    col_seq: torch.Tensor
    col_start: torch.Tensor
    resp: torch.Tensor
    resp_offsets: torch.Tensor
    resp_counts: torch.Tensor
    resp_end: torch.Tensor
    ranges: tuple[tuple[int, int], ...]  # each sequence's response tokens [lo, hi)
    host: torch.Tensor  # the (pinned) source of the copy: kept alive while it may run


# Layouts per (device, stream, cu_seqlens, prompt_lens, tiles, horizon mode): every selected
# layer of a batch reuses the first layer's tables. A trainer's batches rarely repeat a
# layout, so the cache stays small (each entry holds ~4 bytes per token, pinned and on the
# device); the lock keeps it consistent when several threads score.
_LAYOUTS: OrderedDict[tuple, Layout] = OrderedDict()
_LAYOUTS_LOCK = threading.Lock()
LAYOUT_CACHE_SIZE = 16


def _build_layout(
    cu: list[int], prompts: list[int], bm: int, bn: int, longest_first: bool,
    device: torch.device,
) -> Layout:  # fmt: skip
    rows: list[tuple[int, int, int]] = []
    cols: list[tuple[int, int, int]] = []
    ranges = []
    for b in range(len(prompts)):
        start, end = cu[b] + prompts[b], cu[b + 1]
        ranges.append((start, end))
        rows += [(t0 - cu[b], b, t0, (t0 - start) // bm) for t0 in range(start, end, bm)]
        cols += [(end - j0, b, j0) for j0 in range(start, end, bn)]
    # The heaviest blocks first, so the long causal rows do not trail at the end of the grid.
    rows.sort(key=lambda r: -r[0])
    if longest_first:
        cols.sort(key=lambda c: -c[0])
    counts = np.array([hi - lo for lo, hi in ranges], dtype=np.int64)
    parts = [
        np.asarray(cu),
        np.array([r[1] for r in rows]), np.array([r[2] for r in rows]),
        np.array([r[3] for r in rows]),
        np.array([c[1] for c in cols]), np.array([c[2] for c in cols]),
        np.concatenate([np.arange(lo, hi) for lo, hi in ranges]),
        np.concatenate([[0], np.cumsum(counts)]), counts,
        np.repeat(np.asarray(cu[1:]), counts),
    ]  # fmt: skip
    host = torch.from_numpy(np.concatenate(parts).astype(np.int32))
    if device.type == "cuda":  # pinned, so the copy is asynchronous (no host stall)
        host = host.pin_memory()
    table = host.to(device, non_blocking=True)
    pieces = table.split([len(p) for p in parts])
    return Layout(*pieces, ranges=tuple(ranges), host=host)


def _layout(
    cu: list[int], prompts: list[int], bm: int, bn: int, longest_first: bool,
    device: torch.device,
) -> Layout:  # fmt: skip
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream, tuple(cu), tuple(prompts), bm, bn, longest_first)
    with _LAYOUTS_LOCK:
        got = _LAYOUTS.get(key)
        if got is None:
            got = _LAYOUTS[key] = _build_layout(cu, prompts, bm, bn, longest_first, device)
            while len(_LAYOUTS) > LAYOUT_CACHE_SIZE:
                _LAYOUTS.popitem(last=False)
        else:
            _LAYOUTS.move_to_end(key)
        return got


@dataclass(frozen=True)
class Launch:
    """One kernel launch, exactly as span_stats_packed makes it (the AOT compile binds the
    same arguments through the JIT's binder)."""

    kernel: Any
    grid: tuple[int, int]
    args: tuple
    options: dict[str, Any]  # constexprs and launch options

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.options)


@dataclass(frozen=True)
class FoldedFai:
    """band="fold"'s second step: FAI from the row pass's per-slot column sums, for the
    response positions, in a few batched ops (the slots summed in a fixed order, then
    divided by |T(s)| = min(end - 1, s + h_hi) - (s + h_lo) + 1; 0 where T(s) is empty)."""

    part: torch.Tensor  # [Hq, slots, total_N] fp32, zeroed once: every run rewrites the same
    layout: Layout
    h_lo: int
    h_hi: int
    fai: torch.Tensor

    def __call__(self) -> None:
        lay = self.layout
        sums = self.part.index_select(2, lay.resp).sum(1)  # [Hq, n_resp]
        last = torch.minimum(lay.resp_end - 1, lay.resp + self.h_hi)
        count = (last - lay.resp - self.h_lo + 1).float()
        fai = torch.where(count > 0, sums / count.clamp(min=1.0), 0.0)
        self.fai.index_copy_(1, lay.resp.long(), fai)


@dataclass(frozen=True)
class Plan:
    """Both passes of one call with their outputs; run() launches, collect() reads back."""

    row: Launch
    col: Launch | FoldedFai  # the column pass, or the folded band's finishing step
    layout: Layout
    lse: torch.Tensor
    span_row: torch.Tensor
    waad: torch.Tensor
    fai: torch.Tensor

    def run(self) -> None:
        self.row()
        self.col()

    def collect(self) -> list[SpanStats]:
        """One SpanStats per sequence: views of the per-position outputs, and the span as a
        mean over each sequence's response rows in a few batched ops (no per-sequence
        launches, no host sync; float64 prefix sums, deterministic)."""
        lay = self.layout
        rows = self.span_row.index_select(1, lay.resp).double()
        prefix = torch.nn.functional.pad(rows.cumsum(1), (1, 0))
        sums = prefix.index_select(1, lay.resp_offsets[1:]) - prefix.index_select(
            1, lay.resp_offsets[:-1]
        )
        spans = (sums / lay.resp_counts).float().t().contiguous()  # [B, Hq]
        return [
            SpanStats(span=spans[b], waad=self.waad[:, lo:hi], fai=self.fai[:, lo:hi])
            for b, (lo, hi) in enumerate(lay.ranges)
        ]


def plan_packed(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens: torch.Tensor | Sequence[int],
    prompt_lens: torch.Tensor | Sequence[int],
    window: int = DEFAULTS.window,
    h_lo: int = DEFAULTS.h_lo,
    h_hi: int | None = DEFAULTS.h_hi,
    scale: float | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    col_block_m: int | None = None,
    col_block_n: int | None = None,
    check_finite: bool = True,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    sliding_window: int | None = None,
    gqa_pack: bool = False,
    overlap_qk: bool | None = None,
    capability: tuple[int, int] | None = None,
    band: str = "columns",
) -> Plan:
    """Validate a call of span_stats_packed and prepare its launches (nothing runs yet).

    q and k may live on the CPU with the interpreter off: the AOT compile
    (anchorcredit.engine.span.aot) plans GPU launches that way without a GPU.

    gqa_pack=True (off by default; issue 16 item 6, untimed): the row pass runs one program
    per (query block, kv head) over the group's query heads stacked into one tile, so each
    K tile is loaded once per group; block_m then counts query positions per head (the
    tile has group * block_m rows, the group padded to a power of two) and defaults to the
    unpacked tile's rows divided by the group (same tile size, at least 16 positions).
    Same results; the column pass is unchanged.

    overlap_qk (issue 16 item 6): software-pipeline the QK^T of the row pass's bulk loop and
    of the column pass's to-the-end loop, issuing the next tile's dot before the current
    softmax so the tensor cores run under the exp2s. None (default) picks it per pass where
    the dot is asynchronous and the registers allow (default_overlap: 16-bit inputs on
    sm_90+ at the head dims of OVERLAP_HEAD_DIMS); on sm_80 the carried fp32 scores cost
    50-130 more registers a thread (docs/KERNEL.md). Same results either way.

    capability: the GPU the launches are for, (major, minor); default the tensors' device.
    The AOT compile sets it to plan sm_80/sm_90 launches from CPU tensors.

    band (issue 16 item 5; a finite h_hi only): "columns" (default) sums FAI's columns in
    the column pass, one program per key tile of the band; "fold" sums them in the row
    pass instead, after each query block's loop (its rows' LSE final), into per-slot
    partial sums that a few torch ops add up (FoldedFai): no second kernel of ~N/32 tiny
    programs, ~(BLOCK_M + h_hi - h_lo) / BLOCK_N more key tiles per row program, and
    O(Hq * slots * total_N) fp32 more memory (slots = 1 + ceil((h_hi - h_lo) / BLOCK_M)).
    Same results, deterministic either way; not with gqa_pack.
    """
    cu = _as_int_list(cu_seqlens, "cu_seqlens")
    prompts = _as_int_list(prompt_lens, "prompt_lens")
    _check_packed(q, k, cu, prompts, check_finite)
    check_horizon(window, h_lo, h_hi)
    scale = check_scale(scale, q.shape[-1])
    softcap, sinks, sliding_window = check_attention_variant(
        softcap, sinks, sliding_window, q, check_finite=check_finite
    )
    if q.dtype == torch.float64:  # the kernel computes in fp32
        q, k = q.float(), k.float()
        if not bool(torch.isfinite(q).all()) or not bool(torch.isfinite(k).all()):
            raise ValueError("q and k overflow float32, the kernel's precision")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()

    # Distances never exceed the longest sequence, so clamping the horizon there changes no
    # number and keeps the kernel's int32 index arithmetic (s + h_hi, ...) from wrapping.
    longest = max(b - a for a, b in zip(cu[:-1], cu[1:], strict=True))
    window, h_lo = min(int(window), longest), min(int(h_lo), longest)
    h_hi = None if h_hi is None else min(int(h_hi), longest)
    if sliding_window is not None and sliding_window >= longest:
        sliding_window = None  # every window holds its whole sequence: plain causal

    interpreting = _interpreting()
    row_cfg, col_cfg = default_blocks(q.dtype, h_hi is not None, interpreting)
    if block_m or block_n or num_warps or num_stages:  # explicit options set both passes
        row_cfg = col_cfg = Blocks(
            _check_block(block_m or row_cfg.block_m, "block_m"),
            _check_block(block_n or row_cfg.block_n, "block_n"),
            num_warps or row_cfg.num_warps,
            num_stages or row_cfg.num_stages,
        )
    if col_block_m or col_block_n:
        col_cfg = Blocks(
            _check_block(col_block_m or col_cfg.block_m, "col_block_m"),
            _check_block(col_block_n or col_cfg.block_n, "col_block_n"),
            col_cfg.num_warps,
            col_cfg.num_stages,
        )
    hq, n, d = q.shape
    group = hq // k.shape[0]
    pack = triton.next_power_of_2(group) if gqa_pack else 1
    if pack > 1 and not block_m:  # keep the stacked tile at the unpacked tile's rows
        row_cfg = Blocks(max(16, row_cfg.block_m // pack), *astuple(row_cfg)[1:])
    block_d = max(16, triton.next_power_of_2(d))
    dev = q.device
    if capability is None and dev.type == "cuda":
        capability = torch.cuda.get_device_capability(dev)
    if band not in ("columns", "fold"):
        raise ValueError(f"band must be 'columns' or 'fold', got {band!r}")
    fold = band == "fold"
    if fold and h_hi is None:
        raise ValueError(
            "band='fold' needs a finite h_hi: the horizon to the end runs the column pass"
        )
    if fold and pack > 1:
        raise ValueError("band='fold' does not combine with gqa_pack=True")
    if overlap_qk is None:
        overlap = default_overlap(q.dtype, capability, block_d)
    else:
        overlap = {"row": overlap_qk, "col": overlap_qk}
    overlap["col"] &= h_hi is None  # the band's column loop has nothing to pipeline
    lay = _layout(cu, prompts, row_cfg.block_m, col_cfg.block_n, h_hi is None, dev)

    # Per-position outputs (prompt slots unused): O(Hq * total_N) fp32, the row stride
    # padded to a multiple of 16 so that it specialises the same way for every total_N.
    padded = -(-n // 16) * 16
    lse, span_row, waad, fai = (
        torch.empty(hq, padded, dtype=torch.float32, device=dev)[:, :n] for _ in range(4)
    )
    qk_scale = scale * LOG2E  # softmax in base 2: exp(x * scale) = exp2(x * scale * log2 e)
    cap_in = cap_out = 1.0
    if softcap is not None:  # base-2 logits cap * log2 e * tanh(x * scale / cap)
        cap_in, cap_out, qk_scale = scale / softcap, softcap * LOG2E, 1.0
    # Sink logits in base 2 (fp32, one per q head); the LSE buffer stands in when absent.
    sinks2 = lse if sinks is None else (sinks.float() * LOG2E).contiguous()
    slide = 0 if sliding_window is None else int(sliding_window)
    variant = {"SOFTCAP": softcap is not None, "HAS_SLIDE": sliding_window is not None}
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # tf32 is unused for 16-bit
    # Triton 3.9's interpreter multiplies bf16 tiles wrongly; it gets exact fp32 copies
    # (bf16 -> fp32 is lossless, and the GPU's bf16 MMA accumulates in fp32 too).
    upcast = interpreting and q.dtype == torch.bfloat16
    shared = {"BLOCK_D": block_d, "DOT_PRECISION": precision, "UPCAST": upcast, **variant}

    row_kernel, col_kernel = _kernels()
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), lse.stride(0))

    def options(cfg: Blocks) -> dict[str, Any]:
        # FMA contraction on explicitly (it is what `s * scale - m` is written for).
        return {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, **shared,
                "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                "enable_fp_fusion": True}  # fmt: skip

    row_options = {**options(row_cfg), "HAS_SINK": sinks is not None}
    if pack > 1:  # passed only when packing: the default launch binds exactly as before
        row_options["GQA_PACK"] = pack
    col_options = {**options(col_cfg), "HAS_HI": h_hi is not None}
    for opts, pass_ in ((row_options, "row"), (col_options, "col")):
        if overlap[pass_]:  # likewise passed only when on
            opts["OVERLAP_QK"] = True
    hi = 0 if h_hi is None else int(h_hi)
    if fold:  # per-slot column sums; the row stride padded like the outputs'
        slots = 1 + -(-(hi - h_lo) // row_cfg.block_m)
        part = torch.zeros(hq, slots, padded, dtype=torch.float32, device=dev)[:, :, :n]
        row_options["FOLD_BAND"] = True
        fold_args = (part, lay.row_index, part.stride(0), part.stride(1), h_lo, hi, slots)
    else:  # unused: stand-ins that bind the same way
        fold_args = (lse, lay.row_index, lse.stride(0), lse.stride(0), h_lo, hi, 1)
    row = Launch(
        row_kernel, (len(lay.row_seq), hq // group if pack > 1 else hq),
        (q, k, lse, span_row, waad, lay.row_seq, lay.row_start, lay.cu, sinks2, *strides,
         qk_scale, group, d, window, max(window, 1), cap_in, cap_out, slide, *fold_args),
        row_options,
    )  # fmt: skip
    if fold:
        return Plan(row, FoldedFai(part, lay, h_lo, hi, fai), lay, lse, span_row, waad, fai)
    col = Launch(
        col_kernel, (len(lay.col_seq), hq),
        (q, k, lse, fai, lay.col_seq, lay.col_start, lay.cu, *strides,
         qk_scale, group, d, h_lo, hi, cap_in, cap_out, slide),
        col_options,
    )  # fmt: skip
    return Plan(row, col, lay, lse, span_row, waad, fai)


def span_stats_packed(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens: torch.Tensor | Sequence[int],
    prompt_lens: torch.Tensor | Sequence[int],
    window: int = DEFAULTS.window,
    h_lo: int = DEFAULTS.h_lo,
    h_hi: int | None = DEFAULTS.h_hi,
    scale: float | None = None,
    **options: Any,
) -> list[SpanStats]:
    """SPEC.md span/WAAD/FAI for every sequence of a packed batch, one SpanStats each.

    q [Hq, total_N, d], k [Hkv, total_N, d]; sequence b occupies tokens
    cu_seqlens[b]:cu_seqlens[b+1] with its first prompt_lens[b] tokens the prompt.
    Keyword options (plan_packed): block_m, block_n, num_warps, num_stages (both passes;
    powers of two >= 16 for the blocks), col_block_m, col_block_n (the column pass alone),
    default hand-picked per dtype and horizon mode; check_finite=False skips the NaN/inf
    scan of q, k and sinks (a full read and a device sync each) for callers whose inputs
    come straight from a model forward (the engine's packed front, i.e. the runner);
    softcap / sinks [Hq] / sliding_window: the layer's attention as the model computes it
    (anchorcredit.engine.span docstring); None = plain causal softmax; gqa_pack=True packs
    a GQA group's query heads into one row-pass program (default off; plan_packed);
    overlap_qk pipelines the QK^T dots (default None: per pass, on for 16-bit inputs on
    sm_90+ where the registers allow; plan_packed).

    With cu_seqlens and prompt_lens as Python ints and check_finite=False a call makes no
    host sync: the block tables go over in one pinned, non-blocking copy, cached per layout.
    """
    _require_triton()
    if q.device.type != "cuda" and not _interpreting():
        raise RuntimeError(
            f"the triton span kernel needs CUDA tensors (got {q.device}); set "
            "TRITON_INTERPRET=1 before the first call to run it on CPU, or use backend='chunked'"
        )
    plan = plan_packed(q, k, cu_seqlens, prompt_lens, window, h_lo, h_hi, scale, **options)
    plan.run()
    return plan.collect()


def span_stats_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    prompt_len: int,
    window: int,
    h_lo: int,
    h_hi: int | None,
    scale: float,
    **variant,
) -> SpanStats:
    """One sequence through the packed kernel (the engine front's `backend="triton"`, which
    has already validated the arguments and scanned q and k for NaN/inf). variant: softcap,
    sinks, sliding_window."""
    cu, prompts = [0, q.shape[1]], [prompt_len]
    return span_stats_packed(
        q, k, cu, prompts, window, h_lo, h_hi, scale, check_finite=False, **variant
    )[0]
