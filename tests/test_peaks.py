"""anchorcredit.peaks against a plain per-response scan of its definition (np.quantile for
the threshold, a walk over runs of equal values), on fresh random series of unequal lengths
with plateaus and ties, lengths 1 and 2 included."""

from __future__ import annotations

import numpy as np
import pytest

from anchorcredit.peaks import segment_peaks, segment_quantiles


def peaks_by_hand(x: list[float], quantile: float) -> list[int]:
    thr = float(np.quantile(np.asarray(x, dtype=np.float64), quantile))
    out = []
    t = 1
    while t < len(x) - 1:
        end = t
        while end + 1 < len(x) and x[end + 1] == x[t]:
            end += 1
        if x[t] > x[t - 1] and end + 1 < len(x) and x[end + 1] < x[t] and x[t] > thr:
            out.append(t)
        t = end + 1
    return out


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("quantile", [0.5, 0.0, 0.3, 0.9, 1.0])
def test_segments_at_once_equal_each_response_by_hand(seed, quantile):
    rng = np.random.default_rng(seed)
    lengths = [1, 2, *rng.integers(1, 40, 10).tolist(), 3]
    series = [rng.integers(0, 4, n).astype(float) * rng.choice([1.0, 0.1]) for n in lengths]
    series[3] = rng.random(lengths[3])  # continuous values too
    mask = segment_peaks(np.concatenate(series), lengths, quantile)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    for s, n, x in zip(starts, lengths, series, strict=True):
        assert np.flatnonzero(mask[s : s + n]).tolist() == peaks_by_hand(x.tolist(), quantile)


@pytest.mark.parametrize("seed", range(4))
def test_quantiles_are_numpys_bit_for_bit(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 30, 12)
    x = rng.standard_normal(int(lengths.sum()))
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    for q in (0.5, 0.25, 0.7, 1 / 3):
        got = segment_quantiles(x, lengths, q)
        want = [np.quantile(x[s : s + n], q) for s, n in zip(starts, lengths, strict=True)]
        assert got.tolist() == want


def test_the_definitions_examples():
    assert segment_peaks([0, 2, 2, 0], [4]).tolist() == [False, True, False, False]
    assert not segment_peaks([0, 1, 2, 3], [4]).any()  # monotone: the ends never count
    assert not segment_peaks([1.0, 1.0, 1.0], [3]).any()  # nothing above the median
    # a peak never spans two responses: [0, 5] then [5, 0] has none
    assert not segment_peaks([0, 5, 5, 0], [2, 2]).any()


@pytest.mark.parametrize("seed", range(4))
def test_very_uneven_lengths_take_the_other_sort_and_agree(seed):
    """One long response among short ones (the lexsort path, not the padded rows)."""
    rng = np.random.default_rng(seed)
    lengths = [300, 1, 2, 3, 1, 5]
    series = [rng.integers(0, 5, n).astype(float) for n in lengths]
    mask = segment_peaks(np.concatenate(series), lengths)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    for s, n, x in zip(starts, lengths, series, strict=True):
        assert np.flatnonzero(mask[s : s + n]).tolist() == peaks_by_hand(x.tolist(), 0.5)
    assert segment_quantiles(np.concatenate(series), np.asarray(lengths), 0.5).tolist() == [
        np.quantile(x, 0.5) for x in series
    ]


def test_float32_series_give_the_float64_answer():
    rng = np.random.default_rng(7)
    x = rng.random(500).astype(np.float32)
    lengths = [100, 150, 250]
    assert (
        segment_peaks(x, lengths).tolist() == segment_peaks(x.astype(np.float64), lengths).tolist()
    )
