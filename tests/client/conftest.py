"""Fixtures of the client tests: `stub_dns`, a DNS server on loopback for dns targets with
several addresses (gRPC's c-ares resolver and the client's resolver both ask it when the
target names it: `dns://127.0.0.1:<port>/name:P`); `fake_server`, which serves the one
fake CreditService (tests/support/fake_servicer.py) a test configured; `make_pki`."""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from fake_servicer import FakeServicer

from anchorcredit.v1 import credit_pb2_grpc as pb_grpc


class StubDNS:
    """A DNS server on 127.0.0.1 (UDP and TCP, one port) answering A queries from a fixed
    table (else an empty NOERROR for known names, NXDOMAIN for others). A UDP answer over
    512 bytes is cut to the records that fit, with the TC bit set, as real servers do;
    `queries` records (name, qtype, "udp" | "tcp")."""

    def __init__(self, table: dict[str, list[str]]):
        self.table = {k.lower(): v for k, v in table.items()}
        for _ in range(20):  # a port free for both UDP and TCP
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.sock.bind(("127.0.0.1", 0))
            self.port = self.sock.getsockname()[1]
            self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                self.tcp.bind(("127.0.0.1", self.port))
                break
            except OSError:
                self.sock.close()
                self.tcp.close()
        else:
            raise RuntimeError("no port free for both UDP and TCP")
        self.tcp.listen(8)
        self.queries: list[tuple[str, int, str]] = []
        threading.Thread(target=self._serve, daemon=True).start()
        threading.Thread(target=self._serve_tcp, daemon=True).start()

    def _answer(self, data: bytes, proto: str) -> bytes:
        i, labels = 12, []
        while data[i]:
            labels.append(data[i + 1 : i + 1 + data[i]].decode())
            i += 1 + data[i]
        qtype = struct.unpack(">H", data[i + 1 : i + 3])[0]
        name = ".".join(labels).lower()
        self.queries.append((name, qtype, proto))
        ips = self.table.get(name, []) if qtype == 1 else []
        rcode = 0 if name in self.table else 3
        question = data[12 : i + 5]
        flags = 0x8180 | rcode
        if proto == "udp":
            fit = (512 - 12 - len(question)) // 16  # each A record is 16 bytes
            if len(ips) > fit:
                ips, flags = ips[:fit], flags | 0x0200  # TC: ask again over TCP
        answers = b"".join(
            struct.pack(">HHHIH", 0xC00C, 1, 1, 1, 4) + socket.inet_aton(ip) for ip in ips
        )
        header = struct.pack(">HHHHHH", data[0] << 8 | data[1], flags, 1, len(ips), 0, 0)
        return header + question + answers

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(512)
            except OSError:
                return  # closed
            self.sock.sendto(self._answer(data, "udp"), peer)

    def _serve_tcp(self) -> None:
        while True:
            try:
                conn, _ = self.tcp.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve_connection, args=(conn,), daemon=True).start()

    def _serve_connection(self, conn: socket.socket) -> None:
        with conn:
            try:
                while True:  # RFC 1035 4.2.2: each message after its 2-byte length
                    size = conn.recv(2, socket.MSG_WAITALL)
                    if len(size) < 2:
                        return
                    data = conn.recv(struct.unpack(">H", size)[0], socket.MSG_WAITALL)
                    reply = self._answer(data, "tcp")
                    conn.sendall(struct.pack(">H", len(reply)) + reply)
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()
        self.tcp.close()


@pytest.fixture(scope="session")
def stub_dns() -> Iterator[Callable[[dict[str, list[str]]], StubDNS]]:
    """stub_dns({name: [IPv4, ...]}) starts a StubDNS; each is closed at the end."""
    started: list[StubDNS] = []

    def start(table: dict[str, list[str]]) -> StubDNS:
        started.append(StubDNS(table))
        return started[-1]

    yield start
    for d in started:
        d.close()


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _make_pki(d: Path, signed: dict[str, str], other_cas: Sequence[str] = ()) -> Path:
    """In `d`: a test CA (ca.pem, ca.key), a CA-signed certificate NAME.pem/NAME.key for
    each NAME -> its openssl extension line, and a self-signed CA NAME.pem for each of
    `other_cas` (which signed nothing)."""
    for ca in ("ca", *other_cas):
        _openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", f"/CN={'test-ca' if ca == 'ca' else ca + '-ca'}",
            "-keyout", str(d / f"{ca}.key"), "-out", str(d / f"{ca}.pem"),
        )  # fmt: skip
    for name, ext in signed.items():
        (d / f"{name}.ext").write_text(ext + "\n")
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
            "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"),
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"),
            "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "1",
            "-extfile", str(d / f"{name}.ext"), "-out", str(d / f"{name}.pem"),
        )  # fmt: skip
    return d


@pytest.fixture(scope="session")
def make_pki() -> Callable[..., Path]:
    """make_pki(dir, {name: openssl extension line}, other_cas=()): test certificates."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not available to make test certificates")
    return _make_pki


@pytest.fixture
def fake_server() -> Iterator[Callable[..., int]]:
    """fake_server(servicer, address="127.0.0.1:0") serves a FakeServicer; its port (a
    RuntimeError when the address is taken). Held calls are released and the servers
    stopped after the test."""
    started: list[tuple[FakeServicer, grpc.Server]] = []

    def start(servicer: FakeServicer, address: str = "127.0.0.1:0") -> int:
        server = grpc.server(futures.ThreadPoolExecutor(4))
        pb_grpc.add_CreditServiceServicer_to_server(servicer, server)
        started.append((servicer, server))
        port = server.add_insecure_port(address)
        server.start()
        return port

    yield start
    for servicer, server in started:
        servicer.release.set()
        server.stop(0)
