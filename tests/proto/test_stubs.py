"""The committed stubs (service/anchorcredit/v1/) are what the pinned grpcio-tools makes of
the proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_committed_stubs_are_fresh():
    pytest.importorskip("grpc_tools")
    proc = subprocess.run(
        [sys.executable, "scripts/gen_proto.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout


def test_stubs_expose_the_service():
    from anchorcredit.v1 import credit_pb2, credit_pb2_grpc

    service = credit_pb2.DESCRIPTOR.services_by_name["CreditService"]
    assert service.full_name == "anchorcredit.v1.CreditService"
    assert {m.name for m in service.methods} == {
        "Score",
        "ScoreStream",
        "GetModelInfo",
        "UpdateWeights",
        "PushWeights",
        "JoinWeightGroup",
        "ReceiveWeights",
        "LeaveWeightGroup",
    }
    assert hasattr(credit_pb2_grpc, "add_CreditServiceServicer_to_server")
