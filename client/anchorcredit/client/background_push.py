"""Weight pushes off the trainer's critical path: one push at a time in a background thread.

    record = client.push_weights_background(weights, version, step=n)   # returns at once
    ... generate the next rollouts ...
    client.score(...)        # waits for the push in flight; raises if it failed

The push of step n runs while the trainer generates step n+1's rollouts: the scorer is only
needed after them. Three rules keep it exact:

- a score call waits for the push in flight (never scores from the weights it replaces) and
  a push that failed is raised there, once, as a `BackgroundPushError` naming its step and
  version (never a silent stale score);
- the next push waits for the one in flight first (one push at a time, in order);
- `fence()` waits without raising: call it before the trainer changes the tensors being
  sent (the optimizer step), since a plain model's tensors are sent by reference.

`take_times()` gives what the per-step summary reports (adapters/summary.py): the last
push's wall seconds, the seconds the trainer was blocked on syncing and the wall seconds
since the previous `take_times()` (one step). Torch-free.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from anchorcredit.client.errors import CreditServiceError

__all__ = ["BackgroundPushError", "BackgroundPusher", "PushRecord", "SyncTimes"]


class BackgroundPushError(CreditServiceError):
    """A background weight push failed; raised at the next score (or push) call.

    `.step`, `.version`: the push that failed; `.failed`: {address: error} when the push
    named addresses; `__cause__`: the push's own error."""

    def __init__(self, record: PushRecord):
        err = record.error
        code = getattr(err, "code", None)
        if not isinstance(code, grpc.StatusCode):
            code = grpc.StatusCode.UNKNOWN
        step = f"step {record.step} " if record.step is not None else ""
        super().__init__(
            code,
            f"the background weight push of {step}(policy version {record.version!r}) "
            f"failed: {err}; the service still serves the weights it should have replaced, "
            "so nothing is scored from them",
        )
        self.step = record.step
        self.version = record.version
        self.failed = getattr(err, "failed", {})


@dataclass
class PushRecord:
    """One push: its version, step, timings (perf_counter) and outcome."""

    version: str
    step: int | None = None
    submitted: float = 0.0
    started: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    seconds: float = 0.0  # wall time of the push itself
    error: BaseException | None = None
    result: Any = None

    @property
    def ok(self) -> bool:
        return self.finished.is_set() and self.error is None


@dataclass(frozen=True)
class SyncTimes:
    """One step's sync figures (see the module doc)."""

    push_seconds: float | None  # wall time of the push that finished since the last take
    blocked_seconds: float  # the trainer waited this long on syncing since the last take
    period_seconds: float | None  # wall time since the last take; None at the first


class BackgroundPusher:
    """Runs `push(weights, version, **kwargs)` (CreditClient.push_weights) in a background
    thread, one at a time."""

    def __init__(self, push: Callable[..., Any]):
        self._push = push
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.current: PushRecord | None = None  # the last push submitted
        self.last_done: PushRecord | None = None  # the last push that succeeded
        self._unreported: PushRecord | None = None  # failed, not raised yet
        self._blocked = 0.0
        self._last_take: float | None = None
        self._taken: PushRecord | None = None  # the push whose seconds were last taken

    # -- submitting ----------------------------------------------------------------------
    def submit(
        self, weights: Any, version: str, *, step: int | None = None, **kwargs: Any
    ) -> PushRecord:
        """Start pushing `weights` as `version` in the background; returns its record.
        Waits for the push in flight first and raises its failure if not yet reported.
        `weights` must stay unchanged until the push ends (see fence())."""
        self.wait()
        record = PushRecord(version, step, time.perf_counter())
        thread = threading.Thread(
            target=self._run,
            args=(record, weights, version, kwargs),
            name="anchorcredit-background-push",
            daemon=True,
        )
        with self._lock:
            self.current, self._thread = record, thread
        thread.start()
        return record

    def _run(self, record: PushRecord, weights: Any, version: str, kwargs: dict) -> None:
        record.started.set()
        t0 = time.perf_counter()
        try:
            record.result = self._push(weights, version, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - reported at the next score call
            record.error = exc
        finally:
            record.seconds = time.perf_counter() - t0
            with self._lock:
                if record.error is None:
                    self.last_done = record
                else:
                    self._unreported = record
            record.finished.set()

    # -- waiting -------------------------------------------------------------------------
    def in_flight(self) -> bool:
        """A push has been submitted and has not finished."""
        rec = self.current
        return rec is not None and not rec.finished.is_set()

    def fence(self) -> None:
        """Wait for the push in flight (if any) without raising: before the tensors it sends
        change. Its failure, if any, is still raised by the next wait()."""
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return
        t0 = time.perf_counter()
        thread.join()
        self.add_blocked(time.perf_counter() - t0)

    def wait(self) -> PushRecord | None:
        """Wait for the push in flight; raise BackgroundPushError (once) for a push that
        failed and was not reported yet. Returns the last push that succeeded."""
        self.fence()
        with self._lock:
            failed, self._unreported = self._unreported, None
            done = self.last_done
        if failed is not None:
            raise BackgroundPushError(failed) from failed.error
        return done

    # -- figures ---------------------------------------------------------------------------
    def add_blocked(self, seconds: float) -> None:
        """Count `seconds` the trainer spent syncing in the foreground (a wait, a gather)."""
        with self._lock:
            self._blocked += max(0.0, float(seconds))

    def take_times(self) -> SyncTimes:
        """The figures since the last take (and reset the blocked seconds). push_seconds is
        None when no push succeeded since then (a step without a sync reports none)."""
        now = time.perf_counter()
        with self._lock:
            blocked, self._blocked = self._blocked, 0.0
            period = None if self._last_take is None else now - self._last_take
            self._last_take = now
            done = self.last_done if self.last_done is not self._taken else None
            if done is not None:
                self._taken = done
        return SyncTimes(done.seconds if done is not None else None, blocked, period)

    def close(self) -> None:
        """Let the push in flight finish (its failure stays unreported)."""
        self.fence()
