"""Fixtures shared by the span kernel's tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the Triton kernel under TRITON_INTERPRET=1 (read when a kernel is jitted, which
    the launcher does lazily per interpreter mode, so a test may switch it on at any time)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
