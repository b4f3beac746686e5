"""The paper's perturbation test (its Table 1): do high-FAI tokens steer what follows?

For each scored response, take its `n` highest-FAI and `n` lowest-FAI positions (among the
positions FAI is defined for, below), force a different token there (one of the model's
top-k next-token candidates, never the original), let the model continue greedily, and
compare the continuation with the original one by the Jaccard overlap of their content
words. If high-FAI tokens are anchors that later tokens build on, changing them should
change the continuation more: lower Jaccard at high-FAI positions than at low-FAI ones.
The paper (Qwen3-4B-Base): mean Jaccard 0.534 (high) vs 0.631 (low); high is lower in
87.14% of trials.

Rules [ours; the paper does not spell them out]:

Eligible positions (`eligible_positions`)
    t in 0 .. R-2 (at least one original token follows t) and t <= the last position with a
    nonzero FAI (the last H_lo tokens have an empty future window, FAI = 0 by SPEC, so they
    cannot be "low FAI" in any meaningful sense).
Picking (`pick_positions`)
    the n eligible positions with the largest FAI (ties: earlier position first), then the n
    with the smallest among the rest (so the two never share a position); with fewer than
    2n eligible positions, floor(m/2) each.
    Trial i pairs the i-th highest with the i-th lowest position of the same response.
Alternative token
    uniformly at random (seeded) among the model's top-k tokens at t (the distribution that
    generated token t) minus the original token and the tokenizer's special tokens.
Rollout
    greedy, as many new tokens as the original continuation has after t, at most
    `rollout_tokens`; the original continuation is cut to the same length.
Content words (`content_words`)
    the decoded text lowercased, split into runs of letters/digits (`[^\\W_]+`, so numbers
    count: in math reasoning they carry the content), minus the English stopwords in
    `STOPWORDS`; compared as sets. Jaccard(A, B) = |A & B| / |A | B|, and 1.0 when both are
    empty (nothing was said either way, so nothing changed).
Statistics (`summarize`)
    mean Jaccard over trials (high, low), the share of trials with high < low (strictly;
    ties reported on their own), the mean difference low - high; percentile bootstrap
    intervals resampling *responses* (trials of one response stay together), seeded.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

PAPER = {"jaccard_high": 0.534, "jaccard_low": 0.631, "share_high_lower": 0.8714}

# A fixed, small English stopword list (function words, auxiliaries, pronouns), so the rule
# does not depend on an NLTK download.
STOPWORDS = frozenset(
    """a an the and or but if then else so than that this these those there here of to in on
    at by for with from as into onto about over under up down out off is are was were be been
    being am do does did doing have has had having will would shall should can could may might
    must it its it's i me my we us our you your he him his she her they them their what which
    who whom whose when where why how not no yes all any each both few more most other some
    such only own same too very just also s t let lets let's we'll i'll""".split()
)
_WORD = re.compile(r"[^\W_]+")


def content_words(text: str) -> set[str]:
    """The set of content words of `text` (module docstring: lowercase, letter/digit runs,
    stopwords and punctuation dropped)."""
    return {w for w in _WORD.findall(text.lower()) if w not in STOPWORDS}


def jaccard(a: set[str], b: set[str]) -> float:
    """|a & b| / |a | b|; 1.0 when both are empty."""
    union = a | b
    return 1.0 if not union else len(a & b) / len(union)


def eligible_positions(fai: Sequence[float]) -> np.ndarray:
    """Positions 0 .. R-2 up to the last nonzero FAI (module docstring), ascending."""
    f = np.asarray(fai, dtype=np.float64)
    nz = np.flatnonzero(f != 0.0)
    if f.size < 2 or nz.size == 0:
        return np.zeros(0, dtype=np.int64)
    return np.arange(0, min(int(nz[-1]), f.size - 2) + 1, dtype=np.int64)


def pick_positions(fai: Sequence[float], n: int) -> tuple[list[int], list[int]]:
    """(high, low): the n highest- and n lowest-FAI eligible positions, disjoint, the i-th
    of each list paired in trial i; ties go to the earlier position."""
    f = np.asarray(fai, dtype=np.float64)
    pos = eligible_positions(f)
    m = min(n, len(pos) // 2)
    if m <= 0:
        return [], []
    high = pos[np.argsort(-f[pos], kind="stable")[:m]]
    rest = np.setdiff1d(pos, high)  # disjoint even when every FAI is tied
    low = rest[np.argsort(f[rest], kind="stable")[:m]]
    return [int(t) for t in high], [int(t) for t in low]


@dataclass
class Trial:
    """One paired trial: the same response perturbed at a high- and a low-FAI position."""

    record: str
    high_pos: int
    low_pos: int
    high_fai: float
    low_fai: float
    jaccard_high: float
    jaccard_low: float
    high_alt: int = -1
    low_alt: int = -1


@dataclass
class PerturbSummary:
    """Means, the share of trials with high < low, and their bootstrap intervals."""

    n_responses: int
    n_trials: int
    jaccard_high: float
    jaccard_low: float
    share_high_lower: float
    share_tied: float
    diff_low_minus_high: float
    ci: dict[str, tuple[float, float] | None] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _stats(jh: np.ndarray, jl: np.ndarray) -> dict[str, float]:
    return {
        "jaccard_high": float(jh.mean()),
        "jaccard_low": float(jl.mean()),
        "share_high_lower": float((jh < jl).mean()),
        "share_tied": float((jh == jl).mean()),
        "diff_low_minus_high": float((jl - jh).mean()),
    }


def bootstrap_by_group(
    groups: Sequence[str],
    jh: np.ndarray,
    jl: np.ndarray,
    n_boot: int,
    seed: int,
    level: float = 0.95,
) -> dict[str, tuple[float, float] | None]:
    """Percentile intervals of every `_stats` value, resampling whole groups (responses)
    with replacement, `n_boot` times from `np.random.default_rng(seed)`."""
    names = list(_stats(jh[:1], jl[:1])) if len(jh) else []
    keys = list(dict.fromkeys(groups))
    if n_boot <= 0 or len(keys) < 2:
        return {k: None for k in names}
    index = {k: np.flatnonzero(np.asarray(groups) == k) for k in keys}
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {k: [] for k in names}
    for _ in range(n_boot):
        pick = np.concatenate([index[keys[i]] for i in rng.integers(0, len(keys), len(keys))])
        for k, v in _stats(jh[pick], jl[pick]).items():
            draws[k].append(v)
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return {k: (float(np.percentile(v, lo)), float(np.percentile(v, hi))) for k, v in draws.items()}


def summarize(trials: Sequence[Trial], n_boot: int = 1000, seed: int = 0) -> PerturbSummary:
    """The summary of paired trials (module docstring: Statistics)."""
    if not trials:
        raise ValueError("no trials: every response was too short to pick positions from")
    jh = np.array([t.jaccard_high for t in trials], dtype=np.float64)
    jl = np.array([t.jaccard_low for t in trials], dtype=np.float64)
    groups = [t.record for t in trials]
    return PerturbSummary(
        n_responses=len(set(groups)),
        n_trials=len(trials),
        **_stats(jh, jl),
        ci=bootstrap_by_group(groups, jh, jl, n_boot, seed),
    )


def format_summary(s: PerturbSummary, paper: bool = True) -> str:
    """A text table of the summary (with the paper's numbers beside ours)."""

    def ci(name: str, pct: bool = False) -> str:
        c = s.ci.get(name)
        if c is None:
            return ""
        f = (lambda v: f"{v * 100:.1f}%") if pct else (lambda v: f"{v:.3f}")
        return f"[{f(c[0])}, {f(c[1])}]"

    rows = [
        ("mean Jaccard, high-FAI position", f"{s.jaccard_high:.3f}", ci("jaccard_high"), "0.534"),
        ("mean Jaccard, low-FAI position", f"{s.jaccard_low:.3f}", ci("jaccard_low"), "0.631"),
        (
            "mean difference low - high",
            f"{s.diff_low_minus_high:+.3f}",
            ci("diff_low_minus_high"),
            "+0.097",
        ),
        (
            "trials with high < low",
            f"{s.share_high_lower * 100:.2f}%",
            ci("share_high_lower", pct=True),
            "87.14%",
        ),
        (
            "trials tied (high == low)",
            f"{s.share_tied * 100:.2f}%",
            ci("share_tied", pct=True),
            "-",
        ),
    ]
    head = f"{s.n_responses} responses, {s.n_trials} paired trials\n"
    cols = ["statistic", "ours", "95% CI"] + (["paper"] if paper else [])
    widths = [34, 9, 18, 7]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=False))]
    for r in rows:
        cells = list(r[:3]) + ([r[3]] if paper else [])
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=False)))
    return head + "\n".join(lines)
