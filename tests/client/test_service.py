"""CreditClient against the real server (tiny debug model) and small fake gRPC servers.

Real server: results equal the runner's, splitting to the server's limits, failover when one
of two targets is down, clear errors for bad input and stale versions. Fake servers (grpc
sync, in-process): RESOURCE_EXHAUSTED with a retry hint, round-robin, deadlines.
"""

from __future__ import annotations

import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
from fake_servicer import FakeServicer

from anchorcredit.client import (
    CreditClient,
    CreditServiceError,
    LRUBytesCache,
    StalePolicyVersionError,
)
from anchorcredit.contract import CreditParams

RNG = np.random.default_rng(1)
PROMPTS = [RNG.integers(0, 256, n).tolist() for n in (3, 9, 5, 6, 4)]
RESPONSES = [RNG.integers(0, 256, n).tolist() for n in (24, 40, 17, 31, 12)]


def test_client_import_is_torch_free():
    code = (
        "import sys, anchorcredit.client, anchorcredit.client.adapters;"
        "from anchorcredit.client import CreditClient, reweight;"
        "import numpy as np;"
        "reweight(np.ones((1, 2)), [np.ones(2)], np.ones((1, 2), bool));"
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture(scope="module")
def model_dir(llama_model):
    return llama_model


@pytest.fixture(scope="module")
def server(model_dir, start_server):
    # max_request_sequences=2 makes the client split the 5 sequences into 3 requests.
    s = start_server(model_dir, max_request_sequences=2)
    yield s
    s.stop()


@pytest.mark.parametrize(
    "strategy,params",
    [
        ("coupled_rhythm", {}),
        ("global_anchor", {"q": 0.3, "h_hi": "end"}),
        ("local_chunk", {"gamma_amp": 2.0, "window": 5}),
    ],
)
def test_results_equal_the_runner(server, model_dir, strategy, params):
    from anchorcredit.runner import Scorer

    scorer = Scorer.from_pretrained(model_dir)
    # The runner spells "FAI to the end of the response" h_hi=None.
    runner_params = {k: (None if v == "end" else v) for k, v in params.items()}
    ref = scorer.score(
        list(zip(PROMPTS, RESPONSES, strict=True)), strategy=strategy, **runner_params
    )
    with CreditClient([server.target], cache=False) as client:
        assert client.model_info().max_request_sequences == 2
        got = client.score(PROMPTS, RESPONSES, strategy=strategy, **params)
    assert len(got) == len(ref)
    for g, r, resp in zip(got, ref, RESPONSES, strict=True):
        assert g.gamma.dtype == np.float32 and len(g.gamma) == len(resp)
        np.testing.assert_allclose(g.waad, r.waad, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(g.fai, r.fai, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(g.gamma, r.gamma)
        assert g.policy_version == "0"


def test_failover_when_one_target_is_down(server, free_port):
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    with CreditClient([dead, server.target], cache=False, retries=3) as client:
        for _ in range(3):
            res = client.score(PROMPTS, RESPONSES)
            assert len(res) == 5
    with CreditClient([dead], cache=False, retries=1, backoff_base_s=0.01) as client:
        with pytest.raises(CreditServiceError) as e:
            client.score(PROMPTS, RESPONSES)
        assert e.value.code == grpc.StatusCode.UNAVAILABLE


def test_non_retryable_errors_are_clear(server):
    with CreditClient([server.target], cache=False, replica_wait_s=0) as client:
        with pytest.raises(CreditServiceError) as e:
            client.score([[1, 2]], [[3, 999]])  # id beyond the 256-token vocabulary
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(StalePolicyVersionError) as e:
            client.score(PROMPTS, RESPONSES, policy_version="no-such-version")
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(ValueError):
            client.score([[1]], [[]])  # empty response: refused before any RPC
        with pytest.raises(ValueError):
            client.score([[1]], [[2]], strategy="nope")


def test_bad_parameters_are_refused_before_any_rpc(free_port):
    # Nothing listens on the target: an RPC would raise CreditServiceError, not ValueError.
    with CreditClient([f"127.0.0.1:{free_port()}"], cache=False, retries=0) as client:
        for kw, field in [
            ({"q": 1.5}, "params.q"),
            ({"k": 0}, "params.k"),
            ({"seed": 2**64}, "params.seed"),
            ({"h_hi": "soon"}, "params.h_hi"),
            ({"h_lo": 50, "h_hi": 20}, "params.h_hi"),
            ({"qq": 1}, "unknown credit parameter"),
            ({"strategy": "nope"}, "strategy: unknown strategy"),
        ]:
            with pytest.raises(ValueError, match=field):
                client.score([[1]], [[2]], **kw)


# -- fake servers ----------------------------------------------------------------------------
@pytest.fixture
def fake_target(fake_server):
    """fake_target(servicer) -> "127.0.0.1:PORT" serving it."""
    return lambda servicer: f"127.0.0.1:{fake_server(servicer)}"


def test_retries_resource_exhausted_honouring_the_hint(fake_target):
    svc = FakeServicer(exhausted=2, hint_ms=150)
    target = fake_target(svc)
    with CreditClient([target], cache=False, retries=3) as client:
        res = client.score([[1, 2]], [[3, 4, 5]])
    np.testing.assert_allclose(res[0].gamma, [1.0, 1.01, 1.02], rtol=1e-6)
    assert len(svc.calls) == 3
    gaps = np.diff(svc.calls)
    assert (gaps >= 0.14).all()  # waited as told, not the 50 ms default backoff


def test_gives_up_when_the_retry_budget_is_spent(fake_target):
    svc = FakeServicer(exhausted=10_000)
    target = fake_target(svc)
    with CreditClient([target], cache=False, backoff_base_s=0.01, retry_budget_s=0.5) as c:
        t0 = time.monotonic()
        with pytest.raises(CreditServiceError) as e:
            c.score([[1]], [[2]])
        spent = time.monotonic() - t0
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "retry_budget_s=0.5" in str(e.value)
    assert len(svc.calls) > 3  # busy: bounded by time, not by the UNAVAILABLE count
    assert spent >= 0.5
    with CreditClient([target], cache=False, retries=0) as c:  # 0: no retries at all
        n = len(svc.calls)
        with pytest.raises(CreditServiceError):
            c.score([[1]], [[2]])
        assert len(svc.calls) == n + 1


def test_round_robin_split_and_order(fake_target):
    a, b = FakeServicer(), FakeServicer()
    targets = [fake_target(a), fake_target(b)]
    prompts = [[1, 2, 3]] * 20
    responses = [list(range(5 + i)) for i in range(20)]
    with CreditClient(targets, cache=None) as client:
        res = client.score(prompts, responses)
    for r, resp in zip(res, responses, strict=True):
        assert len(r.gamma) == len(resp)  # order preserved across chunks and targets
    assert a.calls and b.calls  # both targets got work
    # max_batch_tokens=64 / max_request_sequences=8 from GetModelInfo were respected
    assert max(a.sizes + b.sizes) <= 8
    assert sum(a.sizes + b.sizes) == 20


def test_a_call_past_its_deadline_ends_deadline_exceeded(fake_target):
    svc = FakeServicer(hold="Score")  # answers only after the test ends
    target = fake_target(svc)
    with CreditClient([target], cache=False, timeout_s=0.3) as client:
        with pytest.raises(CreditServiceError) as e:
            client.score([[1]], [[2]])
        assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert svc.entered.is_set()  # it reached the server and was not answered in time


def test_every_effective_parameter_is_sent_and_keyed_once(fake_target):
    svc = FakeServicer()
    target = fake_target(svc)
    p, r = [[1, 2]], [[3, 4, 5]]
    with CreditClient([target], cache=LRUBytesCache()) as client:
        client.score(p, r)
        # the defaults given explicitly are the same request: one key, a hit
        again = client.score(p, r, strategy="coupled_rhythm", q=0.4, h_hi=100, seed=None)
        assert again[0].cached and client.last_stats == {"hits": 1, "misses": 0}
        client.score(p, r, h_hi="end")
        assert client.last_stats == {"hits": 0, "misses": 1}
    assert len(svc.requests) == 2
    first, to_end = svc.requests
    assert first.strategy == "coupled_rhythm"
    assert CreditParams.from_proto(first.strategy, first.params) == CreditParams()
    for name in ("q", "gamma_amp", "alpha", "k", "seed", "window", "h_lo", "h_hi"):
        assert first.params.HasField(name), name
    assert first.params.HasField("head_quantile") and not first.params.h_hi_to_end
    assert not first.params.HasField("tau_waad")  # None: the median, the server's default
    assert to_end.params.h_hi_to_end and not to_end.params.HasField("h_hi")


# -- weight loads on several targets, and errors that name the caller's sequence -------------
def test_update_weights_calls_each_target_once_and_names_the_dead_one(
    server, llama_model, free_port
):
    dead = f"127.0.0.1:{free_port()}"
    reg = server.server.metrics.registry
    n0 = reg.get_sample_value("anchorcredit_weight_updates_total") or 0.0
    try:
        with CreditClient([dead, server.target], cache=False, timeout_s=5) as client:
            with pytest.raises(CreditServiceError) as e:
                client.update_weights(str(llama_model), "7")
            assert dead in str(e.value) and list(e.value.failed) == [dead]
            assert e.value.code == grpc.StatusCode.UNAVAILABLE
            # the live server loaded exactly once: no failover of the dead target's load to it
            assert (reg.get_sample_value("anchorcredit_weight_updates_total") or 0.0) == n0 + 1
            assert client.model_info().policy_version == "7"
    finally:
        with CreditClient([server.target], cache=False) as client:
            client.update_weights(str(llama_model), "0")


def test_bad_input_error_names_the_callers_index(llama_model, start_server):
    s = start_server(str(llama_model), max_request_sequences=2)  # split the misses into chunks
    try:
        with CreditClient([s.target]) as client:
            good_p, good_r = [[1, 2]] * 4, [[3, 4], [3, 5], [3, 6], [3, 7]]
            client.score(good_p, good_r)  # cached: removed from what is sent next
            prompts = [*good_p, [1, 2], [1, 2], [1, 2]]
            responses = [*good_r, [4, 4], [4, 5], [4, 999]]  # caller 6 = chunk 1, index 0
            with pytest.raises(CreditServiceError) as e:
                client.score(prompts, responses)
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert e.value.index == 6
            assert str(e.value).count("sequence 6 (sent as 0): ") == 1
            with pytest.raises(CreditServiceError) as e:
                client.score([[1, 2]] * 3, [[3, 4], [9, 999], [3, 5]])  # 0 and 2 are hits
            assert e.value.index == 1 and "sequence 1 (sent as 0)" in str(e.value)
    finally:
        s.stop()
