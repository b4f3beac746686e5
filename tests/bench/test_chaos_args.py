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


def test_defaults_meet_the_issue():
    args = _chaos().parse_args([])
    assert args.requests >= 10_000 and args.callers >= 32 and args.burst_x >= 50


def test_bad_arguments_are_refused(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit):
        _chaos().parse_args(["--callers", "0"])
    assert "--callers" in capsys.readouterr().err
