"""Per-stage wall time of one score() call (the server exports it as a Prometheus histogram).

On CUDA the stages are timed with events, read once at the end: timing never adds a device
synchronisation. A stage marked host=True (the credit stage, which ends waiting for its one
device-to-host copy) is timed on the host; once it is over, every event recorded before it
has completed, so reading them waits for nothing. On the CPU, perf_counter around each stage.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator

import torch


class StageTimer:
    """Adds up the seconds spent in named stages; a stage may be entered many times."""

    def __init__(self, device: torch.device):
        self._cuda = device.type == "cuda"
        self._host: dict[str, float] = defaultdict(float)
        self._events: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = defaultdict(list)

    @contextlib.contextmanager
    def stage(self, name: str, host: bool = False) -> Iterator[None]:
        if self._cuda and not host:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._events[name].append((start, end))
        else:
            t = time.perf_counter()
            try:
                yield
            finally:
                self._host[name] += time.perf_counter() - t

    def seconds(self) -> dict[str, float]:
        """{stage: seconds} over every entry so far. On CUDA each stage's end event is waited
        for on its own (already done after a device-to-host copy): no device-wide sync."""
        out = dict(self._host)
        for name, pairs in self._events.items():
            for _, end in pairs:
                end.synchronize()
            out[name] = out.get(name, 0.0) + sum(s.elapsed_time(e) for s, e in pairs) / 1e3
        return out
