"""Fixtures of the client tests: `stub_dns`, a DNS server on loopback for dns targets with
several addresses (gRPC's c-ares resolver and the client's resolver both ask it when the
target names it: `dns://127.0.0.1:<port>/name:P`)."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable, Iterator

import pytest


class StubDNS:
    """A UDP DNS server on 127.0.0.1 answering A queries from a fixed table (else an empty
    NOERROR for known names, NXDOMAIN for others)."""

    def __init__(self, table: dict[str, list[str]]):
        self.table = {k.lower(): v for k, v in table.items()}
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.queries: list[tuple[str, int]] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(512)
            except OSError:
                return  # closed
            i, labels = 12, []
            while data[i]:
                labels.append(data[i + 1 : i + 1 + data[i]].decode())
                i += 1 + data[i]
            qtype = struct.unpack(">H", data[i + 1 : i + 3])[0]
            name = ".".join(labels).lower()
            self.queries.append((name, qtype))
            ips = self.table.get(name, []) if qtype == 1 else []
            rcode = 0 if name in self.table else 3
            answers = b"".join(
                struct.pack(">HHHIH", 0xC00C, 1, 1, 1, 4) + socket.inet_aton(ip) for ip in ips
            )
            header = struct.pack(
                ">HHHHHH", data[0] << 8 | data[1], 0x8180 | rcode, 1, len(ips), 0, 0
            )
            self.sock.sendto(header + data[12 : i + 5] + answers, peer)

    def close(self) -> None:
        self.sock.close()


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
