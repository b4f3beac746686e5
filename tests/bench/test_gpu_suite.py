"""bench/gpu_suite.sh stays runnable without a GPU to try it on: its steps name commands
and files that exist, and its time limits fit one device-tool call (600 s)."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_lists_steps_that_exist_and_fit_one_call():
    out = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_suite.sh"), "--dry-run"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    lines = out.splitlines()
    limits = [int(line.split("s", 1)[0]) for line in lines[0::2]]
    commands = [line.strip() for line in lines[1::2]]
    assert len(commands) >= 6 and sum(limits) <= 560
    for cmd in commands:
        words = cmd.split()
        if words[1].startswith("bench/") and words[1] != "bench/weights.py":
            assert (ROOT / words[1]).is_file(), cmd
        if words[1:3] == ["-m", "pytest"]:
            assert (ROOT / words[-1]).is_dir(), cmd
        if words[1] == "-m" and words[2].startswith("anchorcredit."):
            module = ROOT / "service" / Path(*words[2].split("."))
            assert module.with_suffix(".py").is_file(), cmd
