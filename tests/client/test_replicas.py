"""Replicas in step: several real servers behind one logical target.

Three CreditServers listen on the same port at 127.0.0.1, 127.0.0.2 and 127.0.0.3 (Linux
routes all of 127.0.0.0/8 to loopback). They are reached as one target in gRPC's
multi-address form `ipv4:127.0.0.1:P,127.0.0.2:P,127.0.0.3:P` and as a dns name
`dns://127.0.0.1:D/replicas.anchorcredit.test:P` that a small DNS server (conftest's
`stub_dns`) resolves to the three addresses (gRPC's c-ares resolver and the client's own
resolver both ask it), so the round-robin channel really spreads over them. One replica is
made to lag by loading other weights under another version on it alone (a direct
UpdateWeights); then pinned calls must never use it, unpinned calls must never mix
versions, and a pin no replica serves is refused naming every address.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from fake_servicer import FakeServicer

from anchorcredit.client import CreditClient, CreditServiceError, StalePolicyVersionError
from anchorcredit.client.resolve import expand_target
from anchorcredit.v1 import credit_pb2 as pb
from anchorcredit.v1 import credit_pb2_grpc as pb_grpc

HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
DEAD = "127.0.0.4"  # in the dns answer of NAME_WITH_DEAD, nothing listens there
NAME = "replicas.anchorcredit.test"
NAME_WITH_DEAD = "four.anchorcredit.test"
RNG = np.random.default_rng(14)
PROMPTS = [RNG.integers(0, 256, n).tolist() for n in (3, 9, 5, 6, 4, 7)]
RESPONSES = [RNG.integers(0, 256, n).tolist() for n in (24, 40, 17, 31, 12, 20)]


@pytest.fixture(scope="module")
def models(
    other_llama_model: Path, llama_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, str]:
    a = llama_model
    b = other_llama_model
    return str(a), str(b)


@pytest.fixture(scope="module")
def refs(models: tuple[str, str]) -> dict[str, list[Any]]:
    """The runner's results of PROMPTS/RESPONSES under each model's weights."""
    from anchorcredit.runner import Scorer

    pairs = list(zip(PROMPTS, RESPONSES, strict=True))
    out = {m: Scorer.from_pretrained(m).score(pairs) for m in models}
    a, b = out.values()
    assert not np.allclose(a[0].gamma, b[0].gamma) or not np.allclose(a[0].waad, b[0].waad)
    return out


@pytest.fixture(scope="module")
def replicas(models: tuple[str, str], start_server: Any, stub_dns: Any) -> Any:
    """Three servers on one port at 127.0.0.1-3; max_request_sequences=2 splits a score
    call of six sequences into three requests, which round-robin spreads over them."""
    for _ in range(20):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            servers = [
                start_server(models[0], host=h, port=port, max_request_sequences=2) for h in HOSTS
            ]
            break
        except Exception:  # the port was taken on another loopback address: try another
            continue
    else:
        pytest.fail("no port free on 127.0.0.1-3")
    dns = stub_dns({NAME: list(HOSTS), NAME_WITH_DEAD: [*HOSTS, DEAD]})
    yield servers, port, dns
    for s in servers:
        s.stop()


def _multi(port: int) -> str:
    return "ipv4:" + ",".join(f"{h}:{port}" for h in HOSTS)


def _dns(dns: Any, port: int, name: str = NAME) -> str:
    return f"dns://127.0.0.1:{dns.port}/{name}:{port}"


def _load(server: Any, path: str, version: str) -> None:
    """UpdateWeights on this one replica only (its own channel: `server.stub` dials
    127.0.0.1 whatever the host it listens on)."""
    with grpc.insecure_channel(f"{server.server.config.host}:{server.server.port}") as ch:
        pb_grpc.CreditServiceStub(ch).UpdateWeights(
            pb.UpdateWeightsRequest(path=path, version=version), timeout=60
        )


def _set(replicas: Any, *plan: tuple[str, str]) -> None:
    """(path, version) per replica, in HOSTS order."""
    servers, _, _ = replicas
    for s, (path, version) in zip(servers, plan, strict=True):
        _load(s, path, version)


def _same(got: list[Any], ref: list[Any]) -> None:
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_allclose(g.waad, r.waad, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(g.gamma, r.gamma, rtol=1e-4, atol=1e-5)


def test_dns_authority_resolves_like_grpc(replicas: Any):
    _, port, dns = replicas
    assert expand_target(_dns(dns, port)) == [f"{h}:{port}" for h in HOSTS]
    with pytest.raises(OSError, match="NXDOMAIN"):
        expand_target(f"dns://127.0.0.1:{dns.port}/nope.anchorcredit.test:1")


@pytest.mark.parametrize("form", ["multi", "dns"])
def test_replicas_reports_every_address_and_its_version(replicas: Any, models: Any, form: str):
    servers, port, dns = replicas
    a, b = models
    r0, r1 = f"r0-{form}", f"r1-{form}"
    _set(replicas, (a, r1), (a, r1), (b, r0))
    target = _multi(port) if form == "multi" else _dns(dns, port)
    with CreditClient(target, cache=False) as client:
        got = client.replicas()
        assert [(r.address, r.target, r.policy_version) for r in got] == [
            (f"{HOSTS[0]}:{port}", target, r1),
            (f"{HOSTS[1]}:{port}", target, r1),
            (f"{HOSTS[2]}:{port}", target, r0),
        ]
        with pytest.raises(StalePolicyVersionError) as e:
            client.served_version()  # disagreeing replicas: never one pod's word
        assert f"{HOSTS[2]}:{port} serves '{r0}'" in str(e.value)
        assert e.value.versions[f"{HOSTS[0]}:{port}"] == r1
        _load(servers[2], a, r1)
        assert client.served_version() == r1


@pytest.mark.parametrize("form", ["multi", "dns"])
def test_pinned_calls_never_use_a_lagging_replica(
    replicas: Any, models: Any, refs: Any, form: str, caplog: Any
):
    servers, port, dns = replicas
    a, b = models
    # the third replica lags: other weights under the old version
    p0, p1 = f"p0-{form}", f"p1-{form}"
    _set(replicas, (a, p1), (a, p1), (b, p0))
    target = _multi(port) if form == "multi" else _dns(dns, port)
    lagging = f"{HOSTS[2]}:{port}"
    caplog.set_level(logging.WARNING, "anchorcredit.client")
    with CreditClient(target, cache=False) as client:
        for _ in range(4):  # 12 requests round-robin over 3 replicas
            got = client.score(PROMPTS, RESPONSES, policy_version=p1)
            assert {r.policy_version for r in got} == {p1}
            _same(got, refs[a])  # numbers from the p1 weights only
    assert any(lagging in r.getMessage() for r in caplog.records)  # it was tried, avoided


def test_pin_no_replica_serves_is_refused_naming_each_address(replicas: Any, models: Any):
    _, port, _ = replicas
    a, b = models
    _set(replicas, (a, "q1"), (a, "q1"), (b, "q0"))
    with CreditClient(_multi(port), cache=False, replica_wait_s=0.3) as client:
        t0 = time.monotonic()
        with pytest.raises(StalePolicyVersionError) as e:
            client.score(PROMPTS, RESPONSES, policy_version="q9")
        waited = time.monotonic() - t0
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    for h, v in zip(HOSTS, ("q1", "q1", "q0"), strict=True):
        assert f"{h}:{port} serves '{v}'" in str(e.value)
    assert e.value.lagging == [f"{h}:{port}" for h in HOSTS]
    assert waited >= 0.3  # it waited replica_wait_s for a replica to catch up, then refused


def test_pinned_call_waits_for_a_replica_mid_update(replicas: Any, models: Any, refs: Any):
    servers, port, _ = replicas
    a, b = models
    _set(replicas, (a, "w1"), (a, "w1"), (a, "w1"))
    # w2 reaches the second replica 0.6 s after the call has started (no replica had it)
    timer = threading.Timer(0.6, _load, (servers[1], b, "w2"))
    try:
        with CreditClient(_multi(port), cache=False, replica_wait_s=60) as client:
            t0 = time.monotonic()
            timer.start()
            got = client.score(PROMPTS, RESPONSES, policy_version="w2")
            waited = time.monotonic() - t0
    finally:
        timer.join()
    assert {r.policy_version for r in got} == {"w2"}
    _same(got, refs[b])
    assert waited >= 0.6  # it waited for the update instead of refusing


@pytest.mark.parametrize("form", ["multi", "dns"])
def test_unpinned_calls_never_mix_versions(replicas: Any, models: Any, refs: Any, form: str):
    servers, port, dns = replicas
    a, b = models
    u1, u2 = f"u1-{form}", f"u2-{form}"
    _set(replicas, (a, u1), (b, u2), (a, u1))
    target = _multi(port) if form == "multi" else _dns(dns, port)
    seen = set()
    with CreditClient(target, cache=None) as client:  # cache on: keys must name the version
        for _ in range(6):
            got = client.score(PROMPTS, RESPONSES)
            versions = {r.policy_version for r in got}
            assert len(versions) == 1, versions  # one call, one version
            (v,) = versions
            seen.add(v)
            _same(got, refs[a] if v == u1 else refs[b])
    assert seen <= {u1, u2}


def test_weight_changes_reach_every_address_and_name_the_dead_one(
    replicas: Any, models: Any, refs: Any
):
    servers, port, dns = replicas
    a, b = models
    _set(replicas, (a, "d0"), (a, "d0"), (a, "d0"))
    with CreditClient(_dns(dns, port, NAME_WITH_DEAD), cache=False, timeout_s=5) as client:
        with pytest.raises(CreditServiceError) as e:
            client.update_weights(b, "d1", replaces="d0")
        assert list(e.value.failed) == [f"{DEAD}:{port}"]
        assert f"{DEAD}:{port}" in str(e.value)
    with CreditClient(_dns(dns, port), cache=False) as client:
        assert [r.policy_version for r in client.replicas()] == ["d1"] * 3
        assert client.served_version() == "d1"
        _same(client.score(PROMPTS, RESPONSES, policy_version="d1"), refs[b])


def test_an_answer_from_other_weights_is_never_used(fake_server: Any):
    # old servers: each answers from its own weights whatever version the request names
    impls = [FakeServicer(v, value=x, max_request_sequences=1) for v, x in (("7", 1.0), ("8", 2.0))]
    ports = [fake_server(impl) for impl in impls]
    target = "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in ports)
    with CreditClient(target, cache=None) as client:
        for _ in range(3):  # one sequence per request: 4 requests round-robin over both
            got = client.score([[1]] * 4, [[2, 3]] * 4, policy_version="7")
            assert [r.policy_version for r in got] == ["7"] * 4
            assert all((r.gamma == 1.0).all() for r in got)
    assert impls[1].calls  # the other replica answered, and was not used
