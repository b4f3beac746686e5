"""The client's one retry policy: exponential backoff with full jitter, inside time budgets.

Every retry loop of the client asks it how long to wait and whether time is left: the
transport's call (a busy server, a down one), CreditClient.score's re-read of a policy
version that moved on, and the replica set's wait for a version to be served. Which status
codes are worth a retry is the status table's (anchorcredit.status), not this module's.

    wait(attempt)          uniform(0, min(max_s, base_s * 2**attempt))       full jitter
    wait(attempt, hint)    hint + uniform(0, max(hint, that window))         never sooner
                                                                              than told
Budgets, from the call's first attempt:
    busy_budget_s       RESOURCE_EXHAUSTED with a hint (a full queue): 120 s
    reconnect_budget_s  UNAVAILABLE while no address answers (a restart, a rollout): 60 s
Torch-free and grpc-free.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff windows and the time budgets of retries (seconds)."""

    base_s: float = 0.05
    max_s: float = 5.0
    busy_budget_s: float = 120.0
    reconnect_budget_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("base_s", "max_s", "busy_budget_s", "reconnect_budget_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not value >= 0 or value == float("inf"):
                raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")

    def window(self, attempt: int) -> float:
        """The backoff window after `attempt` failed attempts of one kind (0-based)."""
        return min(self.max_s, self.base_s * 2 ** min(max(attempt, 0), 60))

    def wait(self, attempt: int, hint_s: float | None = None) -> float:
        """Seconds to wait before the next attempt: full jitter over the window, or the
        server's hint plus jitter over at least the hint (rejected callers of one burst come
        back spread over the drain time, not in a wave)."""
        cap = self.window(attempt)
        if hint_s is None:
            return random.uniform(0.0, cap)
        return hint_s + random.uniform(0.0, max(hint_s, cap))


@dataclass
class RetryClock:
    """One call's retries: when it began and how long it may go on."""

    budget_s: float
    started: float = field(default_factory=time.monotonic)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def left(self) -> float:
        return self.budget_s - self.elapsed

    def sleep(self, seconds: float) -> bool:
        """Sleep `seconds`, cut to what is left of the budget; False (no sleep) when the
        budget is spent."""
        left = self.left
        if left <= 0:
            return False
        time.sleep(max(0.0, min(seconds, left)))
        return True
