"""Model-true attention in the statistics: soft-capping, sinks, sliding windows (every backend).

The reference is checked against a brute force written from SPEC.md and transformers' eager
attention (Gemma 2 soft-capping, gpt-oss sinks, `kv_idx > q_idx - sliding_window`) with plain
Python loops in float64; chunked and the Triton kernel (interpreted on the CPU) are checked
against the reference, with GQA, prompt length 1, response length 1, R < h_lo and sequences
longer than the window.
"""

from __future__ import annotations

import math

import pytest
import torch

from anchorcredit.engine import span_stats, span_stats_packed
from anchorcredit.engine.span.chunked import span_stats_chunked
from anchorcredit.engine.span.reference import relative_error, span_stats_reference

FIELDS = ("span", "waad", "fai")
# (softcap, sinks?, sliding_window)
VARIANTS = [
    (5.0, False, None),
    (None, True, None),
    (None, False, 7),
    (None, False, 1),
    (2.0, True, 12),
    (None, True, 3),
]


def random_qk(hq, hkv, n, d, seed):
    gen = torch.Generator().manual_seed(seed)
    sharp = torch.linspace(0.3, 3.0, hq, dtype=torch.float64)[:, None, None]
    q = torch.randn(hq, n, d, generator=gen, dtype=torch.float64) * sharp
    k = torch.randn(hkv, n, d, generator=gen, dtype=torch.float64)
    sinks = torch.randn(hq, generator=gen, dtype=torch.float64) * 2.0
    return q, k, sinks


def brute_force(q, k, prompt_len, window, h_lo, h_hi, scale, softcap, sinks, slide):
    """SPEC.md literally, one row at a time, from the layer's true probabilities."""
    hq, n, _ = q.shape
    group = hq // k.shape[0]
    r = n - prompt_len
    span = torch.zeros(hq, dtype=torch.float64)
    waad = torch.zeros(hq, r, dtype=torch.float64)
    fai = torch.zeros(hq, r, dtype=torch.float64)
    for h in range(hq):
        a = torch.zeros(n, n, dtype=torch.float64)
        for t in range(n):
            keys = [s for s in range(t + 1) if slide is None or t - s < slide]
            logits = []
            for s in keys:
                x = float(q[h, t] @ k[h // group, s]) * scale
                if softcap is not None:
                    x = softcap * math.tanh(x / softcap)
                logits.append(x)
            extra = [] if sinks is None else [float(sinks[h])]
            m = max(logits + extra)
            denom = sum(math.exp(x - m) for x in logits + extra)
            for s, x in zip(keys, logits, strict=True):
                a[t, s] = math.exp(x - m) / denom
        for i, t in enumerate(range(prompt_len, n)):
            span[h] += sum(a[t, s] * (t - s) for s in range(t + 1)) / r
            waad[h, i] = sum(a[t, s] * min(t - s, window) for s in range(t + 1))
        for i, s in enumerate(range(prompt_len, n)):
            hi = n - 1 if h_hi is None else min(n - 1, s + h_hi)
            targets = list(range(s + h_lo, hi + 1))
            if targets:
                fai[h, i] = sum(a[t, s] for t in targets) / len(targets)
    return span, waad, fai


@pytest.mark.parametrize("softcap,with_sinks,slide", VARIANTS)
@pytest.mark.parametrize("prompt_len,n,h_hi", [(1, 24, 100), (9, 30, 6), (23, 24, None)])
def test_reference_matches_brute_force(softcap, with_sinks, slide, prompt_len, n, h_hi):
    q, k, sinks = random_qk(4, 2, n, 8, seed=n + prompt_len)
    sinks = sinks if with_sinks else None
    scale = 0.4
    got = span_stats_reference(q, k, prompt_len, 4, 3, h_hi, scale, softcap=softcap,
                               sinks=sinks, sliding_window=slide)  # fmt: skip
    want = brute_force(q, k, prompt_len, 4, 3, h_hi, scale, softcap, sinks, slide)
    for field, w in zip(FIELDS, want, strict=True):
        torch.testing.assert_close(getattr(got, field), w, rtol=0, atol=1e-12)


def test_variants_change_the_numbers():
    # Not a no-op: each option moves the statistics away from plain causal attention.
    q, k, sinks = random_qk(4, 2, 40, 8, seed=3)
    plain = span_stats_reference(q, k, 5, 10, 10, 100, 0.5)
    for kw in ({"softcap": 1.0}, {"sinks": sinks}, {"sliding_window": 6}):
        other = span_stats_reference(q, k, 5, 10, 10, 100, 0.5, **kw)
        assert not torch.allclose(other.waad, plain.waad), kw
    # A window holding the whole sequence is plain causal attention.
    same = span_stats(q, k, 5, scale=0.5, backend="chunked", sliding_window=40)
    torch.testing.assert_close(same.fai, plain.fai, rtol=0, atol=1e-12)


# (Hq, Hkv, N, prompt_len, h_hi): GQA, P=1, R=1, R < h_lo, sequences longer than the window.
SHAPES = [(4, 2, 70, 1, 100), (2, 1, 40, 39, 100), (3, 3, 45, 40, 100), (4, 1, 130, 7, None)]


@pytest.mark.parametrize("softcap,with_sinks,slide", VARIANTS)
@pytest.mark.parametrize("hq,hkv,n,prompt_len,h_hi", SHAPES)
def test_chunked_matches_reference(softcap, with_sinks, slide, hq, hkv, n, prompt_len, h_hi):
    q, k, sinks = random_qk(hq, hkv, n, 16, seed=n)
    kw = dict(softcap=softcap, sinks=sinks[:hq] if with_sinks else None, sliding_window=slide)
    ref = span_stats_reference(q, k, prompt_len, 10, 10, h_hi, 0.25, **kw)
    # A small block budget: several row blocks per sequence.
    got = span_stats_chunked(q, k, prompt_len, 10, 10, h_hi, 0.25, block_elements=hq * n * 8,
                             **kw)  # fmt: skip
    for field in FIELDS:
        torch.testing.assert_close(getattr(got, field), getattr(ref, field), rtol=0, atol=1e-10)
    got32 = span_stats_chunked(q.float(), k.float(), prompt_len, 10, 10, h_hi, 0.25, **kw)
    for field in FIELDS:
        err = (getattr(got32, field).double() - getattr(ref, field)).abs().max()
        assert float(err) <= 1e-4, field


def test_packed_front_passes_the_variant_per_layer():
    lengths, prompts = [40, 17, 75], [39, 1, 5]
    q, k, sinks = random_qk(4, 2, sum(lengths), 16, seed=5)
    cu = [0, 40, 57, 132]
    got = span_stats_packed(q, k, cu, prompts, 10, 10, 100, 0.25, "chunked", softcap=3.0,
                            sinks=sinks, sliding_window=20)  # fmt: skip
    for b in range(3):
        a, e = cu[b], cu[b + 1]
        ref = span_stats_reference(q[:, a:e], k[:, a:e], prompts[b], 10, 10, 100, 0.25,
                                   softcap=3.0, sinks=sinks, sliding_window=20)  # fmt: skip
        for field in FIELDS:
            torch.testing.assert_close(getattr(got[b], field), getattr(ref, field), rtol=0,
                                       atol=1e-10)  # fmt: skip


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"softcap": 0.0}, "softcap"),
        ({"softcap": float("nan")}, "softcap"),
        ({"sinks": torch.zeros(3)}, "shape"),
        ({"sinks": torch.tensor([0.0, float("inf")])}, "finite"),
        ({"sliding_window": 0}, "sliding_window"),
        ({"sliding_window": 2.5}, "sliding_window"),
    ],
)
def test_variant_arguments_are_checked(kw, match):
    q, k, _ = random_qk(2, 1, 20, 8, seed=1)
    with pytest.raises(ValueError, match=match):
        span_stats(q, k, 3, backend="reference", **kw)


# ---- Triton kernel under the interpreter --------------------------------------------------
triton = pytest.importorskip("triton")


@pytest.mark.parametrize("softcap,with_sinks,slide", VARIANTS)
@pytest.mark.parametrize(
    "hq,hkv,n,prompt_len,h_hi,block",
    [(4, 2, 70, 1, 100, 16), (2, 1, 40, 39, 100, 16), (2, 2, 90, 20, None, 32),
     (4, 1, 130, 7, 20, 32), (2, 1, 33, 30, 100, 16)],
)  # fmt: skip
def test_triton_matches_reference(interpret, softcap, with_sinks, slide, hq, hkv, n, prompt_len,
                                  h_hi, block):  # fmt: skip
    from anchorcredit.engine.span import triton_kernel

    q, k, sinks = random_qk(hq, hkv, n, 16, seed=n + hq)
    kw = dict(softcap=softcap, sinks=sinks[:hq] if with_sinks else None, sliding_window=slide)
    ref = span_stats_reference(q, k, prompt_len, 10, 10, h_hi, 0.25, **kw)
    kw32 = {**kw, "sinks": None if kw["sinks"] is None else kw["sinks"].float()}
    blocks = {"block_m": block, "block_n": block}
    (got,) = triton_kernel.span_stats_packed(
        q.float(), k.float(), [0, n], [prompt_len], 10, 10, h_hi, 0.25, **blocks, **kw32
    )
    for field in FIELDS:
        a, e = getattr(got, field), getattr(ref, field)
        assert a.dtype == torch.float32
        err = relative_error(a, e)
        assert err <= 1e-4, f"{field}: {err:.2e}"


def test_triton_packed_variant_and_front(interpret):
    lengths, prompts = [40, 17, 75], [30, 1, 5]
    q, k, sinks = random_qk(4, 2, sum(lengths), 16, seed=9)
    cu = [0, 40, 57, 132]
    got = span_stats_packed(q.float(), k.float(), cu, prompts, 10, 10, None, 0.25, "triton",
                            softcap=4.0, sinks=sinks.float(), sliding_window=16)  # fmt: skip
    for b in range(3):
        a, e = cu[b], cu[b + 1]
        ref = span_stats_reference(q[:, a:e], k[:, a:e], prompts[b], 10, 10, None, 0.25,
                                   softcap=4.0, sinks=sinks, sliding_window=16)  # fmt: skip
        for field in FIELDS:
            err = relative_error(getattr(got[b], field), getattr(ref, field))
            assert err <= 1e-4, f"{field}: {err:.2e}"
