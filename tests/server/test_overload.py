"""Overload, stream framing, cancellation and fairness against a real server.

Each test reproduces a reliability failure (an overloaded queue, a garbage stream frame,
a caller that gave up, a small call behind a large one) against a real grpc.aio
server on loopback (conftest's `start_server`) with the tiny debug model on the CPU.
Assertions are on orderings and counts, never on tight latencies (CI boxes are busy).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from anchorcredit.client import CreditClient
from anchorcredit.v1 import credit_pb2 as pb

VOCAB = 256


@pytest.fixture(scope="module")
def model_dir(llama_model: Path) -> str:
    return str(llama_model)


def _pairs(n: int, seed: int, prompt: int = 6, response: int = 24) -> list[tuple[list, list]]:
    rng = np.random.default_rng(seed)
    return [
        (rng.integers(0, VOCAB, prompt).tolist(), rng.integers(0, VOCAB, response).tolist())
        for _ in range(n)
    ]


def _request(pairs: list, **kw: Any) -> pb.ScoreRequest:
    return pb.ScoreRequest(
        sequences=[pb.Sequence(prompt_ids=p, response_ids=r) for p, r in pairs], **kw
    )


# ---------------------------------------------------------------- overload


def test_burst_50x_the_queue_completes_with_default_client_settings(
    model_dir: str, start_server: Any
):
    """200 callers released at once on a queue of 4: every call completes (the server
    rejected many of them on the way, the client's retry budget carried them through)."""
    srv = start_server(model_dir, max_queue=4, max_wait_ms=2.0)
    try:
        callers = 200
        pairs = _pairs(callers, seed=4)
        go = threading.Barrier(callers)
        with CreditClient([srv.target], cache=False) as client:  # default retry settings
            client.model_info()

            def call(i: int) -> int:
                go.wait()
                got = client.score([pairs[i][0]], [pairs[i][1]])
                return len(got[0].gamma)

            with ThreadPoolExecutor(callers) as pool:
                lengths = list(pool.map(call, range(callers)))
        assert lengths == [len(r) for _, r in pairs]  # all 200 answered, none lost
        rejected = srv.sample("anchorcredit_request_failures_total", {"reason": "queue_full"})
        assert rejected > 0  # it really was overloaded
    finally:
        srv.stop()


def test_retry_hint_grows_with_the_queue(model_dir: str, start_server: Any):
    """The RESOURCE_EXHAUSTED hint is the queue's drain time: more tokens queued -> longer."""
    from anchorcredit.server.batcher import _Work

    srv = start_server(model_dir, max_queue=64)
    try:
        for i in range(3):  # time a few batches so seconds-per-token is measured
            srv.stub.Score(_request(_pairs(2, seed=i)), timeout=30)
        batcher = srv.server.state.batcher

        async def hints() -> tuple[float, float]:
            import asyncio

            small = batcher.retry_after_s()
            fake = [
                _Work(_FakeParsed(4096), asyncio.get_running_loop().create_future(), None)
                for _ in range(8)
            ]
            batcher._queue.extend(fake)  # no await until removed: the loop never sees them
            try:
                big = batcher.retry_after_s()
            finally:
                for w in fake:
                    batcher._queue.remove(w)
            return small, big

        small, big = srv.run(hints())
        assert big > small
    finally:
        srv.stop()


class _FakeParsed:
    def __init__(self, tokens: int) -> None:
        self.num_tokens = tokens


# ---------------------------------------------------------------- stream framing


def _raw_stream(srv: Any) -> Any:
    """ScoreStream taking raw frames, so a test can send bytes that are no ScoreRequest."""
    return srv.channel.stream_stream(
        "/anchorcredit.v1.CreditService/ScoreStream",
        request_serializer=None,
        response_deserializer=pb.ScoreResponse.FromString,
    )


@pytest.fixture(scope="module")
def shared(model_dir: str, start_server: Any) -> Any:
    srv = start_server(model_dir, max_queue=64)
    yield srv
    srv.stop()


@pytest.mark.parametrize("garbage", [b"\xff\xff\xff\xff", b"garbage bytes"])
def test_stream_garbage_frame_ends_with_invalid_argument(shared: Any, garbage: bytes):
    """[good, garbage, good]: the good answer before it, then INVALID_ARGUMENT, never OK."""
    frames = [
        _request(_pairs(1, seed=50), request_id="first").SerializeToString(),
        garbage,
        _request(_pairs(1, seed=51), request_id="third").SerializeToString(),
    ]
    got: list[pb.ScoreResponse] = []
    with pytest.raises(grpc.RpcError) as info:
        for resp in _raw_stream(shared)(iter(frames), timeout=30):
            got.append(resp)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "frame 1" in info.value.details()  # which frame could not be parsed
    assert [r.request_id for r in got] == ["first"]
    resp = shared.stub.Score(_request(_pairs(1, seed=52)), timeout=30)  # still serving
    assert len(resp.results) == 1


def test_stream_answers_carry_request_ids_in_order(shared: Any):
    ids = [f"r{i}" for i in range(12)]
    reqs = [_request(_pairs(1 + i % 3, seed=60 + i), request_id=rid) for i, rid in enumerate(ids)]
    got = list(shared.stub.ScoreStream(iter(reqs), timeout=60))
    assert [r.request_id for r in got] == ids
    assert [len(r.results) for r in got] == [1 + i % 3 for i in range(12)]


# ---------------------------------------------------------------- cancellation


def _dropped(srv: Any, reason: str) -> float:
    return srv.sample("anchorcredit_queue_dropped_total", {"reason": reason})


def _wait_idle(srv: Any, timeout: float = 60.0) -> None:
    """Until the batcher has nothing queued and nothing on the device."""
    batcher = srv.server.state.batcher
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not batcher._queue and batcher._busy_since is None:
            return
        time.sleep(0.02)
    raise AssertionError("the batcher never went idle")


@pytest.mark.parametrize("how", ["deadline", "cancelled"])
def test_running_request_stops_when_its_caller_gives_up(shared: Any, how: str):
    """1024 x 128 tokens: the caller's deadline passes (or it cancels) while the request
    runs; the device stops at the next layer / piece, counted under the reason."""
    big = _request(_pairs(1024, seed=70, prompt=28, response=100))
    total = 1024 * 128
    tokens0 = shared.sample("anchorcredit_tokens_total")
    dropped0 = _dropped(shared, how)
    batcher = shared.server.state.batcher
    if how == "deadline":
        with pytest.raises(grpc.RpcError) as info:
            shared.stub.Score(big, timeout=0.5)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    else:
        call = shared.stub.Score.future(big, timeout=60)
        deadline = time.monotonic() + 30
        while batcher._busy_since is None and time.monotonic() < deadline:
            time.sleep(0.005)  # until it is on the device
        call.cancel()
    _wait_idle(shared)
    assert _dropped(shared, how) == dropped0 + 1
    assert shared.sample("anchorcredit_tokens_total") - tokens0 < total  # stopped early
    resp = shared.stub.Score(_request(_pairs(1, seed=71)), timeout=30)  # the device is free
    assert len(resp.results) == 1


def test_scorer_stops_between_layers(scorer: Any):
    """The runner's cooperative check: inside `cancellable`, a forward stops at the first
    layer after the check turns true (the batcher passes 'every caller gave up')."""
    from anchorcredit.backend import Cancelled, cancellable
    from anchorcredit.contract import CreditParams
    from anchorcredit.runner import Scorer

    pairs = scorer.validate(_pairs(2, seed=72))
    checks: list[int] = []

    def after_two() -> bool:
        checks.append(1)
        return len(checks) > 2

    with cancellable(after_two), pytest.raises(Cancelled):
        scorer.score_batch(pairs, CreditParams())
    assert len(checks) == 3  # two layers ran, the third stopped it
    assert isinstance(scorer, Scorer)
    assert len(scorer.score_batch(pairs, CreditParams()).results) == 2  # outside: unaffected


@pytest.fixture(scope="module")
def scorer(model_dir: str) -> Any:
    from anchorcredit.runner import Scorer

    return Scorer.from_pretrained(model_dir, device="cpu", dtype="float32")


# ---------------------------------------------------------------- fairness


def test_small_call_is_not_held_behind_a_large_one(model_dir: str, start_server: Any):
    """A large request is scored in budget-sized pieces interleaved with other requests: a
    small call sent while it runs is answered long before the large one finishes."""
    srv = start_server(model_dir, max_batch_tokens=256, max_request_tokens=1 << 16)
    try:
        batcher = srv.server.state.batcher
        big = srv.stub.Score.future(_request(_pairs(96, seed=80, prompt=28, response=100)), 120)
        deadline = time.monotonic() + 30
        while batcher._busy_since is None and time.monotonic() < deadline:
            time.sleep(0.005)  # the large one is on the device
        small = srv.stub.Score(_request(_pairs(1, seed=81, prompt=8, response=32)), timeout=60)
        assert len(small.results) == 1
        assert not big.done()  # 96 x 128 tokens = 48 pieces; the small one went after one
        assert len(big.result().results) == 96
        info = srv.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
        assert info.max_request_tokens == 1 << 16 and info.max_batch_tokens == 256
    finally:
        srv.stop()


def test_pieces_give_the_same_numbers_as_one_forward(
    model_dir: str, start_server: Any, scorer: Any
):
    srv = start_server(model_dir, max_batch_tokens=64, max_request_tokens=1 << 14)
    try:
        pairs = _pairs(6, seed=90, prompt=6, response=24)
        resp = srv.stub.Score(_request(pairs), timeout=60)
        assert len(resp.results) == 6
        want = scorer.score(pairs)
        from anchorcredit.server.convert import from_f32_bytes

        for got, ref in zip(resp.results, want, strict=True):
            np.testing.assert_allclose(from_f32_bytes(got.gamma), ref.gamma, rtol=1e-5, atol=1e-6)
    finally:
        srv.stop()


def test_client_splits_to_max_request_tokens(model_dir: str, start_server: Any):
    """A server whose request limit is below its batch budget: the client splits to it."""
    srv = start_server(model_dir, max_batch_tokens=4096, max_request_tokens=100)
    try:
        pairs = _pairs(8, seed=91, prompt=6, response=24)  # 30 tokens each
        with CreditClient([srv.target], cache=False) as client:
            got = client.score([p for p, _ in pairs], [r for _, r in pairs])
        assert [len(g.gamma) for g in got] == [24] * 8
    finally:
        srv.stop()
