"""Stale-policy check: scoring that no weight sync of this run pins.

Every adapter's weight sync pins each score() to the version it pushed (a stale answer is
refused by the service). Without one, scores come from whatever the service holds: another
run's final weights, or the starting checkpoint while the policy moves on. So an unpinned
score first asks the service, once per client, which version it serves, and accepts it
only when the label is `step-<n>-<run>` with `run` one of this run's ids (versions.py);
otherwise it warns loudly (StalePolicyWarning and a log line), or refuses.

The setting (`stale_policy=` where the adapter takes it, else ANCHORCREDIT_STALE_POLICY):
- "warn" (default): warn once per client, then score;
- "error": refuse with StalePolicyError on every unpinned call;
- "frozen": the scoring policy is fixed on purpose (e.g. a reference model): no check.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
import weakref
from typing import Any

from anchorcredit.client.adapters.versions import parse_version, this_run_ids

__all__ = [
    "STALE_POLICY_ENV",
    "STALE_POLICY_MODES",
    "StalePolicyError",
    "StalePolicyWarning",
    "check_served_policy",
    "stale_policy_mode",
]

log = logging.getLogger("anchorcredit.adapters")

STALE_POLICY_ENV = "ANCHORCREDIT_STALE_POLICY"
STALE_POLICY_MODES = ("warn", "error", "frozen")

# client -> the served version already checked (warned about or accepted)
_CHECKED: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


class StalePolicyWarning(UserWarning):
    """Scores come from weights no weight sync of this run put on the service."""


class StalePolicyError(RuntimeError):
    """Refused (stale_policy="error"): the served weights are not this run's."""


def stale_policy_mode(mode: str | None = None) -> str:
    """`mode`, else ANCHORCREDIT_STALE_POLICY, else "warn"; a clear error for other values."""
    value = mode if mode is not None else os.environ.get(STALE_POLICY_ENV) or "warn"
    value = value.strip().lower()
    if value not in STALE_POLICY_MODES:
        source = "stale_policy" if mode is not None else STALE_POLICY_ENV
        raise ValueError(f"{source} must be one of {STALE_POLICY_MODES}, got {value!r}")
    return value


def check_served_policy(client: Any, mode: str | None = None) -> str | None:
    """Check, before an unpinned score, that the service serves this run's weights.

    Returns the served version when it was asked (None for "frozen" or an earlier check of
    this client). Warns (StalePolicyWarning) or raises StalePolicyError when the version
    was not pushed by this run.
    """
    mode = stale_policy_mode(mode)
    if mode == "frozen":
        return None
    with _LOCK:
        if mode == "warn" and client in _CHECKED:
            return None
    served = client.served_version()
    parsed = parse_version(served)
    if parsed is not None and parsed[1] in this_run_ids():
        log.info("anchorcredit: scoring with %r, pushed by this run", served)
        with _LOCK:
            _CHECKED[client] = served
        return served
    whose = (
        f"pushed by run {parsed[1]!r}, not this one"
        if parsed is not None
        else "not pushed by any weight sync of this run"
    )
    message = (
        f"anchorcredit: no weight sync of this run pins the scores, and the credit service "
        f"serves policy version {served!r} ({whose}): gamma comes from weights that are not "
        "the policy being trained. Install the trainer's weight sync (docs/trainers/), or, "
        "if a fixed scoring policy is meant, say so with stale_policy='frozen' "
        f"({STALE_POLICY_ENV}=frozen); {STALE_POLICY_ENV}=error refuses instead of warning."
    )
    if mode == "error":
        raise StalePolicyError(message)
    with _LOCK:
        _CHECKED[client] = served
    log.warning(message)
    warnings.warn(message, StalePolicyWarning, stacklevel=3)
    return served
