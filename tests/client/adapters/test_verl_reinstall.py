"""verl `install()` again (or its undo) closes the client the previous install built from
the environment (its channels, pool and cache connection), never one the user passed."""

from __future__ import annotations

from typing import Any

import pytest

from anchorcredit.client import CreditClient
from anchorcredit.client.adapters import verl as ac_verl


@pytest.fixture
def closed(monkeypatch: pytest.MonkeyPatch) -> list[CreditClient]:
    """Every CreditClient closed during the test."""
    out: list[CreditClient] = []
    close = CreditClient.close

    def record(self: CreditClient) -> None:
        out.append(self)
        close(self)

    monkeypatch.setenv("ANCHORCREDIT_TARGETS", "127.0.0.1:1")
    monkeypatch.setattr(CreditClient, "close", record)
    return out


def test_reinstall_closes_the_client_built_from_the_environment(closed: Any):
    undo = ac_verl.install(sync=False)
    try:
        built = ac_verl._CONFIG.get_client()
        undo = ac_verl.install(sync=False)
        assert closed == [built]
        assert ac_verl._CONFIG.client is None  # the new install builds its own
        again = ac_verl._CONFIG.get_client()
        assert again is not built
    finally:
        undo()
    assert closed == [built, again]  # undo closes it too
    assert ac_verl._CONFIG.client is None


def test_a_client_the_user_passed_is_never_closed(closed: Any):
    mine = CreditClient("127.0.0.1:1", cache=False)
    try:
        ac_verl.install(mine, sync=False)
        ac_verl.install(mine, sync=False)
        ac_verl.install(sync=False)()
        ac_verl.install(mine, sync=False)()
        assert closed == []
        assert ac_verl._CONFIG.client is mine
    finally:
        mine.close()


def test_undo_without_a_built_client_closes_nothing(closed: Any):
    ac_verl.install(sync=False)
    ac_verl.install(sync=False)()
    assert closed == []
