"""Peaks of per-token series (WAAD, FAI): the one definition, shared by `anchorcredit
analyze` (offline/analysis.py, docs/RHYTHM.md) and the server's credit metrics
(server/credit_metrics.py, docs/OBSERVABILITY.md). Pure numpy, torch-free.

Position t of a response series x[0..R-1] is a peak iff
  (1) x[t] > thr, thr = the `quantile` of x over the response (default 0.5: the median,
      numpy's linear interpolation, i.e. the mean of the two middle values for even R), and
  (2) x[t] starts a local maximum with neighbours on both sides: t > 0, x[t] > x[t-1], and
      after the run of values equal to x[t] that starts at t the series drops. A plateau
      counts once, at its first position; a step that keeps rising, or a run that reaches
      either end, never counts (as in scipy.signal.find_peaks).

`segment_peaks` applies it to many responses laid end to end at once (one sort for the
thresholds, one pass for the runs), so a server can summarise a whole request cheaply.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def segment_quantiles(x: np.ndarray, lengths: np.ndarray, quantile: float) -> np.ndarray:
    """numpy.quantile(segment, quantile) (linear method, bit for bit, in float64) of every
    segment of x laid end to end."""
    lengths = np.asarray(lengths, dtype=np.int64)
    ordered, starts = _sorted_segments(x, lengths)
    virtual = (lengths - 1) * quantile
    below = np.floor(virtual)
    t = virtual - below
    lo = starts + below.astype(np.int64)
    hi = starts + np.minimum(below.astype(np.int64) + 1, lengths - 1)
    a, b = ordered[lo].astype(np.float64), ordered[hi].astype(np.float64)
    diff = b - a
    # numpy's _lerp: a + (b - a) t below one half, b - (b - a)(1 - t) from one half on
    return np.where(t >= 0.5, b - diff * (1 - t), a + diff * t)


def _sorted_segments(x: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each segment sorted ascending, and where each starts in the result. Segments of
    similar length (a trainer's batch) sort as rows of a padded matrix, several times faster
    than one lexsort by (segment, value); very uneven ones fall back to the lexsort."""
    n, longest = len(lengths), int(lengths.max())
    if n * longest <= 2 * x.size:
        rows = np.full((n, longest), np.inf, dtype=x.dtype)
        rows[np.arange(longest) < lengths[:, None]] = x
        return np.sort(rows, axis=1).ravel(), np.arange(n, dtype=np.int64) * longest
    seg = np.repeat(np.arange(n), lengths)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64)
    return x[np.lexsort((x, seg))], starts


def segment_peaks(
    x: np.ndarray | Sequence[float], lengths: np.ndarray | Sequence[int], quantile: float = 0.5
) -> np.ndarray:
    """Boolean mask over x (segments of `lengths` laid end to end) marking each segment's
    peaks (module docstring). Every length must be >= 1."""
    x = np.asarray(x)
    if x.dtype.kind != "f":  # a float array keeps its dtype: the comparisons are exact
        x = x.astype(np.float64)
    lengths = np.asarray(lengths, dtype=np.int64)
    mask = np.zeros(x.size, dtype=bool)
    if x.size == 0:
        return mask
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    ends = starts + lengths - 1
    first, last = np.zeros(x.size, dtype=bool), np.zeros(x.size, dtype=bool)
    first[starts], last[ends] = True, True
    # a candidate rises into t from inside its segment (so t starts a run) and is above
    # its segment's threshold
    rise = np.zeros(x.size, dtype=bool)
    rise[1:] = x[1:] > x[:-1]
    rise &= ~first
    cand = np.flatnonzero(rise & (x > np.repeat(segment_quantiles(x, lengths, quantile), lengths)))
    # where each candidate's run of equal values ends: the next position whose successor
    # differs, or its segment's end (runs never cross a boundary)
    run_last = np.zeros(x.size, dtype=bool)
    run_last[:-1] = x[1:] != x[:-1]
    run_last |= last
    end = np.flatnonzero(run_last)
    end = end[np.searchsorted(end, cand)]
    inner = ~last[end]  # a run that reaches its segment's end never counts
    cand, end = cand[inner], end[inner]
    mask[cand[x[end + 1] < x[cand]]] = True
    return mask
