"""Issue 14 with TLS: the per-address channels (weight changes, the replica survey, pinned
calls routed around a lagging replica) dial an IP, but the server's certificate names only
the dns name the addresses came from. They must check it for that name, as the round-robin
channel does; without it every weight change over TLS to a dns target failed verification.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from anchorcredit.client import CreditClient

NAME = "tls.replicas.anchorcredit.test"
HOSTS = ("127.0.0.1", "127.0.0.2")


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA and a server certificate for the dns name only (no IP in its names)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not available to make test certificates")
    d = tmp_path_factory.mktemp("pki")
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
        "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"),
    )  # fmt: skip
    (d / "server.ext").write_text(f"subjectAltName=DNS:{NAME}\n")
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=server",
        "-keyout", str(d / "server.key"), "-out", str(d / "server.csr"),
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca.pem"),
        "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "1",
        "-extfile", str(d / "server.ext"), "-out", str(d / "server.pem"),
    )  # fmt: skip
    return d


def test_tls_dns_target_reaches_every_address(
    start_server: Any, stub_dns: Any, pki: Path, tmp_path_factory: pytest.TempPathFactory
):
    from anchorcredit.offline.debug_model import save_debug_model

    model = save_debug_model(tmp_path_factory.mktemp("m") / "llama", arch="llama")
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
