"""Blocking calls that may never return, run so that they cannot hang the server.

A collective's rendezvous or broadcast against a peer that accepts a connection and never
answers blocks inside torch's C++ code, deaf to its own timeout. `run_bounded(fn, ...)`
runs fn() in a thread of its own and waits for it at most `timeout_s` on the event loop.
A thread cannot be interrupted: past the timeout (or when the RPC is cancelled) it is
abandoned. An abandoned thread is a daemon (it never holds up process exit), owns no pool
worker (it never starves another call), is counted while it lives (`abandoned_threads()`,
the anchorcredit_abandoned_threads gauge), and whatever it returns if it ever finishes goes
to `on_late` (closing a group nobody waits for any more).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

from anchorcredit.errors import WeightGroupTimeout

log = logging.getLogger(__name__)

_lock = threading.Lock()
_abandoned = 0
# Called with the number of abandoned threads alive after each change (the metrics).
_observers: list[Callable[[int], None]] = []


def abandoned_threads() -> int:
    """Threads given up on that are still running (this process)."""
    with _lock:
        return _abandoned


def observe_abandoned(fn: Callable[[int], None]) -> Callable[[], None]:
    """Call fn(count) now and whenever the number of abandoned threads changes; returns the
    function that stops it."""
    with _lock:
        _observers.append(fn)
        count = _abandoned
    fn(count)

    def stop() -> None:
        with _lock:
            if fn in _observers:
                _observers.remove(fn)

    return stop


def _change(delta: int) -> None:
    global _abandoned
    with _lock:
        _abandoned += delta
        count, observers = _abandoned, list(_observers)
    for fn in observers:
        try:
            fn(count)
        except Exception as exc:  # a metric must never break the caller
            log.debug("abandoned-thread observer failed: %s", exc)


def _late(on_late: Callable[[Any], None] | None, result: Any, what: str) -> None:
    if on_late is None:
        return
    try:
        on_late(result)
    except Exception as exc:
        log.warning("cleaning up after %s: %s", what, exc)


async def run_bounded(
    fn: Callable[[], Any],
    timeout_s: float | None,
    what: str,
    on_late: Callable[[Any], None] | None = None,
) -> Any:
    """fn() in its own daemon thread; its result, or its exception, within `timeout_s`
    (None: no bound but cancellation). Past it: WeightGroupTimeout naming `what`, and the
    thread is abandoned (see the module doc). Cancelling the caller abandons it too."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future = loop.create_future()
    state = {"done": False, "abandoned": False}
    guard = threading.Lock()

    def settle(result: Any, exc: BaseException | None) -> None:
        if fut.done():
            return
        if exc is None:
            fut.set_result(result)
        else:
            fut.set_exception(exc)

    def body() -> None:
        result, error = None, None
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiter or logged
            error = exc
        with guard:
            state["done"] = True
            abandoned = state["abandoned"]
        if abandoned:
            _change(-1)
            if error is None:
                _late(on_late, result, what)
            else:
                log.info("abandoned %s ended: %s", what, " ".join(str(error).split())[:200])
            return
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop is closed: nobody waits; clean up here
            if error is None:
                _late(on_late, result, what)

    threading.Thread(target=body, name=f"bounded {what}"[:60], daemon=True).start()
    try:
        return await asyncio.wait_for(asyncio.shield(fut), timeout_s)
    except (TimeoutError, asyncio.CancelledError) as exc:
        with guard:
            give_up = not state["done"]
            state["abandoned"] = give_up
        if give_up:
            _change(+1)
            log.warning("gave up waiting for %s; its thread is abandoned", what)
        else:  # it finished just now: its result is on its way to `fut`
            fut.add_done_callback(
                lambda f: not f.cancelled() and f.exception() is None
                and _late(on_late, f.result(), what)
            )  # fmt: skip
        if isinstance(exc, asyncio.CancelledError):
            raise
        raise WeightGroupTimeout(f"{what} did not finish within {timeout_s:g} s") from None
