"""Policy version labels every weight sync writes: `step-<n>-<run id>`.

The run id in the label tells whose weights the service holds: the stale-policy check
(`policy_check.py`) accepts a served version only when its run id is one of this run's.
A run's ids are ANCHORCREDIT_RUN_ID (when set) and every run id a weight sync of this
process named versions with (`note_run`).
"""

from __future__ import annotations

import os
import re
import threading

__all__ = ["note_run", "parse_version", "this_run_ids", "version_name"]

_VERSION = re.compile(r"step-(\d+)-(.+)")
_RUNS: set[str] = set()
_LOCK = threading.Lock()


def version_name(step: int, run_id: str) -> str:
    return f"step-{int(step)}-{run_id}"


def parse_version(version: str) -> tuple[int, str] | None:
    """(step, run id) of a `step-<n>-<run>` label, None for any other name."""
    m = _VERSION.fullmatch(version)
    return (int(m.group(1)), m.group(2)) if m else None


def note_run(run_id: str) -> None:
    """Record that a weight sync of this process names versions with `run_id`."""
    with _LOCK:
        _RUNS.add(str(run_id))


def this_run_ids() -> frozenset[str]:
    """The run ids whose versions count as this run's."""
    with _LOCK:
        runs = set(_RUNS)
    env = os.environ.get("ANCHORCREDIT_RUN_ID")
    if env:
        runs.add(env)
    return frozenset(runs)
