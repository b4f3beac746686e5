"""Policy version labels every weight sync writes: `step-<n>-<run id>`.

The run id in the label tells whose weights the service holds: the stale-policy check
(`policy_check.py`) accepts a served version only when its run id is one of this run's.
A run's ids are ANCHORCREDIT_RUN_ID (when set) and every run id a weight sync of this
process named versions with (`note_run`).
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import threading
import uuid

__all__ = [
    "default_run_id",
    "note_run",
    "parse_version",
    "ray_job_run_id",
    "same_on_every_rank",
    "this_run_ids",
    "version_name",
]

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


def ray_job_run_id() -> str:
    """The Ray job's id and a hash of its cluster session (the same in every process of
    one job, new for every run); random when Ray is not running (one process)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        context = ray.get_runtime_context()
        job = str(context.get_job_id())
        # Job ids restart at 01000000 on every fresh cluster (verl's own ray.init()): the
        # cluster's session name, shared by its processes, tells two runs apart.
        getter = getattr(context, "get_session_name", None)
        try:  # older Ray: what get_session_name() reads
            session = getter() if getter else context.worker.node.session_name
        except AttributeError:
            raise RuntimeError(
                "this Ray does not tell its session name, so the Ray job id alone would "
                "repeat across runs: set ANCHORCREDIT_RUN_ID to a label unique to this run"
            ) from None
        digest = hashlib.sha256(str(session).encode()).hexdigest()[:8]
        return f"{job}-{digest}"
    return uuid.uuid4().hex[:8]  # one process (no Ray): trainer and actor are the same


_PROCESS_RUN_ID: list[str] = []


def default_run_id() -> str:
    """ANCHORCREDIT_RUN_ID, else the Ray job's run id (ray_job_run_id), else one random id
    for this process (kept: every sync of the process names the same run)."""
    env = os.environ.get("ANCHORCREDIT_RUN_ID")
    if env:
        return env
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return ray_job_run_id()
    with _LOCK:
        if not _PROCESS_RUN_ID:
            _PROCESS_RUN_ID.append(uuid.uuid4().hex[:8])
        return _PROCESS_RUN_ID[0]


def same_on_every_rank(value: str) -> str:
    """Rank 0's value on every rank (the run id that names versions), when distributed."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return value
    if dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return str(box[0])
