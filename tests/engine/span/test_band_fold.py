"""FAI's band folded into the row pass (band="fold"): per-slot column sums
written by the row programs once their LSE is final, summed by FoldedFai.

Under TRITON_INTERPRET=1: the same numbers as the float64 reference and as the column pass
on the edge cases (prompt length 1, response length 1, responses shorter than h_lo, h_lo = 0,
h_hi = h_lo, horizons wider than a query block so that several slots are in use, unequal
packed lengths, GQA, model-true attention) and the arguments it refuses. Its compile is
checked in tests/bench/test_span_aot.py, its benchmark rows in test_span_benchmark.py; its
timing needs a GPU."""

from __future__ import annotations

import pytest
import torch

from anchorcredit.engine.span.reference import span_stats_reference

triton = pytest.importorskip("triton")
from anchorcredit.engine.span import triton_kernel  # noqa: E402

from .test_triton_kernel import FIELDS, assert_matches, assert_same, random_qk  # noqa: E402


def reference(q, k, prompt, h_lo, h_hi, **variant):
    scale = q.shape[-1] ** -0.5
    return span_stats_reference(q.double(), k.double(), prompt, 10, h_lo, h_hi, scale, **variant)


def folded_and_columns(q, k, cu, prompts, h_lo, h_hi, **kw):
    args = (q.float(), k.float(), cu, prompts, 10, h_lo, h_hi)
    fold = triton_kernel.span_stats_packed(*args, band="fold", **kw)
    cols = triton_kernel.span_stats_packed(*args, **kw)
    return fold, cols


# (h_lo, h_hi) with 16-row blocks: 1 slot (h_hi = h_lo), 2 slots, 4 slots (wider than 3
# blocks), h_lo = 0 (the diagonal counts).
HORIZONS = [(10, 10), (10, 20), (10, 60), (0, 40)]


@pytest.mark.parametrize("h_lo,h_hi", HORIZONS)
@pytest.mark.parametrize("n,prompt", [(70, 1), (70, 69), (70, 65), (130, 40)])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 2), (3, 1)])
def test_fold_matches_reference_and_column_pass(interpret, h_lo, h_hi, n, prompt, hq, hkv):
    q, k = random_qk(hq, hkv, n, 16, seed=n + prompt + h_hi)
    (fold,), (cols,) = folded_and_columns(
        q, k, [0, n], [prompt], h_lo, h_hi, block_m=16, block_n=16
    )
    assert_matches(fold, reference(q, k, prompt, h_lo, h_hi), 1e-4)
    assert_same(fold, cols)


@pytest.mark.parametrize("h_lo,h_hi", [(10, 100), (10, 20)])
def test_fold_unequal_lengths_default_tiles(interpret, h_lo, h_hi):
    # Response 1, prompt 1, response 3 < h_lo, sequences spanning several blocks: a block
    # must never write into a neighbouring sequence's columns.
    lengths, prompts = [40, 17, 75, 33, 90], [39, 1, 5, 30, 2]
    cu = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    q, k = random_qk(8, 2, cu[-1], 16, seed=5)
    fold, cols = folded_and_columns(q, k, cu, prompts, h_lo, h_hi)
    for b, (lo, hi) in enumerate(zip(cu[:-1], cu[1:], strict=True)):
        ref = reference(q[:, lo:hi], k[:, lo:hi], prompts[b], h_lo, h_hi)
        assert_matches(fold[b], ref, 1e-4)
        assert_same(fold[b], cols[b])


def test_fold_model_true_attention(interpret):
    q, k = random_qk(4, 2, 90, 16, seed=8)
    sinks = torch.linspace(-1.0, 2.0, 4, dtype=torch.float64)
    for kw in ({"softcap": 5.0}, {"softcap": 5.0, "sinks": sinks, "sliding_window": 24}):
        args = {n: v.float() if n == "sinks" else v for n, v in kw.items()}
        (got,) = triton_kernel.span_stats_packed(
            q.float(), k.float(), [0, 90], [4], 10, 10, 40, 0.25, block_m=16, block_n=16,
            band="fold", **args,
        )  # fmt: skip
        ref = span_stats_reference(q, k, 4, 10, 10, 40, 0.25, **kw)
        assert_matches(got, ref, 1e-4)


def test_fold_bf16_inputs_and_repeated_runs(interpret):
    q, k = random_qk(4, 2, 64, 16, seed=9)
    qb, kb = q.bfloat16(), k.bfloat16()
    plan = triton_kernel.plan_packed(qb, kb, [0, 64], [3], band="fold")
    plan.run()
    (first,) = plan.collect()
    first = {f: getattr(first, f).clone() for f in FIELDS}
    assert_matches(plan.collect()[0], reference(qb, kb, 3, 10, 100), 1e-4)
    plan.run()  # the partial sums are zeroed once: a second run must give the same numbers
    (again,) = plan.collect()
    for f in FIELDS:
        assert torch.equal(getattr(again, f), first[f]), f


def test_fold_refuses_what_it_cannot_do(interpret):
    q, k = random_qk(4, 2, 40, 16, seed=1)
    args = (q.float(), k.float(), [0, 40], [5])
    with pytest.raises(ValueError, match="finite h_hi"):
        triton_kernel.plan_packed(*args, h_hi=None, band="fold")
    with pytest.raises(ValueError, match="gqa_pack"):
        triton_kernel.plan_packed(*args, band="fold", gqa_pack=True)
    with pytest.raises(ValueError, match="'columns' or 'fold'"):
        triton_kernel.plan_packed(*args, band="rows")


def test_fold_plan_shape(interpret):
    q, k = random_qk(4, 2, 100, 16, seed=1)
    plan = triton_kernel.plan_packed(
        q.float(), k.float(), [0, 100], [10], h_lo=10, h_hi=60, block_m=16, band="fold"
    )
    assert plan.row.options["FOLD_BAND"] is True
    assert isinstance(plan.col, triton_kernel.FoldedFai)
    # 1 + ceil((h_hi - h_lo) / 16) slots; the row stride padded to a multiple of 16
    assert plan.col.part.shape == (4, 1 + -(-50 // 16), 112)
    plain = triton_kernel.plan_packed(q.float(), k.float(), [0, 100], [10])
    assert "FOLD_BAND" not in plain.row.options and isinstance(plain.col, triton_kernel.Launch)
