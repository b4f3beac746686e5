"""Fixtures shared by the trainer adapter tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Llama the adapter tests' servers (and trainer-side copies) load."""
    from anchorcredit.offline.debug_model import save_debug_model

    return save_debug_model(tmp_path_factory.mktemp("m") / "llama")


@pytest.fixture(scope="module")
def target(model_dir: Path, start_server) -> Iterator[str]:
    """A real CreditServer on that model, one per test module."""
    s = start_server(model_dir)
    yield s.target
    s.stop()


@pytest.fixture(autouse=True)
def frozen_scoring_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests score a fixed debug model on purpose: declare it (policy_check.py), so an
    unpinned score does not warn. The stale-policy tests delete or set it themselves."""
    monkeypatch.setenv("ANCHORCREDIT_STALE_POLICY", "frozen")
