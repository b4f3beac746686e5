"""Coupling statistics (anchorcredit.offline.analysis) against values worked out by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest

from anchorcredit.offline.analysis import (
    PAPER,
    after_mask,
    coupling_report,
    eligible_positions,
    entropy_at_waad_peaks,
    fai_peak_after_waad_peak,
    find_peaks,
    format_table,
    lag_profile,
)

# Response A (8 tokens). WAAD sorted: 0 0 1 2 3 4 5 5 -> median 2.5.
# Local maxima above 2.5: t=1 (3), t=3 (5; the plateau 5,5 counts at its first position),
# t=6 (4). t=4 is the plateau's second position: not a peak.
WAAD_A = [0, 3, 1, 5, 5, 2, 4, 0]
ENT_A = [0.1, 0.5, 0.2, 0.9, 0.3, 0.1, 0.6, 0.1]
# FAI sorted: 0 0 .1 .1 .2 .3 .4 .5 -> median .15; peaks t=2 (.5) and t=4 (.4).
# The trailing zero run (t=6,7) is ineligible: eligible = 0..5.
FAI_A = [0.1, 0.2, 0.5, 0.1, 0.4, 0.3, 0.0, 0.0]
# Response B (4 tokens): WAAD median 1 -> peak t=2; FAI median .15 -> peak t=1 (before the
# WAAD peak: a miss). Ends never count as peaks.
WAAD_B = [1, 0, 2, 1]
ENT_B = [0.2, 0.4, 0.3, 0.1]
FAI_B = [0.1, 0.3, 0.05, 0.2]


def test_find_peaks_by_hand():
    assert find_peaks(np.array(WAAD_A)).tolist() == [1, 3, 6]
    assert find_peaks(np.array(FAI_A)).tolist() == [2, 4]
    assert find_peaks(np.array(WAAD_B)).tolist() == [2]
    assert find_peaks(np.array(FAI_B)).tolist() == [1]
    assert find_peaks(np.array([0, 1, 2, 3])).tolist() == []  # monotone: ends never count
    assert find_peaks(np.array([3, 0])).tolist() == []
    assert find_peaks(np.array([0, 2, 2, 0])).tolist() == [1]  # plateau counted once
    assert find_peaks(np.array([1.0, 1.0, 1.0])).tolist() == []  # nothing above the median
    # A step that keeps rising is not a local maximum; the top of the step is.
    assert find_peaks(np.array([0, 1, 3, 3, 5, 0]), quantile=0.0).tolist() == [4]
    assert find_peaks(np.array([0, 1, 3, 3, 2, 0]), quantile=0.0).tolist() == [2]
    assert find_peaks(np.array([0, 2, 2]), quantile=0.0).tolist() == []  # run reaches the end
    assert find_peaks(np.array([])).tolist() == []
    # quantile 0 keeps every local maximum above the minimum
    assert find_peaks(np.array(WAAD_A), quantile=0.0).tolist() == [1, 3, 6]
    assert find_peaks(np.array(WAAD_A), quantile=0.8).tolist() == [3]  # thr 4.6


def test_masks():
    # interior 1..6, cut at the last nonzero (t=5)
    assert eligible_positions(np.array(FAI_A)).tolist() == [False] + [True] * 5 + [False] * 2
    assert eligible_positions(np.array(FAI_B)).tolist() == [False, True, True, False]
    assert eligible_positions(np.zeros(3)).tolist() == [False] * 3
    assert np.flatnonzero(after_mask(np.array([1, 3, 6]), 8, 1)).tolist() == [1, 2, 3, 4, 6, 7]
    assert np.flatnonzero(after_mask(np.array([1, 3, 6]), 8, 0)).tolist() == [1, 3, 6]
    assert np.flatnonzero(after_mask(np.array([1, 3, 6]), 8, -1, -1)).tolist() == [0, 2, 5]


def test_entropy_single_response():
    s = entropy_at_waad_peaks([WAAD_A], [ENT_A], n_boot=0)
    assert s.observed == pytest.approx((0.5 + 0.9 + 0.6) / 3)
    assert s.random == pytest.approx(2.8 / 8)
    assert s.lift == pytest.approx((2.0 / 3) / 0.35 - 1)
    assert (s.n_events, s.n_responses) == (3, 1)


def test_fai_single_response():
    s = fai_peak_after_waad_peak([WAAD_A], [FAI_A], n_boot=0)
    # FAI peaks 2 and 4 sit one after WAAD peaks 1 and 3: both hits.
    assert s.observed == pytest.approx(1.0)
    # hit positions {1,2,3,4,6,7} & eligible {1..5} = 4 of 5 -> chance 0.8
    assert s.random == pytest.approx(0.8)
    assert s.lift == pytest.approx(0.25)
    # lag 0 ("at" only): no FAI peak sits on a WAAD peak; chance = |{1,3}| / 5
    s0 = fai_peak_after_waad_peak([WAAD_A], [FAI_A], max_lag=0, n_boot=0)
    assert s0.observed == 0.0 and s0.random == pytest.approx(2 / 5)


def test_lag_profile_by_hand():
    prof = {p["lag"]: p for p in lag_profile([WAAD_A], [FAI_A], lags=[-1, 0, 1])}
    # FAI peaks {2, 4}, WAAD peaks {1, 3, 6}, eligible {1..5}
    assert prof[1]["observed"] == 1.0 and prof[1]["random"] == pytest.approx(2 / 5)  # {2,4}
    assert prof[0]["observed"] == 0.0 and prof[0]["random"] == pytest.approx(2 / 5)  # {1,3}
    # lag -1: positions {0, 2, 5}; only FAI peak 2 is there; eligible share {2, 5}
    assert prof[-1]["observed"] == 0.5 and prof[-1]["random"] == pytest.approx(2 / 5)


def test_pooled_over_responses():
    rep = coupling_report(
        [
            {"waad": WAAD_A, "fai": FAI_A, "entropy": ENT_A},
            {"waad": WAAD_B, "fai": FAI_B, "entropy": ENT_B},
        ],
        n_boot=0,
    )
    e, f = rep["entropy_at_waad_peaks"], rep["fai_peak_after_waad_peak"]
    assert e.observed == pytest.approx((2.0 + 0.3) / 4)
    assert e.random == pytest.approx((2.8 + 1.0) / 12)
    # B's FAI peak (t=1) precedes its WAAD peak (t=2): a miss. Expected hits: A 2 * 4/5,
    # B 1 * |{2,3} & {1,2}| / 2 = 0.5.
    assert f.observed == pytest.approx(2 / 3)
    assert f.random == pytest.approx((1.6 + 0.5) / 3)
    assert f.lift == pytest.approx((2 / 3) / 0.7 - 1)
    assert f.extra["hits"] == 2 and f.n_events == 3


def test_chance_matches_simulation():
    """The exact chance rate equals the mean over random placements of the FAI peaks."""
    rng = np.random.default_rng(1)
    waad = [rng.random(n) for n in (30, 50, 41)]
    fai = [np.concatenate([rng.random(n - 10), np.zeros(10)]) for n in (30, 50, 41)]
    exact = fai_peak_after_waad_peak(waad, fai, n_boot=0)
    hits = total = 0
    for _ in range(4000):
        for w, f in zip(waad, fai, strict=True):
            hit = after_mask(find_peaks(w), len(w), 1)
            elig = np.flatnonzero(eligible_positions(f))
            n = find_peaks(f).size
            pos = rng.choice(elig, size=n, replace=False)
            hits += hit[pos].sum()
            total += n
    assert hits / total == pytest.approx(exact.random, abs=0.005)


def test_no_entropy_skips_stat_and_table_and_json():
    rep = coupling_report([{"waad": WAAD_A, "fai": FAI_A}], n_boot=50)
    assert list(rep) == ["fai_peak_after_waad_peak"]
    table = format_table(rep)
    assert "100.00%" in table and "80.00%" in table and "+25.0%" in table
    assert "52.53%" in table  # the paper's row
    json.dumps({k: v.as_dict() for k, v in rep.items()})  # JSON-ready


def test_bootstrap_interval_brackets_estimate():
    rng = np.random.default_rng(0)
    waad = [rng.random(60) for _ in range(20)]
    ent = [w + rng.random(60) for w in waad]  # entropy correlated with WAAD: positive lift
    s = entropy_at_waad_peaks(waad, ent, n_boot=300, seed=3)
    assert s.lift > 0
    assert s.lift_ci[0] <= s.lift <= s.lift_ci[1]
    assert s.observed_ci[0] <= s.observed <= s.observed_ci[1]


def test_paper_constants():
    assert PAPER["entropy_at_waad_peaks"][2] == pytest.approx(0.512, abs=0.001)
    assert PAPER["fai_peak_after_waad_peak"][:2] == (0.5253, 0.3687)


def test_length_mismatch_raises():
    with pytest.raises(ValueError, match="lengths differ"):
        entropy_at_waad_peaks([[1, 2, 3]], [[1, 2]])


def test_find_peaks_matches_a_plateau_walk():
    """The vectorised rule equals walking each run of equal values, on random small series."""

    def walk(x: np.ndarray, q: float) -> list[int]:
        thr, out, i = np.quantile(x, q), [], 1
        while i < len(x) - 1:
            if x[i] > x[i - 1]:
                j = i
                while j + 1 < len(x) and x[j + 1] == x[i]:
                    j += 1
                if j + 1 < len(x) and x[j + 1] < x[i] and x[i] > thr:
                    out.append(i)
                i = j + 1
            else:
                i += 1
        return out

    rng = np.random.default_rng(0)
    for _ in range(2000):
        x = rng.integers(0, 4, rng.integers(1, 12)).astype(float)
        q = float(rng.random())
        assert find_peaks(x, q).tolist() == walk(x, q), (x, q)
