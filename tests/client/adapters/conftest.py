"""Fixtures shared by the trainer adapter tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest


@pytest.fixture(scope="module")
def model_dir(llama_model: Path) -> Path:
    """The tiny random Llama the adapter tests' servers (and trainer-side copies) load."""

    return llama_model


@pytest.fixture(scope="module")
def target(model_dir: Path, start_server) -> Iterator[str]:
    """A real CreditServer on that model, one per test module."""
    s = start_server(model_dir)
    yield s.target
    s.stop()


@pytest.fixture(autouse=True)
def frozen_scoring_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests score a fixed debug model on purpose: declare it (policy_check.py), so an
    unpinned score does not warn. The stale-policy tests delete or set it themselves."""
    monkeypatch.setenv("ANCHORCREDIT_STALE_POLICY", "frozen")


def _expected_summary(gammas: Any) -> dict[str, float]:
    """The credit summary recomputed from the gammas of every reweighted token of a step."""
    g = np.concatenate([np.asarray(x, np.float64).ravel() for x in gammas])
    return {
        "gamma_mean": float(g.mean()),
        "gamma_min": float(g.min()),
        "gamma_max": float(g.max()),
        "gamma_p90": float(np.quantile(g, 0.9)),
        "amplified_fraction": float((g > 1).sum() / g.size),
    }


@pytest.fixture
def check_step_summary() -> Callable[..., dict[str, float]]:
    """check(logged, gammas, *, hit_ratio, policy_step=None, cast=float): asserts the
    per-step credit summary that reached a trainer's logged metrics (`logged`: name ->
    value, names `anchorcredit/<suffix>`) is the one recomputed from `gammas` (the gamma of
    each token the adapter reweighted, as the test asked them of the service): every name
    there, gamma statistics equal, score seconds > 0, the cache hit ratio and the policy
    step as given (None: the version is not step-<n>-<run>, so no policy_step). `cast`:
    the trainer's own rounding of a logged number (e.g. AReaL's float32). Returns the
    expected gamma statistics."""

    def check(
        logged: Mapping[str, Any],
        gammas: Any,
        *,
        hit_ratio: float,
        policy_step: int | None = None,
        cast: Callable[[float], float] = float,
    ) -> dict[str, float]:
        want = _expected_summary(gammas)
        assert 0 < want["amplified_fraction"] < 1  # the credit is neither all 1 nor all up
        names = {f"anchorcredit/{k}" for k in (*want, "score_seconds", "cache_hit_ratio")}
        if policy_step is not None:
            names.add("anchorcredit/policy_step")
        assert names <= set(logged), sorted(names - set(logged))
        for k, v in want.items():
            assert logged[f"anchorcredit/{k}"] == cast(v), k
        assert logged["anchorcredit/score_seconds"] > 0
        assert logged["anchorcredit/cache_hit_ratio"] == cast(hit_ratio)
        if policy_step is None:
            assert "anchorcredit/policy_step" not in logged
        else:
            assert logged["anchorcredit/policy_step"] == cast(policy_step)
        return want

    return check
