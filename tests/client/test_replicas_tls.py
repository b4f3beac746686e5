"""Replicas over TLS: the per-address channels (weight changes, the replica survey, pinned
calls routed around a lagging replica) dial an IP, but the server's certificate names only
the dns name the addresses came from. They must check it for that name, as the round-robin
channel does; without it every weight change over TLS to a dns target failed verification.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from anchorcredit.client import CreditClient

NAME = "tls.replicas.anchorcredit.test"
HOSTS = ("127.0.0.1", "127.0.0.2")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory, make_pki: Any) -> Path:
    """A CA and a server certificate for the dns name only (no IP in its names)."""
    return make_pki(tmp_path_factory.mktemp("pki"), {"server": f"subjectAltName=DNS:{NAME}"})


def test_tls_dns_target_reaches_every_address(
    llama_model: Path,
    start_server: Any,
    stub_dns: Any,
    pki: Path,
    tmp_path_factory: pytest.TempPathFactory,
):
    model = llama_model
    tls = dict(tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"))
    for _ in range(20):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            servers = [start_server(model, host=h, port=port, **tls) for h in HOSTS]
            break
        except Exception:  # the port was taken on the other loopback address
            continue
    else:
        pytest.fail("no port free on 127.0.0.1-2")
    dns = stub_dns({NAME: list(HOSTS)})
    target = f"dns://127.0.0.1:{dns.port}/{NAME}:{port}"
    try:
        with CreditClient(
            target, cache=False, tls=True, root_certificates=(pki / "ca.pem").read_bytes()
        ) as client:
            assert len(client.score([[1, 2, 3]], [[4, 5, 6, 7]])[0].gamma) == 4
            out = client.update_weights(str(model), "t1")
            assert list(out) == [f"{h}:{port}" for h in HOSTS]
            got = client.replicas()
            assert [(r.address, r.policy_version, r.error) for r in got] == [
                (f"{h}:{port}", "t1", None) for h in HOSTS
            ]
            assert client.served_version() == "t1"
    finally:
        for s in servers:
            s.stop()
