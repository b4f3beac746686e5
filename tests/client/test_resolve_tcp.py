"""The client's own DNS query (`dns://server/name` targets): an answer too big for one UDP
datagram comes back truncated (TC bit) and is asked again over TCP, so every pod of a large
deployment is found (and sent new weights), not only the ~29 that fit in 512 bytes."""

from __future__ import annotations

from typing import Any

from anchorcredit.client.resolve import expand_target

MANY = "many.anchorcredit.test"
FEW = "few.anchorcredit.test"


def test_a_truncated_udp_answer_is_asked_again_over_tcp(stub_dns: Any):
    pods = [f"10.0.{i // 200}.{i % 200 + 1}" for i in range(300)]
    dns = stub_dns({MANY: pods})
    assert expand_target(f"dns://127.0.0.1:{dns.port}/{MANY}:7000") == [f"{ip}:7000" for ip in pods]
    assert [(n, p) for n, _, p in dns.queries] == [(MANY, "udp"), (MANY, "tcp")]


def test_an_answer_that_fits_stays_on_udp(stub_dns: Any):
    dns = stub_dns({FEW: ["10.1.0.1", "10.1.0.2"]})
    assert expand_target(f"dns://127.0.0.1:{dns.port}/{FEW}:7000") == [
        "10.1.0.1:7000",
        "10.1.0.2:7000",
    ]
    assert [p for _, _, p in dns.queries] == ["udp"]
