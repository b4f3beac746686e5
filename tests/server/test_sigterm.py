"""`anchorcredit serve` as a real process: SIGTERM during a slow request drains it, exit 0.

Also covers env-var configuration end to end (the port and metrics port come from
ANCHORCREDIT_* variables) and that a drained server refuses new work.
"""

from __future__ import annotations

import math
import re
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from anchorcredit.v1 import credit_pb2 as pb
from anchorcredit.v1 import credit_pb2_grpc

SLOW_S = 4.0  # seconds of scoring the drained request takes at least
MAX_SEQUENCES = 1024  # the server's default sequence limit (the token limit is raised to fit)


def _sequence(seed: int) -> pb.Sequence:
    rng = np.random.default_rng(seed)
    return pb.Sequence(
        prompt_ids=rng.integers(0, 256, 24).tolist(),
        response_ids=rng.integers(0, 256, 1000).tolist(),
    )


def _seconds_per_sequence(stub: Any) -> float:
    """Scoring time of one 1024-token sequence here: the faster of two 4-sequence calls
    (the first also warms the model up)."""
    rounds = []
    for r in range(2):
        t0 = time.monotonic()
        stub.Score(
            pb.ScoreRequest(sequences=[_sequence(10_000 + 4 * r + i) for i in range(4)]), timeout=90
        )
        rounds.append((time.monotonic() - t0) / 4)
    return min(rounds)


def _sequences_for(seconds: float, per_sequence_s: float) -> int:
    n = max(8, math.ceil(seconds / per_sequence_s))
    assert n <= MAX_SEQUENCES, f"{per_sequence_s:.4f} s a sequence: raise MAX_SEQUENCES"
    return n


@pytest.mark.slow
def test_sigterm_drains_inflight_request(llama_model: Path, tmp_path: Path, serve_process):
    model = llama_model
    # A short shutdown delay: long enough to observe NOT_SERVING, far shorter than the request.
    server = serve_process(
        "--model",
        str(model),
        "--device",
        "cpu",
        ANCHORCREDIT_PORT="0",
        ANCHORCREDIT_METRICS_PORT="0",
        ANCHORCREDIT_HOST="127.0.0.1",
        ANCHORCREDIT_METRICS_HOST="127.0.0.1",
        ANCHORCREDIT_GRACE_S="60",
        ANCHORCREDIT_SHUTDOWN_DELAY_S="0.2",
        ANCHORCREDIT_MAX_REQUEST_TOKENS=str(MAX_SEQUENCES * 1024),
    )
    proc = server.proc
    m = server.wait_for(r"gRPC on 127\.0\.0\.1:(\d+) .* metrics on 127\.0\.0\.1:(\d+)")
    port, metrics_port = int(m.group(1)), int(m.group(2))
    server.wait_for(r"loaded in")
    # replies of hundreds of sequences exceed gRPC's 4 MB default
    channel = grpc.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", -1)]
    )
    stub = credit_pb2_grpc.CreditServiceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    # Still in flight when the delay is over, on any machine: sized from this one's speed.
    n = _sequences_for(SLOW_S, _seconds_per_sequence(stub))
    slow = pb.ScoreRequest(sequences=[_sequence(seed) for seed in range(n)])
    future = stub.Score.future(slow, timeout=90)
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # wait until the request is on the device
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        if re.search(r"^anchorcredit_inflight_requests 1\.0$", text, re.M) and re.search(
            r"^anchorcredit_queue_size 0\.0$", text, re.M
        ):
            break
        time.sleep(0.01)
    assert not future.done(), "request finished before SIGTERM; make it slower"
    proc.send_signal(signal.SIGTERM)
    server.wait_for(r"draining")
    reply = health.Check(
        health_pb2.HealthCheckRequest(service="anchorcredit.v1.CreditService"), timeout=5
    )
    assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert not future.done()
    resp = future.result(timeout=90)
    # It was still running when the server stopped accepting: drained by stop(grace).
    server.wait_for(r"stopping: 1 RPCs in flight")
    assert len(resp.results) == n and resp.results[0].response_len == 1000
    assert proc.wait(timeout=60) == 0
    out = server.output()
    assert "server stopped" in out and "Traceback" not in out
    with pytest.raises(grpc.RpcError):
        stub.Score(slow, timeout=2)
    channel.close()
