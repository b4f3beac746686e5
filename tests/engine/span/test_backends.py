"""Every CPU backend of span_stats against the materialised-attention oracle (SPEC.md)."""

from __future__ import annotations

import pytest
import torch

from anchorcredit.engine import span_stats
from anchorcredit.engine.span.chunked import span_stats_chunked
from anchorcredit.engine.span.reference import attention_matrix, stats_from_attention

# (Hq, Hkv, N, prompt_len, h_hi): GQA, prompt 1, response 1, response shorter than h_lo,
# horizon to the end, a short horizon, and a few hundred tokens.
CASES = [
    (4, 2, 60, 1, 100),
    (2, 1, 40, 39, 100),
    (3, 3, 25, 18, 100),
    (6, 2, 300, 40, None),
    (4, 1, 130, 7, 20),
    (8, 4, 257, 100, 100),
    (2, 2, 12, 1, None),
    (4, 2, 400, 30, 100),  # the narrow-band (gathered diagonals) FAI path with SPEC defaults
]


def random_qk(hq: int, hkv: int, n: int, d: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    # A spread of score magnitudes so some heads are sharp and some flat.
    q = torch.randn(hq, n, d, generator=gen, dtype=dtype) * torch.linspace(0.3, 3.0, hq)[
        :, None, None
    ].to(dtype)
    k = torch.randn(hkv, n, d, generator=gen, dtype=dtype)
    return q, k


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    # atol relative to the statistic's own scale (FAI ~1e-2, spans ~1e2): never absolute.
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * float(expected.abs().max()))


@pytest.mark.parametrize("hq,hkv,n,prompt_len,h_hi", CASES)
@pytest.mark.parametrize("block_elements", [None, 97])  # 97: many tiny, ragged row blocks
def test_chunked_matches_reference_float64(hq, hkv, n, prompt_len, h_hi, block_elements):
    q, k = random_qk(hq, hkv, n, 16, torch.float64, seed=n * 31 + hq)
    ref = span_stats(q, k, prompt_len, h_hi=h_hi, backend="reference")
    if block_elements is None:
        got = span_stats(q, k, prompt_len, h_hi=h_hi, backend="chunked")
    else:
        got = span_stats_chunked(q, k, prompt_len, 10, 10, h_hi, 16**-0.5, block_elements)
    for field in ("span", "waad", "fai"):
        assert_close(getattr(got, field), getattr(ref, field), 1e-6)


@pytest.mark.parametrize("hq,hkv,n,prompt_len,h_hi", CASES[:4])
def test_chunked_matches_reference_float32(hq, hkv, n, prompt_len, h_hi):
    q, k = random_qk(hq, hkv, n, 16, torch.float64, seed=7 + n)
    ref = span_stats(q, k, prompt_len, h_hi=h_hi, backend="reference")
    got = span_stats(q.float(), k.float(), prompt_len, h_hi=h_hi, backend="chunked")
    assert got.waad.dtype == torch.float32
    for field in ("span", "waad", "fai"):
        assert_close(getattr(got, field).double(), getattr(ref, field), 1e-4)


def test_bfloat16_inputs_accumulate_in_float32():
    q, k = random_qk(4, 2, 80, 16, torch.float64, seed=3)
    ref = span_stats(q.bfloat16().double(), k.bfloat16().double(), 5, backend="reference")
    got = span_stats(q.bfloat16(), k.bfloat16(), 5, backend="chunked")
    assert got.fai.dtype == torch.float32
    assert_close(got.waad.double(), ref.waad, 1e-4)


@pytest.mark.parametrize("window,h_lo,h_hi", [(1, 0, 0), (0, 3, 5), (25, 1, None), (10, 50, 60)])
def test_other_parameters(window, h_lo, h_hi):
    q, k = random_qk(4, 2, 90, 8, torch.float64, seed=window + h_lo)
    ref = span_stats(q, k, 9, window=window, h_lo=h_lo, h_hi=h_hi, backend="reference")
    got = span_stats(q, k, 9, window=window, h_lo=h_lo, h_hi=h_hi, backend="chunked")
    for field in ("span", "waad", "fai"):
        assert_close(getattr(got, field), getattr(ref, field), 1e-6)


def test_custom_scale_is_used():
    q, k = random_qk(2, 1, 50, 8, torch.float64, seed=11)
    a = span_stats(q, k, 3, scale=0.05, backend="chunked")
    b = span_stats(q * 0.05 * 8**0.5, k, 3, backend="chunked")  # same scores, default scale
    assert_close(a.waad, b.waad, 1e-9)
    assert not torch.allclose(a.waad, span_stats(q, k, 3, backend="chunked").waad)


def test_response_shorter_than_h_lo_has_zero_fai():
    q, k = random_qk(2, 1, 30, 8, torch.float64, seed=5)
    got = span_stats(q, k, 22, backend="chunked")  # R = 8 < h_lo = 10: every T(s) is empty
    assert got.fai.shape == (2, 8)
    assert torch.count_nonzero(got.fai) == 0
    # With R > h_lo only the last h_lo positions are empty.
    got = span_stats(q, k, 5, backend="chunked")
    assert torch.count_nonzero(got.fai[:, -10:]) == 0
    assert bool((got.fai[:, :-10] > 0).all())


def test_hand_checked_two_token_attention():
    # One head, N=3, all scores equal: uniform causal attention A[t, s] = 1/(t+1).
    q = torch.zeros(1, 3, 4, dtype=torch.float64)
    k = torch.zeros(1, 3, 4, dtype=torch.float64)
    for backend in ("reference", "chunked"):
        s = span_stats(q, k, 1, window=1, h_lo=1, h_hi=1, backend=backend)
        # rows t=1: distances {1,0} -> mean 0.5; t=2: {2,1,0} -> mean 1. span = 0.75
        assert float(s.span[0]) == pytest.approx(0.75)
        # WAAD with W=1: t=1 -> 1/2*1 ; t=2 -> 2/3*1
        assert s.waad[0].tolist() == pytest.approx([0.5, 2 / 3])
        # FAI, h_lo=h_hi=1: s=1 -> T={2}: A[2,1] = 1/3 ; s=2 -> T empty -> 0
        assert s.fai[0].tolist() == pytest.approx([1 / 3, 0.0])


def test_fai_is_linear_over_heads():
    """The mean of per-head FAI equals FAI of the head-averaged attention (SPEC Abar_glob)."""
    q, k = random_qk(4, 2, 70, 8, torch.float64, seed=9)
    per_head = span_stats(q, k, 6, backend="chunked")
    attn = attention_matrix(q, k, 8**-0.5).mean(0, keepdim=True)
    pooled = stats_from_attention(attn, 6, 10, 10, 100)
    assert_close(per_head.fai.mean(0), pooled.fai[0], 1e-9)
    assert_close(per_head.waad.mean(0), pooled.waad[0], 1e-9)
