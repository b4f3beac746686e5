"""The client's own counters: real calls against a real server (and a real redis-server)
counted in `client.counters()` and in `anchorcredit_client_*` Prometheus metrics; without
prometheus_client the dict alone, and the client still imports."""

from __future__ import annotations

import subprocess
import sys

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from anchorcredit.client import CreditClient, StalePolicyVersionError
from anchorcredit.client.counters import FIELDS
from anchorcredit.v1 import credit_pb2 as pb
from anchorcredit.v1 import credit_pb2_grpc as pb_grpc

RNG = np.random.default_rng(26)
PROMPTS = [RNG.integers(0, 256, n).tolist() for n in (4, 7, 5)]
RESPONSES = [RNG.integers(0, 256, n).tolist() for n in (20, 33, 26)]


@pytest.fixture(scope="module")
def model_dir(llama_model):
    return llama_model


@pytest.fixture(scope="module")
def server(model_dir, start_server):
    s = start_server(model_dir)
    yield s
    s.stop()


def _prom(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def _load(server, path, version: str) -> None:
    """UpdateWeights on the server directly (not through the client under test)."""
    pb_grpc.CreditServiceStub(server.channel).UpdateWeights(
        pb.UpdateWeightsRequest(path=str(path), version=version), timeout=60
    )


def test_cache_hits_and_misses_are_counted_by_layer(server, redis_process):
    redis = redis_process()
    registry = CollectorRegistry()
    try:
        with (
            CreditClient(server.target, metrics_registry=registry) as memory,
            CreditClient(server.target, cache=redis.url, metrics_registry=registry) as shared,
        ):
            memory.score(PROMPTS, RESPONSES)  # 3 misses
            memory.score(PROMPTS, RESPONSES)  # 3 hits
            memory.score(PROMPTS[:1], RESPONSES[:1], q=0.3)  # 1 miss: other parameters
            shared.score(PROMPTS[:2], RESPONSES[:2])  # 2 misses
            shared.score(PROMPTS, RESPONSES)  # 2 hits, 1 miss
            m, s = memory.counters(), shared.counters()
    finally:
        redis.kill()
    assert (m["cache_hits_memory"], m["cache_misses_memory"]) == (3, 4)
    assert (s["cache_hits_redis"], s["cache_misses_redis"]) == (2, 3)
    assert m["cache_hits_redis"] == s["cache_hits_memory"] == 0
    assert (m["score_calls"], s["score_calls"]) == (3, 2)
    assert m["score_seconds"] > 0 and s["score_seconds"] > 0
    assert list(m) == list(FIELDS)
    # one registry, two clients: the metrics add both up, by layer
    hits = "anchorcredit_client_cache_hits_total"
    misses = "anchorcredit_client_cache_misses_total"
    assert _prom(registry, hits, layer="memory") == 3
    assert _prom(registry, misses, layer="memory") == 4
    assert _prom(registry, hits, layer="redis") == 2
    assert _prom(registry, misses, layer="redis") == 3
    assert _prom(registry, "anchorcredit_client_score_seconds_count") == 5
    assert _prom(registry, "anchorcredit_client_score_seconds_sum") == pytest.approx(
        m["score_seconds"] + s["score_seconds"]
    )


def test_a_retry_is_counted_with_its_code(server, free_port):
    """The first call goes to a target nothing listens on (UNAVAILABLE), then fails over
    to the live one: one retry."""
    registry = CollectorRegistry()
    dead = f"127.0.0.1:{free_port()}"
    with CreditClient([dead, server.target], cache=False, metrics_registry=registry) as client:
        assert client.model_info().model_id
        counts = client.counters()
    assert counts["retries"] == 1
    assert _prom(registry, "anchorcredit_client_retries_total", code="UNAVAILABLE") == 1
    assert _prom(registry, "anchorcredit_client_retries_total", code="RESOURCE_EXHAUSTED") == 0


def test_stale_refusals_and_replica_waits_are_counted(server, model_dir):
    """A call pinned to a version the server does not serve yet: the server refuses the
    piece (a stale-version refusal), the client's survey finds no replica serving it and
    waits once; the server loads that version right after that first survey (ordered by
    the survey itself, not by a timer), so the second survey finds it."""
    registry = CollectorRegistry()
    _load(server, model_dir, "c1")
    try:
        with CreditClient(
            server.target, cache=False, replica_wait_s=60, metrics_registry=registry
        ) as client:
            surveys = []
            survey = client.replica_set.survey

            def survey_then_update():
                found = survey()
                surveys.append([r.policy_version for r in found])
                if len(surveys) == 1:
                    _load(server, model_dir, "c2")
                return found

            client.replica_set.survey = survey_then_update
            got = client.score(PROMPTS, RESPONSES, policy_version="c2")
            counts = client.counters()
    finally:
        _load(server, model_dir, "0")
    assert surveys == [["c1"], ["c2"]]
    assert {r.policy_version for r in got} == {"c2"}
    assert counts["stale_version_refusals"] == 1
    assert counts["replica_waits"] == 1 and counts["replica_wait_seconds"] >= 0
    assert _prom(registry, "anchorcredit_client_stale_version_refusals_total") == 1
    assert _prom(registry, "anchorcredit_client_replica_waits_total") == counts["replica_waits"]
    assert _prom(registry, "anchorcredit_client_replica_wait_seconds_total") == pytest.approx(
        counts["replica_wait_seconds"]
    )


def test_a_pin_nobody_serves_counts_its_refusal_and_waits(server):
    registry = CollectorRegistry()
    with CreditClient(
        server.target, cache=False, replica_wait_s=2, metrics_registry=registry
    ) as client:
        with pytest.raises(StalePolicyVersionError) as e:
            client.score(PROMPTS, RESPONSES, policy_version="nobody")
        counts = client.counters()
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert counts["stale_version_refusals"] == 1
    assert counts["replica_waits"] >= 1
    assert counts["score_calls"] == 1  # a failed call is timed too


def test_weight_pushes_are_timed(server, model_dir):
    registry = CollectorRegistry()
    with CreditClient(server.target, cache=False, metrics_registry=registry) as client:
        try:
            client.update_weights(str(model_dir), "p1")
            client.update_weights(str(model_dir), "p2", replaces="p1")
        finally:
            client.update_weights(str(model_dir), "0")
        counts = client.counters()
    assert counts["push_calls"] == 3 and counts["push_seconds"] > 0
    assert _prom(registry, "anchorcredit_client_push_seconds_count") == 3
    assert counts["score_calls"] == 0 and counts["retries"] == 0


def test_without_prometheus_client_the_counters_are_a_plain_dict(server):
    """prometheus_client and torch blocked: the client imports, scores against the real
    server, and counts in its dict."""
    code = (
        "import sys\n"
        "sys.modules['prometheus_client'] = None\n"
        "sys.modules['torch'] = None\n"
        "from anchorcredit.client import CreditClient\n"
        "with CreditClient(sys.argv[1]) as c:\n"
        "    c.score([[1, 2, 3]], [[4, 5, 6, 7]])\n"
        "    c.score([[1, 2, 3]], [[4, 5, 6, 7]])\n"
        "    counts = c.counters()\n"
        "    assert not c.stats.exported\n"
        "assert counts['cache_hits_memory'] == 1 and counts['cache_misses_memory'] == 1, counts\n"
        "assert counts['score_calls'] == 2, counts\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, server.target], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_the_global_registry_is_the_default():
    from prometheus_client import REGISTRY

    with CreditClient("127.0.0.1:1", cache=False) as a, CreditClient("127.0.0.1:1") as b:
        assert a.stats.exported and b.stats.exported  # two clients, one set of metrics
        a.stats.retry("UNAVAILABLE")
        a.stats.retry("INTERNAL")  # not a retried code: counted as "other", bounded labels
    name = "anchorcredit_client_retries_total"
    assert REGISTRY.get_sample_value(name, {"code": "other"}) >= 1
