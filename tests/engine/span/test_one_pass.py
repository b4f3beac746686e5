"""The one-pass path (kernel_lse.py): span, WAAD and FAI from a row LSE computed elsewhere.

Under TRITON_INTERPRET=1, on fresh random inputs: against the float64 reference with the
exact LSE (GQA, prompt length 1, response length 1, responses shorter than h_lo, unequal
packed lengths, other horizons and windows, model-true attention, bf16 inputs), against
today's two-pass kernel fed its own row LSE (equal to fp32 rounding), the offset form of the
span 8K tokens into a sequence (where t * sum p - s * sum p cancels), and when the path is
taken.
"""

from __future__ import annotations

import pytest
import torch

from anchorcredit.engine.span.chunked import span_stats_chunked
from anchorcredit.engine.span.reference import span_stats_reference

triton = pytest.importorskip("triton")
from anchorcredit.engine.span import kernel_lse, triton_kernel  # noqa: E402

from .test_triton_kernel import assert_matches, assert_same, random_qk, rel_err  # noqa: E402


def exact_lse(q, k, cu, scale, *, softcap=None, sinks=None, sliding_window=None):
    """The layer's row log-sum-exp (natural log, float64) of every position, as the model's
    attention returns it: scaled scores, soft-capped, masked, a sink in the denominator."""
    hq, n, _ = q.shape
    group = hq // k.shape[0]
    out = torch.empty(hq, n, dtype=torch.float64)
    for a, b in zip(cu[:-1], cu[1:], strict=True):
        kk = k[:, a:b].double().repeat_interleave(group, 0)
        s = torch.einsum("hid,hjd->hij", q[:, a:b].double(), kk) * scale
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        pos = torch.arange(b - a)
        dist = pos[:, None] - pos[None, :]
        hidden = dist < 0
        if sliding_window is not None:
            hidden |= dist >= sliding_window
        s = s.masked_fill(hidden, float("-inf"))
        if sinks is not None:
            s = torch.cat([s, sinks.double()[:, None, None].expand(hq, b - a, 1)], -1)
        out[:, a:b] = torch.logsumexp(s, -1)
    return out


def reference(q, k, prompt, window=10, h_lo=10, h_hi=None, scale=None, **variant):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return span_stats_reference(q.double(), k.double(), prompt, window, h_lo, h_hi, scale,
                                **variant)  # fmt: skip


def one_pass(q, k, cu, prompts, window=10, h_lo=10, h_hi=None, **kw):
    variant = {n: kw[n] for n in ("softcap", "sinks", "sliding_window") if n in kw}
    lse = exact_lse(q, k, cu, q.shape[-1] ** -0.5, **variant).float()
    return triton_kernel.span_stats_packed(q, k, cu, prompts, window, h_lo, h_hi, lse=lse, **kw)


# (Hq, Hkv, N, prompt_len, h_hi, block): GQA with prompt length 1, response length 1,
# response shorter than h_lo, a short horizon (one_pass=True), N around a block edge.
SINGLE = [
    (4, 2, 60, 1, None, 16),
    (2, 1, 40, 39, None, 16),
    (3, 3, 25, 18, None, 16),
    (4, 1, 130, 7, 20, 32),
    (2, 2, 33, 16, None, 16),
    (4, 2, 160, 30, None, 32),
]


@pytest.mark.parametrize("hq,hkv,n,prompt,h_hi,block", SINGLE)
def test_one_pass_matches_reference(interpret, hq, hkv, n, prompt, h_hi, block):
    q, k = random_qk(hq, hkv, n, 16, seed=n * 7 + hq)
    (got,) = one_pass(q.float(), k.float(), [0, n], [prompt], h_hi=h_hi, one_pass=True,
                      block_m=block, block_n=block)  # fmt: skip
    assert_matches(got, reference(q, k, prompt, h_hi=h_hi), 1e-4)


@pytest.mark.parametrize("h_hi", [None, 30])
def test_one_pass_unequal_packed_lengths(interpret, h_hi):
    # Response 1, prompt 1, response 3 < h_lo, sequences over several tiles; the default
    # (interpreter) tiles.
    lengths, prompts = [40, 17, 75, 33, 90], [39, 1, 5, 30, 64]
    cu = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    q, k = random_qk(4, 2, cu[-1], 16, seed=11)
    got = one_pass(q.float(), k.float(), cu, prompts, h_hi=h_hi, one_pass=True)
    assert len(got) == len(lengths) and got.waad.shape == (4, sum(lengths) - sum(prompts))
    for b, (lo, hi) in enumerate(zip(cu[:-1], cu[1:], strict=True)):
        assert_matches(got[b], reference(q[:, lo:hi], k[:, lo:hi], prompts[b], h_hi=h_hi), 1e-4)


@pytest.mark.parametrize("window,h_lo,h_hi", [(0, 0, None), (1, 3, 5), (25, 1, None), (40, 50, 60)])
def test_one_pass_other_parameters(interpret, window, h_lo, h_hi):
    q, k = random_qk(2, 1, 90, 16, seed=window + h_lo)
    (got,) = one_pass(q.float(), k.float(), [0, 90], [9], window, h_lo, h_hi, one_pass=True)
    assert_matches(got, reference(q, k, 9, window, h_lo, h_hi), 1e-4)


@pytest.mark.parametrize("h_hi", [None, 40])
def test_one_pass_model_true_attention(interpret, h_hi):
    q, k = random_qk(4, 2, 90, 16, seed=8)
    sinks = torch.linspace(-1.0, 2.0, 4, dtype=torch.float64)
    for kw in ({"softcap": 5.0}, {"softcap": 5.0, "sinks": sinks, "sliding_window": 24},
               {"sliding_window": 7}):  # fmt: skip
        args = {n: v.float() if n == "sinks" else v for n, v in kw.items()}
        (got,) = one_pass(q.float(), k.float(), [0, 90], [4], h_hi=h_hi, one_pass=True, **args)
        assert_matches(got, reference(q, k, 4, h_hi=h_hi, **kw), 1e-4)


def test_one_pass_bf16_inputs(interpret):
    q, k = random_qk(4, 2, 64, 16, seed=9)
    qb, kb = q.bfloat16(), k.bfloat16()
    (got,) = one_pass(qb, kb, [0, 64], [3])
    assert_matches(got, reference(qb, kb, 3), 1e-4)


@pytest.mark.parametrize("h_hi", [None, 30])
def test_one_pass_equals_the_two_pass_kernel(interpret, h_hi):
    """Fed the row pass's own LSE (base 2), the one-pass path gives today's numbers."""
    lengths, prompts = [70, 1 + 33, 50], [1, 30, 12]
    cu = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    q, k = random_qk(4, 2, cu[-1], 16, seed=4)
    q, k = q.float(), k.float()
    two = triton_kernel.plan_packed(q, k, cu, prompts, h_hi=h_hi)
    two.run()
    lse2 = two.lse[:, : cu[-1]].clone()
    one = triton_kernel.plan_packed(q, k, cu, prompts, h_hi=h_hi, lse=lse2, lse_base="2",
                                    one_pass=True)  # fmt: skip
    one.run()
    for a, b in zip(two.collect(), one.collect(), strict=True):
        assert_same(a, b)


def test_span_offset_form_does_not_cancel_far_into_a_sequence(interpret):
    """A local head 8K tokens into its sequence: the span (a few tokens) from column sums
    keeps its digits. Control: the same column sums in the naive fp32 form,
    sum_t p t - s sum_t p, lose them (t ~ 8K against a span of a few)."""
    n, prompt, d = 8192, 8192 - 24, 16
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(1, n, d, generator=gen, dtype=torch.float64)
    k[:, : n - 100] *= 0.001  # the prompt's keys are faint: the head looks at recent tokens
    q = 8.0 * k + 0.1 * torch.randn(1, n, d, generator=gen, dtype=torch.float64)
    got = one_pass(q.float(), k.float(), [0, n], [prompt], block_m=128, block_n=128)[0]
    ref = span_stats_chunked(q, k, prompt, 10, 10, None, d**-0.5)
    assert 0.5 < float(ref.span[0]) < 5.0  # a local head: a few tokens
    assert_matches(got, ref, 1e-4)
    err = rel_err(got.span, ref.span)
    print(f"span {float(ref.span[0]):.3f}, relative error {err:.1e}")
    assert err < 3e-6
    # The naive form on the exact probabilities rounded to fp32 (torch's pairwise sums,
    # kinder than a kernel's running sum): an error several times larger.
    scores = (q[0, prompt:] @ k[0].T) * d**-0.5
    scores[torch.arange(n)[None, :] > torch.arange(prompt, n)[:, None]] = float("-inf")
    p = torch.softmax(scores, -1).float()
    t = torch.arange(prompt, n, dtype=torch.float32)[:, None]
    naive = ((p * t).sum(0) - torch.arange(n, dtype=torch.float32) * p.sum(0)).sum() / 24
    assert abs(float(naive) - float(ref.span[0])) / float(ref.span[0]) > 10 * err


def test_which_path_runs(interpret):
    q, k = random_qk(4, 2, 50, 16, seed=1)
    q, k = q.float(), k.float()
    lse = torch.zeros(4, 50)
    args = (q, k, [0, 50], [5])
    end = triton_kernel.plan_packed(*args, h_hi=None, lse=lse)
    band = triton_kernel.plan_packed(*args, h_hi=100, lse=lse)
    kernels = triton_kernel.kernels()
    assert end.one_pass and [x.kernel for x in end.launches] == [kernels["waad"], kernels["lse"]]
    assert not band.one_pass and band.row.kernel is kernels["row"]  # default: h_hi=end only
    assert triton_kernel.plan_packed(*args, h_hi=100, lse=lse, one_pass=True).one_pass
    assert not triton_kernel.plan_packed(*args, h_hi=None, lse=lse, one_pass=False).one_pass
    assert not triton_kernel.plan_packed(*args, h_hi=None).one_pass
    with pytest.raises(ValueError, match="needs the row LSE"):
        triton_kernel.plan_packed(*args, h_hi=None, one_pass=True)
    with pytest.raises(ValueError, match=r"lse must be \[Hq, total_N\]"):
        triton_kernel.plan_packed(*args, h_hi=None, lse=torch.zeros(50, 4))
    with pytest.raises(ValueError, match="two-pass path"):
        triton_kernel.plan_packed(*args, h_hi=None, lse=lse, gqa_pack=True)
    with pytest.raises(ValueError, match="lse_base"):
        triton_kernel.plan_packed(*args, h_hi=None, lse=lse, lse_base="10")
    assert kernel_lse.lse_pass.__name__ == "lse_pass"


# ---- GPU: bf16 with the LSE of torch's flash attention, as the runner captures it ---------


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1024, 8192, 32768])
def test_gpu_one_pass_with_the_flash_lse_matches_float64(n):
    """The LSE from torch's varlen flash kernel (capture.packed_causal_attention, the
    runner's call; its layout [Hq, T] checked here) drives the one-pass path: bf16 against
    the float64 oracle, and against the two-pass kernel."""
    from anchorcredit.runner.capture import CaptureState, packed_causal_attention

    from .test_triton_kernel import oracle_float64

    hq, hkv, d, prompt = 4, 2, 128, n // 4
    q, k = random_qk(hq, hkv, n, d, seed=n, device="cuda")
    qb, kb = q.bfloat16(), k.bfloat16()
    v = torch.randn_like(kb)
    state = CaptureState([0, n], frozenset(), lambda *a: None)
    _, lse = packed_causal_attention(qb[None], kb[None], v[None], state, d**-0.5, with_lse=True)
    assert lse is not None and lse.shape == (hq, n) and lse.dtype == torch.float32
    (got,) = triton_kernel.span_stats_packed(qb, kb, [0, n], [prompt], h_hi=None, lse=lse)
    assert_matches(got, oracle_float64(qb, kb, prompt, None), 2e-3)
    (two,) = triton_kernel.span_stats_packed(qb, kb, [0, n], [prompt], h_hi=None)
    for field in ("span", "waad", "fai"):
        assert rel_err(getattr(got, field), getattr(two, field)) <= 1e-3, field
