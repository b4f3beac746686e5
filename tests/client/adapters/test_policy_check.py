"""The stale-policy check every adapter runs before an unpinned score (policy_check.py),
against a real service: which served versions count as this run's, warn once per client,
refuse on request, and say nothing when the policy is declared frozen."""

from __future__ import annotations

import warnings

import pytest

from anchorcredit.client import CreditClient
from anchorcredit.client.adapters import common, versions
from anchorcredit.client.adapters.policy_check import (
    StalePolicyError,
    StalePolicyWarning,
    check_served_policy,
)

pytest.importorskip("torch")


@pytest.fixture
def served(target, monkeypatch):
    """A client of the module's service, with the stale-policy settings cleared."""
    monkeypatch.delenv("ANCHORCREDIT_STALE_POLICY", raising=False)
    monkeypatch.delenv("ANCHORCREDIT_RUN_ID", raising=False)
    monkeypatch.setattr(versions, "_RUNS", set())  # this test's run ids only
    with CreditClient([target], cache=False) as client:
        yield client


def _serve(client, model_dir, version):
    from safetensors.torch import load_file

    client.push_weights(load_file(model_dir / "model.safetensors"), version)


def test_another_runs_version_warns_once_per_client(served, model_dir):
    _serve(served, model_dir, "step-4-other")
    with pytest.warns(StalePolicyWarning, match="'step-4-other' .pushed by run 'other'"):
        assert check_served_policy(served) == "step-4-other"
    with warnings.catch_warnings():
        warnings.simplefilter("error", StalePolicyWarning)
        assert check_served_policy(served) is None  # once per client
        # the common path asks only when nothing pins the version
        common.gammas_for_rows(
            served,
            [[3, 4]],
            [[5, 6, 7]],
            strategy="coupled_rhythm",
            policy_version="step-4-other",
            credit_params={},
            stale_policy="error",
        )


def test_error_refuses_every_unpinned_call(served, model_dir):
    _serve(served, model_dir, "base-checkpoint")
    for _ in range(2):
        with pytest.raises(StalePolicyError, match="'base-checkpoint' .not pushed by any"):
            common.gammas_for_rows(
                served,
                [[3, 4]],
                [[5, 6, 7]],
                strategy="coupled_rhythm",
                policy_version=None,
                credit_params={},
                stale_policy="error",
            )


def test_this_runs_version_is_accepted(served, model_dir, monkeypatch):
    _serve(served, model_dir, "step-2-mine")
    versions.note_run("mine")  # what a weight sync of this process does
    with warnings.catch_warnings():
        warnings.simplefilter("error", StalePolicyWarning)
        assert check_served_policy(served, "error") == "step-2-mine"
    _serve(served, model_dir, "step-2-fromenv")
    monkeypatch.setenv("ANCHORCREDIT_RUN_ID", "fromenv")
    assert check_served_policy(served, "error") == "step-2-fromenv"


def test_frozen_asks_nothing_and_bad_settings_are_named(served, monkeypatch):
    class NoCalls:
        def served_version(self):
            raise AssertionError("frozen must not ask the service")

    assert check_served_policy(NoCalls(), "frozen") is None
    monkeypatch.setenv("ANCHORCREDIT_STALE_POLICY", "FROZEN")
    assert check_served_policy(NoCalls()) is None
    monkeypatch.setenv("ANCHORCREDIT_STALE_POLICY", "maybe")
    with pytest.raises(ValueError, match="ANCHORCREDIT_STALE_POLICY must be one of"):
        check_served_policy(served)
    with pytest.raises(ValueError, match="stale_policy must be one of"):
        check_served_policy(served, "often")
