"""Tiny grpc.health.v1 probe for container HEALTHCHECKs (no grpc_health_probe binary needed).

    python -m anchorcredit.server.probe [--port 50051] [--service anchorcredit.v1.CreditService]

Exit 0 when the service reports SERVING, 1 otherwise (including connection errors).
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(target: str, service: str, timeout: float = 3.0, tls: bool = False) -> bool:
    """True when `service` on `target` answers SERVING within `timeout` seconds."""
    creds = grpc.ssl_channel_credentials() if tls else None
    channel = grpc.secure_channel(target, creds) if creds else grpc.insecure_channel(target)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("ANCHORCREDIT_PORT", 50051)))
    parser.add_argument("--service", default="anchorcredit.v1.CreditService")
    parser.add_argument("--timeout", type=float, default=3.0)
    parser.add_argument(
        "--tls", action="store_true", default=bool(os.environ.get("ANCHORCREDIT_TLS_CERT"))
    )
    args = parser.parse_args(argv)
    ok = check(f"{args.host}:{args.port}", args.service, args.timeout, args.tls)
    print("SERVING" if ok else "NOT_SERVING")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
