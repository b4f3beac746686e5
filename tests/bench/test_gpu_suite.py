"""bench/gpu_suite.sh stays runnable without a GPU to try it on: its steps name commands
and files that exist, and each part's time limits fit one device-tool call with room for
the machine's start and a rerun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def dry_run(*args: str) -> tuple[list[int], list[str]]:
    out = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_suite.sh"), "--dry-run", *args],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    lines = out.splitlines()
    limits = [int(line.split("s", 1)[0]) for line in lines[0::2]]
    return limits, [line.strip() for line in lines[1::2]]


def test_dry_run_lists_steps_that_exist_and_fit_one_call():
    limits, commands = dry_run()
    assert len(commands) >= 6 and sum(limits) <= 560
    for cmd in commands:
        words = cmd.split()
        if words[1].startswith("bench/"):
            assert (ROOT / words[1]).is_file(), cmd
        if words[1:3] == ["-m", "pytest"]:
            paths = [w for w in words if w.startswith("tests/")]
            assert paths and all((ROOT / w).exists() for w in paths), cmd
        if words[1] == "-m" and words[2].startswith("anchorcredit."):
            module = ROOT / "service" / Path(*words[2].split("."))
            assert module.with_suffix(".py").is_file(), cmd


def test_parts_split_the_steps_and_each_leaves_room_to_rerun():
    """15 device minutes hold a start (1-2 min), the kernel part, and either the service
    part or a rerun of the kernel part after a fix: the kernel part's steps take at most
    4.7 minutes (5 with the install), the service part's 5."""
    kernel_limits, kernel = dry_run("--part", "kernel")
    service_limits, service = dry_run("--part", "service")
    # A split, nothing lost or doubled (the verdict reads the report of its own run).
    split = [c.replace("gpu_suite_kernel.md", "gpu_suite.md") for c in kernel + service]
    assert sorted(split) == sorted(dry_run()[1])
    assert sum(kernel_limits) <= 280 and sum(service_limits) <= 300
    assert any("-m gpu tests/engine/span" in c for c in kernel)
    # The verdict reads the kernel part's own report, which holds the benchmark tables.
    assert kernel[-1].endswith("bench/gpu_targets.py bench/results/gpu_suite_kernel.md")
    assert not any("span_benchmark" in c for c in service)
    # the 32K rows first (a slow box loses the cheap sizes' repeats, never a size), with a
    # budget that leaves the step's limit room; the packed RL batch timed; three repeats
    single = next(c for c in kernel if "span_benchmark.py" in c and "--batch" not in c)
    packed = next(c for c in kernel if "span_benchmark.py" in c and "--batch 512" in c)
    assert "--n 32768 16384 8192 4096 1024" in single and "--h-hi 100 end" in single
    assert "--n 1024" in packed and "--h-hi 100 end" in packed
    for cmd, limit in zip(kernel, kernel_limits, strict=True):
        if "span_benchmark.py" in cmd:
            words = cmd.split()
            assert words[words.index("--repeats") + 1] == "3" and "--lse" in words
            assert float(words[words.index("--budget-s") + 1]) <= 0.75 * limit


@pytest.mark.parametrize("args", [("--part", "gpu"), ("--bogus",)])
def test_a_wrong_argument_is_refused_with_what_to_use(args):
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_suite.sh"), *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "kernel" in done.stderr and "service" in done.stderr


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
