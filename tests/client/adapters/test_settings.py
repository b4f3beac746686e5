"""What the adapters read from the environment (adapters/settings.py), and the rule that no
adapter module imports another adapter module's private name."""

from __future__ import annotations

import ast
import logging
import warnings
from pathlib import Path

import pytest

from anchorcredit.client.adapters import settings
from anchorcredit.client.adapters import skyrl as ac_skyrl
from anchorcredit.client.adapters import verl as ac_verl

ADAPTERS = Path(settings.__file__).parent


def test_the_pinned_version_has_its_own_name():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new name warns about nothing
        env = {"ANCHORCREDIT_PINNED_VERSION": "step-3-r", "ANCHORCREDIT_POLICY_VERSION": "0"}
        assert settings.pinned_version_from_env(env) == "step-3-r"
        assert settings.pinned_version_from_env({}) is None


def test_the_servers_policy_version_still_pins_an_adapter_with_a_deprecation(caplog):
    caplog.set_level(logging.WARNING, logger="anchorcredit.adapters")
    with pytest.warns(DeprecationWarning, match="ANCHORCREDIT_PINNED_VERSION"):
        got = settings.pinned_version_from_env({"ANCHORCREDIT_POLICY_VERSION": "fixed"})
    assert got == "fixed"
    assert any("ANCHORCREDIT_PINNED_VERSION" in r.getMessage() for r in caplog.records)


def test_credit_settings_come_from_the_environment_and_refuse_misplaced_ones():
    env = {"ANCHORCREDIT_PARAMS": '{"q": 0.3}', "ANCHORCREDIT_SIGN": "positive_only"}
    assert settings.credit_settings_from_env(env) == {
        "q": 0.3,
        "strategy": "coupled_rhythm",
        "sign": "positive_only",
    }
    with pytest.raises(ValueError, match="'policy_version' with ANCHORCREDIT_PINNED_VERSION"):
        settings.credit_settings_from_env({"ANCHORCREDIT_PARAMS": '{"policy_version": "x"}'})
    with pytest.raises(ValueError, match="JSON object"):
        settings.credit_settings_from_env({"ANCHORCREDIT_PARAMS": "[1]"})


@pytest.mark.parametrize("adapter", [ac_verl, ac_skyrl])
def test_setup_hooks_pass_the_pinned_version_on(adapter, monkeypatch):
    seen = {}
    monkeypatch.setattr(adapter, "install", lambda client, **kw: seen.update(kw))
    monkeypatch.setenv("ANCHORCREDIT_PINNED_VERSION", "base")
    monkeypatch.delenv("ANCHORCREDIT_POLICY_VERSION", raising=False)
    monkeypatch.setenv("ANCHORCREDIT_PARAMS", '{"q": 0.5}')
    adapter.install_from_env()
    assert seen["policy_version"] == "base" and seen["q"] == 0.5
    assert seen["strategy"] == "coupled_rhythm" and seen["sign"] == "both"


def test_the_adapters_client_comes_from_the_one_config(monkeypatch):
    monkeypatch.setenv("ANCHORCREDIT_TARGETS", "127.0.0.1:1")
    monkeypatch.setenv("ANCHORCREDIT_TIMEOUT_S", "7")
    monkeypatch.setenv("ANCHORCREDIT_REPLICA_WAIT_S", "2")
    for client in (ac_verl.client_from_env(), ac_skyrl.client_from_env()):
        try:
            assert client.timeout_s == 7.0 and client.config.replica_wait_s == 2.0
        finally:
            client.close()


def test_no_adapter_imports_another_adapters_private_name():
    offenders = []
    for path in sorted(ADAPTERS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "anchorcredit.client.adapters."
            ):
                private = [a.name for a in node.names if a.name.startswith("_")]
                if private and node.module != f"anchorcredit.client.adapters.{path.stem}":
                    offenders.append(f"{path.name}: {node.module} {private}")
    assert not offenders, offenders
