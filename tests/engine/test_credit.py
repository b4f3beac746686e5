"""credit(): SPEC.md gamma_t, checked on vectors worked out by hand, plus properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from anchorcredit.engine import credit, top_q_mask, waad_delta


def test_uniform_is_all_ones():
    assert credit("uniform", waad=np.zeros(4)).tolist() == [1, 1, 1, 1]


def test_local_chunk_hand_worked():
    # Delta = [|1-5|, |5-2|, |2-2|, |2-8|, 0] = [4, 3, 0, 6, 0]; ceil(0.4*5) = 2 -> {3, 0}
    waad = np.array([1.0, 5.0, 2.0, 2.0, 8.0])
    assert waad_delta(waad).tolist() == [4, 3, 0, 6, 0]
    assert credit("local_chunk", waad=waad).tolist() == [1.5, 1, 1, 1.5, 1]


def test_global_anchor_ties_go_to_earlier_position():
    fai = np.array([0.2, 0.3, 0.3, 0.3, 0.1])
    assert credit("global_anchor", fai=fai).tolist() == [1, 1.5, 1.5, 1, 1]


def test_coupled_rhythm_hand_worked():
    # T_glob = top3(fai) = {2, 4, 5}; Delta = [6, 8, 3, 2, 5, 0]; tau_waad = 3.5, tau_delta = 4.
    # t=2: Delta[0..1] max 8 at 1, WAAD 1 <= 3.5 -> dominated, intro 1.
    # t=4: Delta[1..3] max 8 at 1, WAAD 2 <= 3.5 -> dominated, intro 1 (same).
    # t=5: WAAD 7 > 3.5 -> not dominated.
    waad = np.array([3.0, 9.0, 1.0, 4.0, 2.0, 7.0])
    fai = np.array([0.0, 0.1, 0.9, 0.2, 0.8, 0.3])
    got = credit("coupled_rhythm", waad=waad, fai=fai)
    assert got.tolist() == [1, 1.25, 1.25, 1, 1.25, 1.5]
    # k = 1: t=4 looks at Delta[3] = 2 < 4 only -> not dominated.
    got = credit("coupled_rhythm", waad=waad, fai=fai, k=1)
    assert got.tolist() == [1, 1.25, 1.25, 1, 1.5, 1.5]


def test_coupled_rhythm_terms_add_where_sets_overlap():
    # T_glob = {1, 2}; Delta = [4, 8, 1, 1, 0]; tau_waad = 3, tau_delta = 1.
    # t=1: WAAD 9 > 3 -> undominated anchor; t=2: Delta[0..1] max 8 at 1 -> dominated, intro 1.
    # Position 1 is both an undominated anchor and an intro: 1 + 0.5 + 0.2 * 0.5 = 1.6.
    waad = np.array([5.0, 9.0, 1.0, 2.0, 3.0])
    fai = np.array([0.0, 0.9, 0.8, 0.0, 0.0])
    got = credit("coupled_rhythm", waad=waad, fai=fai, alpha=0.2)
    np.testing.assert_allclose(got, [1, 1.6, 1.4, 1, 1])
    # Explicit thresholds replace the medians: WAAD 1 > 0.5 -> nobody is dominated.
    got = credit("coupled_rhythm", waad=waad, fai=fai, alpha=0.2, tau_waad=0.5)
    np.testing.assert_allclose(got, [1, 1.5, 1.5, 1, 1])


def test_first_response_token_is_never_dominated():
    # The anchor at t=0 has no look-back window, so it keeps the full amplification.
    got = credit("coupled_rhythm", waad=np.array([0.0, 5.0, 5.0]), fai=np.array([1.0, 0, 0]), q=0.3)
    assert got.tolist() == [1.5, 1, 1]


def test_entropy_strategy():
    ent = np.array([0.1, 2.0, 0.5, 2.0])
    assert credit("entropy", entropy=ent, q=0.5).tolist() == [1, 1.5, 1, 1.5]
    assert credit("entropy", entropy=ent, q=0.25).tolist() == [1, 1.5, 1, 1]


def test_random_is_seeded():
    a = credit("random", waad=np.zeros(50), seed=3)
    assert np.array_equal(a, credit("random", waad=np.zeros(50), seed=3))
    assert not np.array_equal(a, credit("random", waad=np.zeros(50), seed=4))
    assert int((a > 1).sum()) == 20


def test_top_q_count_is_robust_to_float_noise():
    # 0.7 * 10 = 7.000000000000001 in binary floating point; ceil must still give 7.
    assert int(top_q_mask(np.arange(10.0), 0.7).sum()) == 7
    assert int(top_q_mask(np.arange(5.0), 0.4).sum()) == 2
    assert int(top_q_mask(np.arange(5.0), 0.0).sum()) == 0
    assert int(top_q_mask(np.arange(5.0), 1.0).sum()) == 5


def test_gamma_amp_and_torch_round_trip():
    waad = torch.tensor([1.0, 5.0, 2.0, 2.0, 8.0])
    got = credit("local_chunk", waad=waad, gamma_amp=2.0)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    assert got.tolist() == [2, 1, 1, 2, 1]
    assert credit("local_chunk", waad=waad.numpy()).dtype == np.float32


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(strategy="nope", waad=[1.0]), "unknown strategy"),
        (dict(strategy="entropy", waad=[1.0]), "needs entropy"),
        (dict(strategy="coupled_rhythm", waad=[1.0]), "needs fai"),
        (dict(strategy="local_chunk", waad=[1.0], q=1.5), r"q: must be in \[0, 1\]"),
        (dict(strategy="local_chunk", waad=[1.0], q=-0.1), r"q: must be in \[0, 1\]"),
        (dict(strategy="local_chunk", waad=[1.0, float("nan")]), "finite"),
        (dict(strategy="local_chunk", waad=[]), "non-empty"),
        (dict(strategy="coupled_rhythm", waad=[1.0, 2.0], fai=[1.0]), "same length"),
        (dict(strategy="local_chunk", waad=[1.0], gamma_amp=0.5), "gamma_amp"),
        (dict(strategy="coupled_rhythm", waad=[1.0], fai=[1.0], alpha=2.0), "alpha"),
        (dict(strategy="coupled_rhythm", waad=[1.0], fai=[1.0], k=0), "k: must be"),
        (dict(strategy="uniform"), "at least one"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        credit(**kwargs)


finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)
vectors = st.integers(1, 40).flatmap(
    lambda n: st.tuples(*(st.lists(finite, min_size=n, max_size=n) for _ in range(3)))
)


@settings(max_examples=150, deadline=None)
@given(vectors, st.floats(0.0, 1.0), st.floats(1.0, 3.0), st.floats(0.0, 1.0), st.integers(1, 5))
def test_properties(vecs, q, amp, alpha, k):
    waad, fai, ent = (np.array(v, dtype=np.float64) for v in vecs)
    r = len(waad)
    want = math.ceil(round(q * r, 9))
    for strategy in ("local_chunk", "global_anchor", "random", "entropy"):
        g = credit(strategy, waad=waad, fai=fai, entropy=ent, q=q, gamma_amp=amp, seed=1)
        assert g.shape == (r,) and bool((g >= 1).all())
        if amp > 1:
            assert int((g > 1).sum()) == want
    g = credit("coupled_rhythm", waad=waad, fai=fai, q=q, gamma_amp=amp, alpha=alpha, k=k)
    assert bool((g >= 1).all())
    assert bool((g <= 1 + (amp - 1) * (1 + alpha) + 1e-12).all())
    # Only anchors and their intro tokens are touched: at most 2 * ceil(q R) positions.
    assert int((g > 1).sum()) <= 2 * want
