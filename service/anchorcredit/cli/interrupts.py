"""Ctrl-C and SIGTERM for long CLI work: stop at once, but never in the middle of a write.

    with Interrupts() as stop:
        ...                      # SIGINT / SIGTERM raise Interrupted here, right away
        with stop.deferred():    # ... but not here: a signal waits until the block is done
            write_and_flush()

`Interrupted` is a BaseException (like KeyboardInterrupt), so `except Exception` in the
work does not swallow it; the command catches it once, says what was kept and exits 130.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_CODE = 130  # what shells report for a command stopped by Ctrl-C


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; `signum` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Interrupts:
    """Installs the handlers on entry (main thread only; elsewhere it does nothing) and puts
    the previous ones back on exit."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._deferring = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        if not self._deferring:
            raise Interrupted(signum)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A block no signal cuts short; one that arrived meanwhile is raised right after."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        if self.signum is not None:
            raise Interrupted(self.signum)
