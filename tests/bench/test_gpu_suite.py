"""bench/gpu_suite.sh stays runnable without a GPU to try it on: its steps name commands
and files that exist, and its time limits fit one device-tool call (600 s)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def preflight(tmp_path: Path, env_extra: dict[str, str]) -> tuple[int, str]:
    env = {**os.environ, "OUT": str(tmp_path), "SUITE_SITE": str(tmp_path / "site"),
           "SUITE_WHEELS": str(tmp_path / "no-wheels"), "PYTHON": sys.executable,
           **env_extra}  # fmt: skip
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_suite.sh"), "--preflight"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    return done.returncode, (tmp_path / "gpu_suite.md").read_text()


@pytest.mark.slow
def test_preflight_installs_this_checkout_and_finds_every_import(tmp_path):
    """The GPU box has nothing of ours installed: the suite installs this checkout into a
    private site folder and imports what every step needs from there."""
    rc, report = preflight(tmp_path, {})
    assert rc == 0, report
    assert "- install: this checkout and 0 carried wheel(s)" in report
    assert f"- anchorcredit from: {tmp_path / 'site'}" in report
    assert "- preflight: ok" in report


@pytest.mark.slow
def test_preflight_names_a_missing_module(tmp_path):
    # The image's python without grpcio-health-checking (not among its packages).
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] == 'grpc_health':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
    )
    rc, report = preflight(tmp_path, {"PYTHONPATH": str(blocker)})
    assert rc == 1, report
    assert "- MISSING anchorcredit.server.app" in report and "grpc_health" in report
    assert "bash bench/gpu_wheels.sh" in report
