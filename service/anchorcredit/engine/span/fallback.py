"""When the Triton path fails on a device, the call is answered by the chunked backend.

A kernel that does not compile or launch on some GPU (a shared-memory limit we did not
foresee, a toolchain bug) must not fail scoring requests: the engine's packed front retries
the call once on the chunked backend, logs one warning per kind of call, and counts every
call it served that way. A kind that failed goes straight to the chunked backend from then
on (a failing compile would otherwise be retried, and paid for, at every layer).

The count is process-wide and torch-free to read: the server exports it as
anchorcredit_span_fallback_total (server/metrics.py reads `total()` at each scrape).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Hashable

log = logging.getLogger("anchorcredit.engine.span")

_lock = threading.Lock()
_failed: dict[Hashable, str] = {}  # call kind -> the error that made it fall back
_calls = 0  # calls answered by the chunked backend after a Triton failure


def known_failure(kind: Hashable) -> bool:
    """True when this kind of call already failed on the Triton path in this process."""
    return kind in _failed


def record(kind: Hashable, error: BaseException | None = None) -> None:
    """Count one call served by the fallback; the first failure of a kind logs a warning."""
    global _calls
    with _lock:
        _calls += 1
        first = error is not None and kind not in _failed
        if first:
            _failed[kind] = f"{type(error).__name__}: {error}"
    if first:
        log.warning(
            "the triton span kernel failed for %s (%s); this kind of call now uses the "
            "chunked backend (same numbers, slower). Please report it with the GPU and "
            "triton version.",
            kind,
            _failed[kind].splitlines()[0][:300],
        )


def total() -> int:
    """Calls answered by the chunked backend after a Triton failure, in this process."""
    return _calls


def reset() -> None:
    """Forget every failure and the count (tests)."""
    global _calls
    with _lock:
        _failed.clear()
        _calls = 0
