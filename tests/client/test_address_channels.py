"""Per-address channels (weight pushes, replica surveys) follow the resolved address set:
when a pod leaves a dns name, its channel is closed at the next resolution, but never
under a call still running on it (it closes when that call ends)."""

from __future__ import annotations

import socket
import threading
from concurrent import futures
from typing import Any

import grpc
import pytest
from fake_servicer import FakeServicer

from anchorcredit.client.transport import Transport
from anchorcredit.v1 import credit_pb2 as pb

NAME = "pods.anchorcredit.test"
HOSTS = ("127.0.0.1", "127.0.0.2")


@pytest.fixture()
def pods(fake_server: Any) -> tuple[int, list[FakeServicer]]:
    """One fake server per HOSTS address, all on one port (GetModelInfo held on demand)."""
    for _ in range(20):
        with socket.socket() as s:
            s.bind((HOSTS[0], 0))
            port = s.getsockname()[1]
        impls = [FakeServicer("v1") for _ in HOSTS]
        try:
            for h, impl in zip(HOSTS, impls, strict=True):
                fake_server(impl, f"{h}:{port}")
            return port, impls
        except RuntimeError:  # the port was taken on the other address
            continue
    pytest.fail("no port free on both loopback addresses")


@pytest.fixture()
def channels(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[grpc.Channel]]:
    """Every channel a Transport opens, by its target."""
    opened: dict[str, list[grpc.Channel]] = {}
    original = Transport._channel

    def record(self: Transport, target: str, options: Any) -> grpc.Channel:
        ch = original(self, target, options)
        opened.setdefault(target, []).append(ch)
        return ch

    monkeypatch.setattr(Transport, "_channel", record)
    return opened


def _closed(ch: grpc.Channel) -> bool:
    try:
        ch.unary_unary("/probe/Closed")(b"", timeout=0.01)
    except ValueError:
        return True  # "Cannot invoke RPC on closed channel!"
    except grpc.RpcError:
        return False
    return False


def _ask(transport: Transport, address: str) -> str:
    stub = transport.address_stub(address)
    return stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).policy_version


def test_a_gone_pods_channel_is_closed_at_the_next_resolution(
    pods: Any, stub_dns: Any, channels: Any
):
    port, _ = pods
    dns = stub_dns({NAME: list(HOSTS)})
    gone = f"ipv4:{HOSTS[1]}:{port}"
    transport = Transport([f"dns://127.0.0.1:{dns.port}/{NAME}:{port}"])
    try:
        addresses, _ = transport.addresses()
        assert [_ask(transport, a) for a in addresses] == ["v1", "v1"]
        dns.table[NAME] = [HOSTS[0]]  # the second pod went away
        assert transport.addresses()[0] == [f"{HOSTS[0]}:{port}"]
        (old,) = channels[gone]
        assert _closed(old)
        assert not _closed(channels[f"ipv4:{HOSTS[0]}:{port}"][0])
        # a name that fails to resolve for a moment drops nothing
        dns.table.pop(NAME)
        assert transport.addresses()[1]
        assert not _closed(channels[f"ipv4:{HOSTS[0]}:{port}"][0])
        # the pod is back: a fresh channel reaches it
        dns.table[NAME] = list(HOSTS)
        addresses, _ = transport.addresses()
        assert [_ask(transport, a) for a in addresses] == ["v1", "v1"]
        assert len(channels[gone]) == 2 and not _closed(channels[gone][1])
    finally:
        transport.close()
    assert all(_closed(c) for cs in channels.values() for c in cs)


def test_a_call_in_flight_keeps_its_channel_until_it_ends(pods: Any, stub_dns: Any, channels: Any):
    port, impls = pods
    dns = stub_dns({NAME: list(HOSTS)})
    leaving = f"{HOSTS[1]}:{port}"
    transport = Transport([f"dns://127.0.0.1:{dns.port}/{NAME}:{port}"])
    try:
        transport.addresses()
        impls[1].hold = "GetModelInfo"
        pool = futures.ThreadPoolExecutor(1)
        answer = pool.submit(_ask, transport, leaving)
        assert impls[1].entered.wait(10)
        dns.table[NAME] = [HOSTS[0]]
        transport.addresses()  # another thread re-resolves mid-call
        (ch,) = channels[f"ipv4:{leaving}"]
        assert not _closed(ch)
        impls[1].release.set()
        assert answer.result(10) == "v1"  # not cancelled by the pruning
        pool.shutdown()
        assert _closed(ch)  # closed once its last call ended
    finally:
        transport.close()


def test_a_future_in_flight_keeps_its_channel_until_it_ends(
    pods: Any, stub_dns: Any, channels: Any
):
    port, impls = pods
    dns = stub_dns({NAME: list(HOSTS)})
    leaving = f"{HOSTS[1]}:{port}"
    transport = Transport([f"dns://127.0.0.1:{dns.port}/{NAME}:{port}"])
    try:
        transport.addresses()
        impls[1].hold = "GetModelInfo"
        fut = transport.address_stub(leaving).GetModelInfo.future(
            pb.GetModelInfoRequest(), timeout=10
        )
        assert impls[1].entered.wait(10)
        dns.table[NAME] = [HOSTS[0]]
        transport.addresses()
        (ch,) = channels[f"ipv4:{leaving}"]
        assert not _closed(ch)
        impls[1].release.set()
        assert fut.result(10).policy_version == "v1"
        for _ in range(100):  # the done callback runs on grpc's thread
            if _closed(ch):
                break
            threading.Event().wait(0.02)
        assert _closed(ch)
    finally:
        transport.close()
