"""One configurable fake CreditService for the client tests (no model, no torch).

    fake = FakeServicer(version="7", exhausted=2, hint_ms=150)
    port = fake_server(fake)          # tests/client/conftest.py: served on loopback

It answers GetModelInfo with its limits and version, Score with gamma = 1 + position/100
(or `value` everywhere), and takes PushWeights / UpdateWeights as the new version; it
records what it was sent. Knobs a test turns: refuse the first `exhausted` Score calls
with RESOURCE_EXHAUSTED (and a `hint_ms` trailer), `hold` Score or GetModelInfo until the
test sets `release` (`entered` says a held call arrived), `fail` pushes, `report` another
version than the one served, `ack` another version in a push's answer ("" like an old
server that names none); `info_calls` counts GetModelInfo calls.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import grpc
import numpy as np

from anchorcredit.v1 import credit_pb2 as pb
from anchorcredit.v1 import credit_pb2_grpc as pb_grpc

HOLD_S = 60.0  # the longest a held call waits for `release`


class FakeServicer(pb_grpc.CreditServiceServicer):
    def __init__(
        self,
        version: str = "7",
        *,
        value: float | None = None,
        exhausted: int = 0,
        hint_ms: int | None = None,
        hold: str | None = None,
        fail: str | None = None,
        report: str | None = None,
        ack: str | None = None,
        max_batch_tokens: int = 64,
        max_request_sequences: int = 8,
        dtype: str = "",
    ) -> None:
        self.version = version
        self.value = value  # gamma everywhere; None: 1 + position/100
        self.exhausted = exhausted
        self.hint_ms = hint_ms
        self.hold = hold  # "Score" or "GetModelInfo": that call waits for `release`
        self.fail = fail  # PushWeights is refused INVALID_ARGUMENT with this message
        self.report = report  # a version GetModelInfo claims instead of the served one
        self.ack = ack  # a version a push's answer names instead of the pushed one
        self.info_calls = 0
        self.limits = dict(
            max_batch_tokens=max_batch_tokens, max_request_sequences=max_request_sequences
        )
        self.dtype = dtype
        self.entered, self.release = threading.Event(), threading.Event()
        self.calls: list[float] = []  # time.monotonic() of each Score call
        self.sizes: list[int] = []
        self.requests: list[pb.ScoreRequest] = []
        self.pushes: list[tuple[pb.WeightUpdate, dict]] = []
        self.paths: list[str] = []
        self.lock = threading.Lock()

    def _held(self, method: str) -> None:
        if self.hold == method:
            self.entered.set()
            self.release.wait(HOLD_S)

    def GetModelInfo(self, request: Any, context: Any) -> pb.ModelInfo:
        self._held("GetModelInfo")
        with self.lock:
            self.info_calls += 1
        return pb.ModelInfo(
            model_id="fake",
            stat_version="1",
            dtype=self.dtype,
            policy_version=self.report or self.version,
            **self.limits,
        )

    def Score(self, request: pb.ScoreRequest, context: Any) -> pb.ScoreResponse:
        with self.lock:
            self.calls.append(time.monotonic())
            n_call = len(self.calls)
        if n_call <= self.exhausted:
            if self.hint_ms is not None:
                context.set_trailing_metadata((("retry-after-ms", str(self.hint_ms)),))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
        self._held("Score")
        with self.lock:
            self.sizes.append(len(request.sequences))
            self.requests.append(request)
        out = [self._result(len(s.response_ids)) for s in request.sequences]
        return pb.ScoreResponse(
            results=out, policy_version=self.version, model_id="fake", stat_version="1"
        )

    def _result(self, n: int) -> pb.SequenceResult:
        if self.value is None:
            g = (1.0 + np.arange(n, dtype="<f4") / 100).astype("<f4").tobytes()
        else:
            g = np.full(n, self.value, "<f4").tobytes()
        return pb.SequenceResult(response_len=n, waad=g, fai=g, gamma=g)

    def PushWeights(self, request_iterator: Any, context: Any) -> pb.UpdateWeightsResponse:
        from anchorcredit.client.weights import decode_chunks

        update, tensors = decode_chunks(request_iterator)
        if self.fail:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, self.fail)
        with self.lock:
            self.pushes.append((update, tensors))
            self.version = update.version
        n = sum(len(d) for _, _, d in tensors.values())
        acked = update.version if self.ack is None else self.ack
        return pb.UpdateWeightsResponse(policy_version=acked, tensors=len(tensors), bytes=n)

    def UpdateWeights(self, request: Any, context: Any) -> pb.UpdateWeightsResponse:
        with self.lock:
            self.paths.append(request.path)
            self.version = request.version
        return pb.UpdateWeightsResponse(policy_version=request.version)
