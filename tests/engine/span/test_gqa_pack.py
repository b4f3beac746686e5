"""The row pass with a GQA group packed into one program (gqa_pack=True):
the same numbers as the float64 reference and as the one-head-per-program kernel, under
TRITON_INTERPRET=1, and the launch it makes (its compile: tests/bench/test_span_aot.py).
The timing needs a GPU (bench/gpu_suite.sh)."""

from __future__ import annotations

import pytest
import torch

from anchorcredit.engine.span.reference import span_stats_reference

triton = pytest.importorskip("triton")
from anchorcredit.engine.span import triton_kernel  # noqa: E402

from .test_triton_kernel import assert_matches, assert_same, random_qk, reference  # noqa: E402


def packed_and_plain(q, k, cu, prompts, **kw):
    args = (q.float(), k.float(), cu, prompts)
    packed = triton_kernel.span_stats_packed(*args, gqa_pack=True, **kw)
    plain = triton_kernel.span_stats_packed(*args, **kw)
    return packed, plain


# (Hq, Hkv): GQA groups 1, 2, 4, and 3 (padded to a stacked tile of 4 heads).
@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 2), (4, 1), (3, 1)])
@pytest.mark.parametrize("h_hi", [100, None])
def test_packed_group_matches_reference_with_prompt_length_one(interpret, hq, hkv, h_hi):
    n = 70
    q, k = random_qk(hq, hkv, n, 16, seed=hq * 7 + hkv)
    (packed,), (plain,) = packed_and_plain(q, k, [0, n], [1], h_hi=h_hi, block_m=16, block_n=16)
    assert_matches(packed, reference(q, k, 1, h_hi=h_hi), 1e-4)
    assert_same(packed, plain)


def test_packed_unequal_lengths_and_default_tiles(interpret):
    # Response 1, prompt 1, response 3 < h_lo, one sequence spanning several blocks.
    lengths, prompts = [40, 17, 75, 33], [39, 1, 5, 30]
    cu = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    q, k = random_qk(8, 2, cu[-1], 16, seed=11)
    packed, plain = packed_and_plain(q, k, cu, prompts)  # default tiles: 32 // 4 -> 16 rows
    for b, (lo, hi) in enumerate(zip(cu[:-1], cu[1:], strict=True)):
        assert_matches(packed[b], reference(q[:, lo:hi], k[:, lo:hi], prompts[b]), 1e-4)
        assert_same(packed[b], plain[b])


def test_packed_model_true_attention(interpret):
    # Soft-capping, a sink per query head (padded heads must not read past Hq) and a
    # sliding window shorter than a sequence.
    q, k = random_qk(6, 2, 90, 16, seed=3)
    sinks = torch.linspace(-1.0, 2.0, 6, dtype=torch.float64)
    kw = {"softcap": 5.0, "sinks": sinks, "sliding_window": 24}
    (packed,) = triton_kernel.span_stats_packed(
        q.float(), k.float(), [0, 90], [4], 10, 10, None, 0.25, block_m=16, block_n=16,
        gqa_pack=True, softcap=5.0, sinks=sinks.float(), sliding_window=24,
    )  # fmt: skip
    ref = span_stats_reference(q, k, 4, 10, 10, None, 0.25, **kw)
    assert_matches(packed, ref, 1e-4)


def test_packed_bf16_inputs(interpret):
    q, k = random_qk(4, 1, 64, 16, seed=9)
    qb, kb = q.bfloat16(), k.bfloat16()
    (packed,) = triton_kernel.span_stats_packed(qb, kb, [0, 64], [3], gqa_pack=True)
    assert_matches(packed, reference(qb, kb, 3), 1e-4)


def test_packed_launch_and_unchanged_default(interpret):
    q, k = random_qk(8, 2, 100, 16, seed=1)
    plain = triton_kernel.plan_packed(q.float(), k.float(), [0, 100], [10])
    assert plain.row.grid[1] == 8 and "GQA_PACK" not in plain.row.options
    packed = triton_kernel.plan_packed(q.float(), k.float(), [0, 100], [10], gqa_pack=True)
    assert packed.row.grid[1] == 2 and packed.row.options["GQA_PACK"] == 4
    # Positions per head: the unpacked rows over the group, at least 16 (interpreter: 32).
    assert packed.row.options["BLOCK_M"] == max(16, plain.row.options["BLOCK_M"] // 4)
    assert packed.col.grid == plain.col.grid and packed.col.options == plain.col.options
    explicit = triton_kernel.plan_packed(
        q.float(), k.float(), [0, 100], [10], gqa_pack=True, block_m=32
    )
    assert explicit.row.options["BLOCK_M"] == 32  # positions per head, the tile 4 x 32 rows
