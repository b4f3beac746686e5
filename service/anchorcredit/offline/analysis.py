"""The paper's preplan-and-anchor coupling statistics, as pure numpy (no torch).

SPEC.md "Paper figures to reproduce" (Qwen3-4B-Base, GSM8K, 70 problems):
  * mean entropy at WAAD peaks 0.3608 vs 0.2386 over all response tokens (lift +51%);
  * an FAI peak falls at or right after a WAAD peak 52.53% of the time vs 36.87% by
    chance (lift +42%).
The paper does not spell out "peak" or "chance"; the definitions below are ours [ours] and
are parameters.

Peak (`find_peaks`): anchorcredit.peaks, the one definition (also the server's credit
    metrics'): above the response's `quantile` (default the median) and the first position
    of a local maximum with neighbours on both sides (a plateau counts once; a run that
    reaches either end never counts).

Statistic 1: entropy at WAAD peaks
    observed = mean entropy over all WAAD-peak tokens, pooled over responses (token-weighted);
    random   = mean entropy over all response tokens, pooled the same way. This is exactly
               the expectation of `observed` if the same number of peaks were placed at
               uniformly random response positions (each response keeps its peak count);
               the two coincide when responses are equally long, and we report the
               token-pooled mean because it is the paper's "over all tokens" baseline;
    lift     = observed / random - 1.

Statistic 2: FAI peak at or right after a WAAD peak
    A FAI peak at s is a hit iff some WAAD peak p has 0 <= s - p <= max_lag (default 1:
    "at or right after"). observed = hits / FAI peaks, pooled over responses.
    Chance: each response's FAI peaks placed uniformly at random over its *eligible*
    positions E: those that can hold an FAI peak at all, i.e. 1 .. R-2 (peaks need both
    neighbours) and not inside the trailing run of exact zeros in FAI (the last H_lo tokens
    have an empty future window, FAI = 0 by SPEC).
    The expected hit count is then exactly n_fai(r) * |H(r) & E(r)| / |E(r)| per response,
    H(r) = positions within max_lag after a WAAD peak (by linearity of expectation, with or
    without replacement, so no sampling is needed); random = sum of expected hits / sum of
    FAI peaks; lift = observed / random - 1.

Confidence intervals: percentile bootstrap over responses (seeded), for observed and lift.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from anchorcredit.peaks import segment_peaks

# (observed, random, lift) from the paper, for the table printed next to ours.
PAPER = {
    "entropy_at_waad_peaks": (0.3608, 0.2386, 0.3608 / 0.2386 - 1.0),
    "fai_peak_after_waad_peak": (0.5253, 0.3687, 0.4247),
}
STAT_LABELS = {
    "entropy_at_waad_peaks": "mean entropy at WAAD peaks (vs all tokens)",
    "fai_peak_after_waad_peak": "FAI peak at/right after WAAD peak (vs chance)",
}


def find_peaks(x: np.ndarray, quantile: float = 0.5) -> np.ndarray:
    """Positions of the peaks of a 1-D series (anchorcredit.peaks), sorted ascending."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"expected a 1-D series, got shape {x.shape}")
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    if x.size == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(segment_peaks(x, [x.size], quantile)).astype(np.int64)


def eligible_positions(fai: np.ndarray) -> np.ndarray:
    """Positions that can hold an FAI peak: 1 .. R-2, up to the last nonzero FAI."""
    fai = np.asarray(fai, dtype=np.float64)
    nz = np.flatnonzero(fai != 0.0)
    mask = np.zeros(fai.size, dtype=bool)
    if nz.size:
        mask[1 : min(nz[-1], fai.size - 2) + 1] = True
    return mask


def after_mask(peaks: np.ndarray, n: int, max_lag: int, min_lag: int = 0) -> np.ndarray:
    """Boolean mask of positions s with min_lag <= s - p <= max_lag for some p in peaks."""
    mask = np.zeros(n, dtype=bool)
    for lag in range(min_lag, max_lag + 1):
        idx = np.asarray(peaks, dtype=np.int64) + lag
        mask[idx[(idx >= 0) & (idx < n)]] = True
    return mask


@dataclass
class CouplingStat:
    """One coupling statistic: observed vs random, with counts and bootstrap intervals."""

    name: str
    observed: float
    random: float
    lift: float
    n_events: int  # WAAD peaks (stat 1) or FAI peaks (stat 2)
    n_responses: int
    observed_ci: tuple[float, float] | None = None
    lift_ci: tuple[float, float] | None = None
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """JSON-ready dict (tuples become lists)."""
        d = asdict(self)
        for k in ("observed_ci", "lift_ci"):
            if d[k] is not None:
                d[k] = [float(v) for v in d[k]]
        return d


def _lift(obs: float, rnd: float) -> float:
    return obs / rnd - 1.0 if rnd > 0 else float("nan")


def _entropy_parts(waad: Sequence, entropy: Sequence, quantile: float) -> np.ndarray:
    """Per response: [sum of entropy at peaks, number of peaks, sum of entropy, length]."""
    rows = []
    for w, h in zip(waad, entropy, strict=True):
        w = np.asarray(w, dtype=np.float64)
        h = np.asarray(h, dtype=np.float64)
        if w.shape != h.shape:
            raise ValueError(f"waad and entropy lengths differ: {w.shape} vs {h.shape}")
        peaks = find_peaks(w, quantile)
        rows.append([h[peaks].sum(), peaks.size, h.sum(), h.size])
    return np.asarray(rows, dtype=np.float64).reshape(-1, 4)


def _entropy_from_parts(parts: np.ndarray) -> tuple[float, float]:
    tot = parts.sum(axis=0)
    obs = tot[0] / tot[1] if tot[1] > 0 else float("nan")
    rnd = tot[2] / tot[3] if tot[3] > 0 else float("nan")
    return float(obs), float(rnd)


def _fai_parts(
    waad: Sequence, fai: Sequence, quantile: float, max_lag: int, min_lag: int = 0
) -> np.ndarray:
    """Per response: [hits, FAI peaks, expected hits under chance]."""
    rows = []
    for w, f in zip(waad, fai, strict=True):
        w = np.asarray(w, dtype=np.float64)
        f = np.asarray(f, dtype=np.float64)
        if w.shape != f.shape:
            raise ValueError(f"waad and fai lengths differ: {w.shape} vs {f.shape}")
        wp = find_peaks(w, quantile)
        fp = find_peaks(f, quantile)
        hit_pos = after_mask(wp, w.size, max_lag, min_lag)
        elig = eligible_positions(f)
        n_elig = int(elig.sum())
        expected = fp.size * (hit_pos & elig).sum() / n_elig if n_elig else 0.0
        rows.append([hit_pos[fp].sum(), fp.size, expected])
    return np.asarray(rows, dtype=np.float64).reshape(-1, 3)


def _fai_from_parts(parts: np.ndarray) -> tuple[float, float]:
    tot = parts.sum(axis=0)
    if tot[1] == 0:
        return float("nan"), float("nan")
    return float(tot[0] / tot[1]), float(tot[2] / tot[1])


def _bootstrap(parts: np.ndarray, reduce, n_boot: int, seed: int, level: float = 0.95):
    """Percentile intervals of (observed, lift) when resampling responses with replacement."""
    if n_boot <= 0 or len(parts) < 2:
        return None, None
    rng = np.random.default_rng(seed)
    obs, lifts = [], []
    for _ in range(n_boot):
        o, r = reduce(parts[rng.integers(0, len(parts), len(parts))])
        obs.append(o)
        lifts.append(_lift(o, r))
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100

    def ci(v: list[float]) -> tuple[float, float] | None:
        a = np.asarray(v)
        a = a[np.isfinite(a)]
        return (float(np.percentile(a, lo)), float(np.percentile(a, hi))) if a.size else None

    return ci(obs), ci(lifts)


def entropy_at_waad_peaks(
    waad: Sequence,
    entropy: Sequence,
    quantile: float = 0.5,
    n_boot: int = 1000,
    seed: int = 0,
) -> CouplingStat:
    """Statistic 1 over a list of responses (per-response WAAD and entropy arrays)."""
    parts = _entropy_parts(waad, entropy, quantile)
    obs, rnd = _entropy_from_parts(parts)
    obs_ci, lift_ci = _bootstrap(parts, _entropy_from_parts, n_boot, seed)
    return CouplingStat(
        name="entropy_at_waad_peaks",
        observed=obs,
        random=rnd,
        lift=_lift(obs, rnd),
        n_events=int(parts[:, 1].sum()),
        n_responses=len(parts),
        observed_ci=obs_ci,
        lift_ci=lift_ci,
        extra={"n_tokens": int(parts[:, 3].sum())},
    )


def fai_peak_after_waad_peak(
    waad: Sequence,
    fai: Sequence,
    quantile: float = 0.5,
    max_lag: int = 1,
    n_boot: int = 1000,
    seed: int = 0,
    min_lag: int = 0,
) -> CouplingStat:
    """Statistic 2 over a list of responses (per-response WAAD and FAI arrays).

    A hit is min_lag <= s - p <= max_lag (default 0..1, the paper's "at or right after").
    """
    if max_lag < min_lag:
        raise ValueError(f"max_lag must be >= min_lag, got {max_lag} < {min_lag}")
    parts = _fai_parts(waad, fai, quantile, max_lag, min_lag)
    obs, rnd = _fai_from_parts(parts)
    obs_ci, lift_ci = _bootstrap(parts, _fai_from_parts, n_boot, seed)
    return CouplingStat(
        name="fai_peak_after_waad_peak",
        observed=obs,
        random=rnd,
        lift=_lift(obs, rnd),
        n_events=int(parts[:, 1].sum()),
        n_responses=len(parts),
        observed_ci=obs_ci,
        lift_ci=lift_ci,
        extra={"hits": int(parts[:, 0].sum()), "min_lag": min_lag, "max_lag": max_lag},
    )


def lag_profile(
    waad: Sequence,
    fai: Sequence,
    lags: Sequence[int] = range(-3, 4),
    quantile: float = 0.5,
) -> list[dict]:
    """Diagnostic: for each lag d, the share of FAI peaks at exactly d after a WAAD peak
    (s - p = d) vs chance, defined as for statistic 2. Shows where, if anywhere, the FAI
    peaks sit relative to the WAAD peaks (d < 0: the FAI peak comes first)."""
    out = []
    for d in lags:
        obs, rnd = _fai_from_parts(_fai_parts(waad, fai, quantile, d, d))
        out.append({"lag": int(d), "observed": obs, "random": rnd, "lift": _lift(obs, rnd)})
    return out


def coupling_report(
    records: Sequence[dict],
    quantile: float = 0.5,
    max_lag: int = 1,
    n_boot: int = 1000,
    seed: int = 0,
    min_lag: int = 0,
) -> dict[str, CouplingStat]:
    """Both statistics for scored records (dicts with 'waad', 'fai', optional 'entropy').

    Entropy is skipped (absent from the result) unless every record has it.
    """
    if not records:
        raise ValueError("no scored responses to analyze")
    waad = [np.asarray(r["waad"], dtype=np.float64) for r in records]
    fai = [np.asarray(r["fai"], dtype=np.float64) for r in records]
    out: dict[str, CouplingStat] = {}
    if all(r.get("entropy") is not None for r in records):
        ent = [np.asarray(r["entropy"], dtype=np.float64) for r in records]
        out["entropy_at_waad_peaks"] = entropy_at_waad_peaks(waad, ent, quantile, n_boot, seed)
    out["fai_peak_after_waad_peak"] = fai_peak_after_waad_peak(
        waad, fai, quantile, max_lag, n_boot, seed, min_lag
    )
    return out


def _label(s: CouplingStat) -> str:
    lags = (s.extra.get("min_lag", 0), s.extra.get("max_lag", 1))
    if s.name == "fai_peak_after_waad_peak" and lags != (0, 1):
        return f"FAI peak at lag {lags[0]}..{lags[1]} of WAAD peak (vs chance)"
    return STAT_LABELS.get(s.name, s.name)


def format_table(report: dict[str, CouplingStat], paper: bool = True) -> str:
    """A plain-text table: observed / random / lift (+95% CI), and the paper's numbers."""

    def pct(v: float) -> str:
        return f"{v * 100:+.1f}%" if np.isfinite(v) else "n/a"

    def num(name: str, v: float) -> str:
        if not np.isfinite(v):
            return "n/a"
        return f"{v * 100:.2f}%" if name == "fai_peak_after_waad_peak" else f"{v:.4f}"

    header = f"{'statistic':<46} {'observed':>9} {'random':>9} {'lift':>8}  {'lift 95% CI':<17} n"
    lines = [header, "-" * len(header)]
    for name, s in report.items():
        ci = f"[{pct(s.lift_ci[0])}, {pct(s.lift_ci[1])}]" if s.lift_ci else ""
        lines.append(
            f"{_label(s):<46} {num(name, s.observed):>9} "
            f"{num(name, s.random):>9} {pct(s.lift):>8}  {ci:<17} "
            f"{s.n_events} peaks / {s.n_responses} responses"
        )
        if paper and name in PAPER:
            o, r, lift = PAPER[name]
            lines.append(
                f"{'  paper (Qwen3-4B-Base, GSM8K, 70 problems)':<46} {num(name, o):>9} "
                f"{num(name, r):>9} {pct(lift):>8}"
            )
    return "\n".join(lines)
