"""The per-step credit summary every trainer adapter logs into its trainer's own metrics.

One credit step (one or more `client.score` calls of the shared step in common.py) knows:
the gamma of every response token the adapter reweights (the trainer's response/loss mask),
the seconds `client.score` took, that call's cache hits and misses
(`CreditClient.last_stats`), and the policy version the scores came from. `StepSummary`
collects them and `metrics()` names them alike in every trainer:

    anchorcredit/gamma_mean, _min, _max, _p90   gamma over the reweighted tokens
    anchorcredit/amplified_fraction            share of those tokens with gamma > 1
    anchorcredit/score_seconds                 wall seconds in client.score this step
    anchorcredit/cache_hit_ratio               hits / (hits + misses) of those calls
    anchorcredit/policy_step                   n of the scoring version `step-<n>-<run>`
    anchorcredit/push_seconds                  wall seconds of the weight push this step's
                                               scores pinned (in the background or not)
    anchorcredit/sync_seconds                  seconds the trainer was blocked on the weight
                                               sync since the previous step's scoring
                                               (gathering, waiting for a push to commit)
    anchorcredit/sync_share                    sync_seconds / the wall seconds of that step
                                               (previous scoring -> this one)

Trainers' metrics take numbers only, so the version's full label goes to the process log
(`log_version`: one INFO line on logger `anchorcredit.adapters` whenever it changes).
The sync figures come from the scoring client's BackgroundPusher (client/background_push.py)
where the adapter pushes through that client (TRL); adapters whose pushes run in other
processes pass them with `add_sync` (docs/OBSERVABILITY.md). A run that never pushed has no
sync entries. A step with no reweighted token has no gamma entries (a NaN would poison the trainer's
averages), one that looked nothing up no cache_hit_ratio, and a version that is not
`step-<n>-<run>` no policy_step. docs/OBSERVABILITY.md#in-the-trainers-own-logs has the
names per trainer. Torch-free (numpy only).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from anchorcredit.client.adapters.versions import parse_version
from anchorcredit.client.reweight import _to_numpy

__all__ = [
    "GAMMA_KEYS",
    "KEYS",
    "PREFIX",
    "SYNC_KEYS",
    "StepSummary",
    "gamma_summary",
    "log_version",
]

PREFIX = "anchorcredit/"
GAMMA_KEYS = ("gamma_mean", "gamma_min", "gamma_max", "gamma_p90", "amplified_fraction")
SYNC_KEYS = ("push_seconds", "sync_seconds", "sync_share")
KEYS = (*GAMMA_KEYS, "score_seconds", "cache_hit_ratio", "policy_step", *SYNC_KEYS)

log = logging.getLogger("anchorcredit.adapters")


def gamma_summary(gammas: np.ndarray) -> dict[str, float]:
    """Mean, min, max, 90th percentile (linear interpolation, numpy's default) and the share
    above 1 of a flat array of gammas; {} when it is empty."""
    g = np.asarray(gammas, dtype=np.float64).ravel()
    if g.size == 0:
        return {}
    return {
        "gamma_mean": float(g.mean()),
        "gamma_min": float(g.min()),
        "gamma_max": float(g.max()),
        "gamma_p90": float(np.quantile(g, 0.9)),
        "amplified_fraction": float(np.count_nonzero(g > 1.0) / g.size),
    }


class StepSummary:
    """Collects one trainer step's credit (possibly several score calls, e.g. one per
    OpenRLHF micro-batch); `metrics()` gives the summary over all of them."""

    def __init__(self) -> None:
        self._gammas: list[np.ndarray] = []
        self.score_seconds = 0.0
        self.hits = 0
        self.misses = 0
        self.version: str | None = None  # of the last call that scored
        self.push_seconds: float | None = None
        self.sync_seconds = 0.0
        self.period_seconds = 0.0  # the step's wall seconds the sync share is taken of
        self.synced = False

    def add_sync(
        self, push_seconds: float | None, blocked_seconds: float, period_seconds: float | None
    ) -> None:
        """The weight sync's figures since the previous add_sync (background_push.SyncTimes):
        the last push's wall seconds (None: nothing pushed yet), the seconds the trainer was
        blocked on syncing and the wall seconds they are a share of (None: unknown)."""
        if push_seconds is None and not blocked_seconds:
            return
        self.synced = True
        if push_seconds is not None:
            self.push_seconds = float(push_seconds)
        self.sync_seconds += float(blocked_seconds)
        if period_seconds is not None:
            self.period_seconds += float(period_seconds)

    def add_call(
        self, seconds: float, stats: Mapping[str, Any] | None, version: str | None
    ) -> None:
        """One client.score call: its wall seconds, the client's `last_stats` after it
        ({"hits", "misses"}) and the version its results came from."""
        self.score_seconds += float(seconds)
        stats = stats or {}
        self.hits += int(stats.get("hits", 0))
        self.misses += int(stats.get("misses", 0))
        if version is not None:
            self.version = str(version)

    def add_gammas(self, dense: Any, mask: Any) -> None:
        """The gammas of `dense` where `mask` is set: the tokens whose advantage the adapter
        scales (same shape; tensors or arrays)."""
        d = _to_numpy(dense)
        m = _to_numpy(mask).astype(bool, copy=False)
        if d.shape != m.shape:
            raise ValueError(f"gamma {d.shape} and mask {m.shape} differ in shape")
        self._gammas.append(np.asarray(d[m], dtype=np.float64))

    def metrics(self, prefix: str = PREFIX) -> dict[str, float]:
        """The summary under `prefix` + KEYS names (only numbers: see the module doc)."""
        g = np.concatenate(self._gammas) if self._gammas else np.zeros(0)
        out: dict[str, float] = dict(gamma_summary(g))
        out["score_seconds"] = self.score_seconds
        looked_up = self.hits + self.misses
        if looked_up:
            out["cache_hit_ratio"] = self.hits / looked_up
        parsed = parse_version(self.version) if self.version is not None else None
        if parsed is not None:
            out["policy_step"] = float(parsed[0])
        if self.synced:
            if self.push_seconds is not None:
                out["push_seconds"] = self.push_seconds
            out["sync_seconds"] = self.sync_seconds
            if self.period_seconds > 0:
                out["sync_share"] = min(1.0, self.sync_seconds / self.period_seconds)
        return {prefix + k: v for k, v in out.items()}


_LOGGED: dict[str, str] = {}
_LOGGED_LOCK = threading.Lock()


def log_version(trainer: str, version: str | None) -> None:
    """One INFO line when the version scoring `trainer`'s steps changes (the full label,
    which the trainers' number-only metrics cannot hold)."""
    if version is None:
        return
    with _LOGGED_LOCK:
        if _LOGGED.get(trainer) == version:
            return
        _LOGGED[trainer] = version
    log.info("anchorcredit[%s]: credit scored by policy version %r", trainer, version)
