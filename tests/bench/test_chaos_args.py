"""bench/chaos.py is a benchmark, not a test: only its argument parsing is checked here."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

CHAOS = Path(__file__).resolve().parents[2] / "bench" / "chaos.py"


def _chaos():
    spec = importlib.util.spec_from_file_location("chaos_bench", CHAOS)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_defaults_are_at_least_10k_requests_32_callers_and_a_50x_burst():
    args = _chaos().parse_args([])
    assert args.requests >= 10_000 and args.callers >= 32 and args.burst_x >= 50


def test_bad_arguments_are_refused(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit):
        _chaos().parse_args(["--callers", "0"])
    assert "--callers" in capsys.readouterr().err


def test_the_tally_hands_out_exactly_the_requests_asked_for():
    """--requests 4000 ran 10,847 calls: now callers, the burst and the 8K calls together
    take exactly --requests, and none past the gate of the next event."""
    import threading

    chaos = _chaos()
    tally = chaos.Tally(limit=100, gate=10)
    stop = threading.Event()
    got = [tally.take(stop) for _ in range(10)]
    assert got == [1] * 10 and tally.started == 10
    waiter = threading.Thread(target=lambda: got.append(tally.take(stop)))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive()  # held at the gate until the event opens the next fraction
    tally.open_to(0.5)
    waiter.join(10)
    assert got[-1] == 1 and tally.reserve(1000) == 89  # the burst: past the gate, in the limit
    assert tally.take(stop) == 0 and tally.reserve(5) == 0 and tally.started == 100
