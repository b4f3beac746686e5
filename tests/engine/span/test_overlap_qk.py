"""The pipelined QK^T (overlap_qk, issue 16 item 6): the next tile's dot issued before the
current softmax, in the row pass's bulk loop and the column pass's to-the-end loop.

Under TRITON_INTERPRET=1: the same numbers as the float64 reference and as the sequential
kernel, on the edge cases (no bulk tile at all, one, many; prompt length 1, response 1,
responses shorter than h_lo, unequal packed lengths, GQA, model-true attention). The rule
that picks it per pass and GPU. And, where Triton ships ptxas, the claim it rests on, read
from the sm_90 cubin: exp2s issue while the wgmma is in flight, with registers low enough
for two programs an SM. Its timing needs a GPU (bench/gpu_suite.sh)."""

from __future__ import annotations

import pytest
import torch

from anchorcredit.engine.span.reference import span_stats_reference

triton = pytest.importorskip("triton")
from anchorcredit.engine.span import aot, benchmark, triton_kernel  # noqa: E402

from .test_triton_kernel import assert_matches, assert_same, random_qk, reference  # noqa: E402


def overlapped_and_sequential(q, k, cu, prompts, **kw):
    args = (q.float(), k.float(), cu, prompts)
    on = triton_kernel.span_stats_packed(*args, overlap_qk=True, **kw)
    off = triton_kernel.span_stats_packed(*args, overlap_qk=False, **kw)
    return on, off


# (n, prompt): the first query blocks have no bulk tile (split == first), the last many;
# prompt length 1; response length 1; a response of 5 < h_lo.
@pytest.mark.parametrize("n,prompt", [(70, 1), (70, 69), (70, 65), (130, 40)])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 2), (3, 1)])
@pytest.mark.parametrize("h_hi", [100, None, 12])
def test_overlap_matches_reference_and_sequential(interpret, n, prompt, hq, hkv, h_hi):
    q, k = random_qk(hq, hkv, n, 16, seed=n + prompt + hq)
    (on,), (off,) = overlapped_and_sequential(
        q, k, [0, n], [prompt], h_hi=h_hi, block_m=16, block_n=16
    )
    assert_matches(on, reference(q, k, prompt, h_hi=h_hi), 1e-4)
    assert_same(on, off)


@pytest.mark.parametrize("gqa_pack", [False, True])
@pytest.mark.parametrize("h_hi", [100, None])
def test_overlap_unequal_lengths(interpret, gqa_pack, h_hi):
    # Response 1, prompt 1, response 3 < h_lo, one sequence spanning several blocks.
    lengths, prompts = [40, 17, 75, 33], [39, 1, 5, 30]
    cu = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    q, k = random_qk(8, 2, cu[-1], 16, seed=5)
    on, off = overlapped_and_sequential(q, k, cu, prompts, h_hi=h_hi, gqa_pack=gqa_pack)
    for b, (lo, hi) in enumerate(zip(cu[:-1], cu[1:], strict=True)):
        ref = reference(q[:, lo:hi], k[:, lo:hi], prompts[b], h_hi=h_hi)
        assert_matches(on[b], ref, 1e-4)
        assert_same(on[b], off[b])


@pytest.mark.parametrize("h_hi", [100, None])
def test_overlap_model_true_attention(interpret, h_hi):
    q, k = random_qk(4, 2, 90, 16, seed=8)
    sinks = torch.linspace(-1.0, 2.0, 4, dtype=torch.float64)
    for kw in ({"softcap": 5.0}, {"softcap": 5.0, "sinks": sinks, "sliding_window": 24}):
        got = {
            overlap: triton_kernel.span_stats_packed(
                q.float(), k.float(), [0, 90], [4], 10, 10, h_hi, 0.25, block_m=16,
                block_n=16, overlap_qk=overlap,
                **{n: v.float() if n == "sinks" else v for n, v in kw.items()},
            )[0]
            for overlap in (True, False)
        }  # fmt: skip
        ref = span_stats_reference(q, k, 4, 10, 10, h_hi, 0.25, **kw)
        assert_matches(got[True], ref, 1e-4)
        assert_same(got[True], got[False])


def test_overlap_bf16_inputs(interpret):
    q, k = random_qk(4, 2, 64, 16, seed=9)
    qb, kb = q.bfloat16(), k.bfloat16()
    for h_hi in (100, None):
        (got,) = triton_kernel.span_stats_packed(qb, kb, [0, 64], [3], h_hi=h_hi, overlap_qk=True)
        assert_matches(got, reference(qb, kb, 3, h_hi=h_hi), 1e-4)


# ---- which launches get it -------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype,capability,block_d,row,col",
    [
        (torch.bfloat16, (9, 0), 128, True, True),
        (torch.float16, (9, 0), 64, True, False),  # the column pass would lose a program/SM
        (torch.bfloat16, (9, 0), 256, False, False),
        (torch.bfloat16, (10, 0), 128, True, True),
        (torch.bfloat16, (8, 0), 128, False, False),  # mma.sync: no overlap, 250 registers
        (torch.float32, (9, 0), 128, False, False),  # IEEE fp32 dots are not wgmma
        (torch.bfloat16, None, 128, False, False),  # not a CUDA device
    ],
)
def test_default_overlap_rule(dtype, capability, block_d, row, col):
    assert triton_kernel.default_overlap(dtype, capability, block_d) == {"row": row, "col": col}


def _plan(h_hi=None, d=128, dtype=torch.bfloat16, **kw):
    q = torch.zeros(4, 300, d, dtype=dtype)
    k = torch.zeros(2, 300, d, dtype=dtype)
    return triton_kernel.plan_packed(q, k, [0, 300], [20], h_hi=h_hi, check_finite=False, **kw)


def _on(plan) -> tuple[bool, bool]:
    return "OVERLAP_QK" in plan.row.options, "OVERLAP_QK" in plan.col.options


def test_plan_picks_overlap_per_pass_and_target(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert _on(_plan()) == (False, False)  # CPU tensors, no target: the launch binds as before
    assert _on(_plan(capability=(9, 0))) == (True, True)
    assert _on(_plan(h_hi=100, capability=(9, 0))) == (True, False)  # band: nothing to overlap
    assert _on(_plan(d=256, capability=(9, 0))) == (False, False)
    assert _on(_plan(capability=(8, 0))) == (False, False)
    assert _on(_plan(capability=(9, 0), overlap_qk=False)) == (False, False)
    assert _on(_plan(overlap_qk=True)) == (True, True)  # explicit: on for any target
    assert _on(_plan(dtype=torch.float32, capability=(9, 0))) == (False, False)


def test_benchmark_rows_without_overlap(interpret):
    args = benchmark.parse_args(["--device", "cuda", "--overlap-off"])
    assert args.overlap_off
    cfg = {**benchmark.config_for("cuda", args), "h_hi": None}
    q, k = random_qk(4, 2, 48, 16, seed=2)
    plan_run = benchmark.stats_fn("triton_kernel_nooverlap", q.float(), k.float(), 5, cfg)
    assert plan_run.__self__.row.options.get("OVERLAP_QK") is None
    got = benchmark.stats_fn("triton_nooverlap", q.float(), k.float(), 5, cfg)()
    assert_matches(got, reference(q, k, 5, h_hi=None), 1e-4)


# ---- the cubin: exp2 under the wgmma ----------------------------------------------------


def test_exp2_under_mma_reader():
    issued_early = ["MUFU.EX2 R1, R2", "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ",
                    "MUFU.EX2 R3, R4", "MUFU.EX2 R5, R6", "WARPGROUP.DEPBAR.LE gsb0, 0x0",
                    "BRA 0x100"]  # fmt: skip
    awaited_at_once = ["HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ",
                       "WARPGROUP.DEPBAR.LE gsb0, 0x0", "MUFU.EX2 R1, R2", "BRA 0x100"]  # fmt: skip
    # Issued late, awaited in the next iteration: the exp2s before it count too (around).
    carried = ["MUFU.EX2 R1, R2", "WARPGROUP.DEPBAR.LE gsb0, 0x0", "MUFU.EX2 R3, R4",
               "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ", "MUFU.EX2 R5, R6",
               "BRA 0x100"]  # fmt: skip
    assert aot.exp2_under_mma(issued_early) == 2
    assert aot.exp2_under_mma(awaited_at_once) == 0
    assert aot.exp2_under_mma(carried) == 2
    assert aot.exp2_under_mma(["HMMA.16816.F32.BF16 R4, R8, R12, R4", "MUFU.EX2 R1, R2"]) is None


@pytest.mark.skipif(
    not aot.toolchain_present(), reason="triton's bundled ptxas/cuobjdump are not installed"
)
@pytest.mark.parametrize("pass_,horizon", [("row", "band"), ("col", "end")])
def test_sm90_default_runs_exp2_under_the_wgmma(monkeypatch, pass_, horizon):
    """The runner's launch on Hopper (bf16, d=128) pipelines its bulk loop: exp2s issue while
    the next tile's wgmma is in flight (0 without it), no spills, and <= 128 registers, so
    two 8-warp programs still share an SM as they did sequentially."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    bulk = 0 if pass_ == "row" else 1  # the row pass's first loop; the column pass's second
    got = {}
    for overlap in (None, False):  # None: the default a launch on sm_90 gets
        config = aot.Config(90, torch.bfloat16, 128, pass_, horizon, "plain", overlap=overlap)
        got[overlap] = aot.resources(config)
    on, off = got[None], got[False]
    assert on.launch.options.get("OVERLAP_QK") and not off.launch.options.get("OVERLAP_QK")
    assert on.loops[bulk].exp2_under_mma > 0, aot.row(on)
    assert off.loops[bulk].exp2_under_mma == 0, aot.row(off)
    assert on.spill_bytes == 0 and on.registers <= 128, aot.row(on)
