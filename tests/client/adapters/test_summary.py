"""The per-step credit summary (adapters/summary.py) against a brute-force computation, and
what the shared credit step (common.py) feeds it from a real service call."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from anchorcredit.client import CreditClient
from anchorcredit.client.adapters import summary as sm
from anchorcredit.client.adapters.common import credit_for_batch

NAMES = {
    "anchorcredit/gamma_mean",
    "anchorcredit/gamma_min",
    "anchorcredit/gamma_max",
    "anchorcredit/gamma_p90",
    "anchorcredit/amplified_fraction",
    "anchorcredit/score_seconds",
    "anchorcredit/cache_hit_ratio",
    "anchorcredit/policy_step",
}


def brute_force(dense: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Element by element, no numpy reductions: the masked gammas, sorted, and the 90th
    percentile by linear interpolation between the closest ranks (numpy's default)."""
    rows, cols = mask.shape
    g = sorted(float(dense[i, j]) for i in range(rows) for j in range(cols) if mask[i, j])
    if not g:
        return {}
    rank = 0.9 * (len(g) - 1)
    lo, hi = math.floor(rank), math.ceil(rank)
    return {
        "gamma_mean": math.fsum(g) / len(g),
        "gamma_min": g[0],
        "gamma_max": g[-1],
        "gamma_p90": g[lo] + (g[hi] - g[lo]) * (rank - lo),
        "amplified_fraction": sum(1 for x in g if x > 1.0) / len(g),
    }


def _random_step(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Dense float32 gamma as the service returns it: exactly 1 on many tokens, above 1 on
    some (gamma_amp), a few below; a random mask, sometimes empty rows."""
    b, t = int(rng.integers(1, 6)), int(rng.integers(1, 12))
    dense = np.ones((b, t), np.float32)
    up = rng.random((b, t)) < 0.4
    dense[up] = rng.uniform(1.0, 2.0, int(up.sum())).astype(np.float32)
    down = rng.random((b, t)) < 0.1
    dense[down] = rng.uniform(0.5, 1.0, int(down.sum())).astype(np.float32)
    mask = rng.random((b, t)) < rng.uniform(0.2, 1.0)
    mask[rng.random(b) < 0.2] = False
    return dense, mask


def test_summary_equals_brute_force_on_random_masked_steps():
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(300):
        steps = [_random_step(rng) for _ in range(int(rng.integers(1, 4)))]
        s = sm.StepSummary()
        for dense, mask in steps:
            s.add_gammas(dense, mask)
        got = s.metrics()
        # several calls of one step summarise as one flat set of tokens
        flat_d = np.concatenate([d[m] for d, m in steps])[None, :]
        want = brute_force(flat_d, np.ones_like(flat_d, bool))
        gamma_keys = {f"anchorcredit/{k}" for k in sm.GAMMA_KEYS}
        if not want:
            assert gamma_keys.isdisjoint(got)
            continue
        checked += 1
        for k in ("gamma_min", "gamma_max", "amplified_fraction"):
            assert got[f"anchorcredit/{k}"] == want[k], k
        for k in ("gamma_mean", "gamma_p90"):
            assert got[f"anchorcredit/{k}"] == pytest.approx(want[k], rel=1e-12, abs=0), k
    assert checked > 250


def test_an_empty_mask_has_no_gamma_entries_and_no_nan():
    s = sm.StepSummary()
    s.add_gammas(np.full((2, 3), 1.5, np.float32), np.zeros((2, 3), bool))
    s.add_call(0.25, {"hits": 0, "misses": 0}, None)
    assert s.metrics() == {"anchorcredit/score_seconds": 0.25}
    assert sm.gamma_summary(np.zeros(0)) == {}


def test_calls_add_up_and_the_version_gives_the_step():
    s = sm.StepSummary()
    s.add_gammas([[1.0, 1.5, 1.0, 2.0]], [[True, True, False, True]])
    s.add_call(0.5, {"hits": 1, "misses": 3}, "step-6-run1")
    s.add_call(0.25, {"hits": 4, "misses": 0}, "step-7-ab-cd")  # run ids may hold dashes
    got = s.metrics()
    assert set(got) == NAMES
    assert got["anchorcredit/score_seconds"] == 0.75
    assert got["anchorcredit/cache_hit_ratio"] == 5 / 8
    assert got["anchorcredit/policy_step"] == 7.0 and s.version == "step-7-ab-cd"
    assert got["anchorcredit/amplified_fraction"] == 2 / 3
    assert got["anchorcredit/gamma_p90"] == pytest.approx(1.5 + 0.5 * 0.8)
    # trainers with another separator keep the suffixes
    assert set(s.metrics(prefix="anchorcredit_")) == {n.replace("/", "_") for n in NAMES}
    other = sm.StepSummary()
    other.add_call(0.1, None, "base")  # not step-<n>-<run>: no number to log
    assert "anchorcredit/policy_step" not in other.metrics()
    with pytest.raises(ValueError, match="differ in shape"):
        other.add_gammas(np.ones((2, 3)), np.ones((3, 2), bool))


def test_sync_figures_add_up_and_a_run_without_pushes_has_none():
    s = sm.StepSummary()
    s.add_sync(None, 0.0, 2.0)  # nothing pushed, nothing waited for: no sync entries
    s.add_call(0.5, None, "step-1-r")
    assert not {f"anchorcredit/{k}" for k in sm.SYNC_KEYS} & set(s.metrics())
    s.add_sync(1.25, 0.25, 4.0)  # e.g. two scoring calls of one step
    s.add_sync(1.5, 0.5, 2.0)
    got = s.metrics()
    assert got["anchorcredit/push_seconds"] == 1.5  # the push the last call pinned
    assert got["anchorcredit/sync_seconds"] == 0.75
    assert got["anchorcredit/sync_share"] == 0.75 / 6.0  # of the 4 + 2 s since pushing
    first = sm.StepSummary()
    first.add_sync(1.0, 1.0, None)  # the first step: no previous scoring to measure from
    assert "anchorcredit/sync_share" not in first.metrics()
    assert first.metrics()["anchorcredit/sync_seconds"] == 1.0


def test_the_version_label_is_logged_once_per_change(caplog):
    caplog.set_level(logging.INFO, logger="anchorcredit.adapters")
    for v in ("step-1-x9", "step-1-x9", None, "step-2-x9"):
        sm.log_version("test-summary", v)
    lines = [r.getMessage() for r in caplog.records if "test-summary" in r.getMessage()]
    assert lines == [
        "anchorcredit[test-summary]: credit scored by policy version 'step-1-x9'",
        "anchorcredit[test-summary]: credit scored by policy version 'step-2-x9'",
    ]


def test_the_shared_credit_step_feeds_the_summary(target):
    """credit_for_batch against a real service: seconds measured around score(), the cache
    hit ratio from the client's own count (0 on a new batch, 1 on the same batch again),
    the served version, and the gammas on the response mask."""
    prompt_ids = np.array([[0, 5, 6, 7], [8, 9, 10, 11]])
    prompt_mask = prompt_ids > 0
    response_ids = np.array([[12, 13, 14, 15, 16, 0], [17, 18, 19, 20, 21, 22]])
    response_mask = response_ids > 0
    adv = np.array([1.0, -0.5])
    with CreditClient([target]) as client, CreditClient([target], cache=False) as uncached:
        got = []
        for c in (client, client, uncached):
            s = sm.StepSummary()
            _, dense = credit_for_batch(
                c, adv, prompt_ids, prompt_mask, response_ids, response_mask, summary=s
            )
            got.append((s.metrics(), dense, s.version))
        served = client.model_info(refresh=True).policy_version
    want = brute_force(got[0][1], response_mask)
    assert want["amplified_fraction"] > 0  # the debug model's credit is not all ones
    for metrics, dense, version in got:
        np.testing.assert_array_equal(dense, got[0][1])
        assert set(metrics) >= {f"anchorcredit/{k}" for k in sm.GAMMA_KEYS}
        assert metrics["anchorcredit/gamma_max"] == want["gamma_max"]
        assert metrics["anchorcredit/amplified_fraction"] == want["amplified_fraction"]
        assert metrics["anchorcredit/score_seconds"] > 0
        assert version == served
    assert [m["anchorcredit/cache_hit_ratio"] for m, _, _ in got] == [0.0, 1.0, 0.0]
