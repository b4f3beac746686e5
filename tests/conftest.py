"""Shared fixtures. GPU-marked tests skip on machines without CUDA (CI has none)."""

from __future__ import annotations

import os

import pytest

# No network in tests: libraries that would reach a hub or send telemetry stay offline.
OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
for _var in (*OFFLINE_VARS, "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_var, "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # the light client's tests run without torch
        has_cuda = False
    if has_cuda:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run on the GPU box)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# In CI nothing may skip silently: a skip is allowed only for GPU-marked tests (CI has no GPU).
# Locally a missing optional tool may skip; CI installs every tool, so a skip there is a bug.
_unexpected_skips: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and "gpu" not in report.keywords:
        _unexpected_skips.append(f"{report.nodeid}: {report.longrepr}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _unexpected_skips and os.environ.get("CI"):
        lines = "\n  ".join(_unexpected_skips)
        print(f"\nCI forbids skipped tests that are not GPU-only:\n  {lines}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
