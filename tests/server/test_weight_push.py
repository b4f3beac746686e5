"""Changing the weights of a real server on loopback: PushWeights (a stream of raw bytes),
UpdateWeights (a path) and the collective group (gloo), with the real Scorer on the tiny
debug model. The trainer side is written here with raw gRPC stubs and weight_group."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from debug_model import build_debug_model
from grpc_health.v1 import health_pb2

from anchorcredit import weight_group
from anchorcredit.runner import Scorer
from anchorcredit.server.config import SERVICE_NAME
from anchorcredit.server.convert import from_f32_bytes
from anchorcredit.v1 import credit_pb2 as pb

TIMEOUT = 60.0
CHUNK = 16 * 1024  # small chunks: many messages per tensor, tensors split mid-element too
PAIRS = [([1, 2, 3, 4, 5], list(range(10, 40))), ([7, 8], list(range(60, 90)))]


def _state(seed: int) -> dict[str, torch.Tensor]:
    return build_debug_model("llama", seed=seed).state_dict()


def _wire(t: torch.Tensor, dtype: str = "float32") -> bytes:
    return t.detach().to(getattr(torch, dtype)).contiguous().view(torch.uint8).numpy().tobytes()


def chunks(
    version: str,
    state: dict[str, torch.Tensor],
    *,
    replaces: str = "",
    partial: bool = False,
    dtype: str = "float32",
    chunk: int = CHUNK,
) -> Iterator[pb.WeightChunk]:
    """What a trainer sends: `update`, then each tensor's header with its first bytes."""
    yield pb.WeightChunk(
        update=pb.WeightUpdate(version=version, replaces=replaces, partial=partial)
    )
    for name, t in state.items():
        raw = _wire(t, dtype)
        header = pb.TensorHeader(name=name, dtype=dtype, shape=list(t.shape))
        yield pb.WeightChunk(tensor=header, data=raw[:chunk])
        for i in range(chunk, len(raw), chunk):
            yield pb.WeightChunk(data=raw[i : i + chunk])


def _score(s: Any, **kw: Any) -> pb.ScoreResponse:
    req = pb.ScoreRequest(
        sequences=[pb.Sequence(prompt_ids=p, response_ids=r) for p, r in PAIRS], **kw
    )
    return s.stub.Score(req, timeout=TIMEOUT)


def _assert_equal(resp: pb.ScoreResponse, want: list, exact: bool = True) -> None:
    for got, ref in zip(resp.results, want, strict=True):
        for name in ("waad", "fai", "gamma"):
            a, b = from_f32_bytes(getattr(got, name)), getattr(ref, name)
            if exact:
                np.testing.assert_array_equal(a, b, err_msg=name)
            else:
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)


def _fails(code: grpc.StatusCode, call: Any, *args: Any, **kw: Any) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, timeout=TIMEOUT, **kw)
    assert info.value.code() == code, info.value.details()
    return info.value.details()


@pytest.fixture(scope="module")
def model_dir(llama_model: Path) -> str:
    return str(llama_model)


@pytest.fixture(scope="module")
def refs() -> dict[int, list]:
    """Per seed: a fresh Scorer's results on PAIRS (the numbers each version must give)."""
    return {
        s: Scorer.from_pretrained(build_debug_model("llama", seed=s)).score(PAIRS)
        for s in (0, 1, 2, 3)
    }


@pytest.fixture
def server(start_server: Any, model_dir: str) -> Iterator[Any]:
    s = start_server(None, Scorer.from_pretrained(model_dir))
    yield s
    s.stop()


def _unchanged(s: Any, refs: dict, version: str = "0", seed: int = 0) -> None:
    resp = _score(s)
    assert resp.policy_version == version
    _assert_equal(resp, refs[seed])
    info = s.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=TIMEOUT)
    assert info.policy_version == version


# ------------------------------------------------------------------------------ stream


def test_push_equals_a_fresh_scorer(server: Any, refs: dict):
    s = server
    _unchanged(s, refs)
    state = _state(1)
    reply = s.stub.PushWeights(chunks("v1", state, replaces="0"), timeout=TIMEOUT)
    assert reply.policy_version == "v1" and reply.tensors == len(state)
    assert reply.bytes == sum(t.numel() * 4 for t in state.values()) and reply.load_seconds > 0
    resp = _score(s)
    assert resp.policy_version == "v1"
    _assert_equal(resp, refs[1])  # bit-exact in float32
    info = s.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=TIMEOUT)
    n = sum(p.numel() for p in build_debug_model("llama").parameters())
    assert info.policy_version == "v1"
    assert info.loaded_param_count == info.total_param_count == n
    assert info.max_request_tokens == s.server.config.max_request_tokens > 0
    assert s.sample("anchorcredit_weight_updates_total") == 1
    assert s.sample("anchorcredit_weight_updates_by_transport_total", {"transport": "stream"}) == 1
    assert s.sample("anchorcredit_weight_bytes_total", {"transport": "stream"}) == reply.bytes
    # A half-precision push into the float32 model, chunks of the largest size.
    reply = s.stub.PushWeights(
        chunks("v2-bf16", _state(2), dtype="bfloat16", chunk=2 * 1024 * 1024), timeout=TIMEOUT
    )
    assert reply.bytes == sum(t.numel() * 2 for t in state.values())
    want = {k: v.bfloat16().float() for k, v in _state(2).items()}
    fresh = Scorer.from_pretrained(build_debug_model("llama", seed=0))
    fresh.load_weights(want, version="x")
    _assert_equal(_score(s), fresh.score(PAIRS))


def test_partial_push(server: Any, refs: dict):
    s = server
    new = _state(1)
    part = {k: v for k, v in new.items() if k.startswith("model.layers.0.")}
    reply = s.stub.PushWeights(chunks("p1", part, partial=True), timeout=TIMEOUT)
    assert reply.policy_version == "p1" and reply.tensors == len(part)
    mixed = {**_state(0), **part}
    want = Scorer.from_pretrained(build_debug_model("llama", seed=0))
    want.load_weights(mixed, version="m")
    resp = _score(s)
    assert resp.policy_version == "p1"
    _assert_equal(resp, want.score(PAIRS))
    # Without `partial` the same tensors are refused, naming a missing one.
    details = _fails(grpc.StatusCode.INVALID_ARGUMENT, s.stub.PushWeights, chunks("p2", part))
    assert "missing" in details and "model." in details
    assert _score(s).policy_version == "p1"


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda m: m.tensor.__setattr__("name", "model.nope.weight"), "'model.nope.weight'"),
        (lambda m: m.tensor.shape.__setitem__(0, 3), "'model.norm.weight': shape (3,)"),
        (lambda m: m.tensor.__setattr__("dtype", "int8"), "'model.norm.weight': dtype 'int8'"),
    ],
    ids=["unknown-name", "wrong-shape", "dtype-not-on-the-wire"],
)
def test_bad_tensor_is_invalid_argument_naming_it(server: Any, refs: dict, edit: Any, needle: str):
    s = server
    msgs = list(chunks("v1", _state(1)))
    at = next(i for i, m in enumerate(msgs) if m.tensor.name == "model.norm.weight")
    edit(msgs[at])
    details = _fails(grpc.StatusCode.INVALID_ARGUMENT, s.stub.PushWeights, iter(msgs))
    assert needle in details, details
    _unchanged(s, refs)
    # the server is not stuck: the next push goes through
    assert s.stub.PushWeights(chunks("v1", _state(1)), timeout=TIMEOUT).policy_version == "v1"


def test_malformed_streams(server: Any, refs: dict):
    s = server
    good = list(chunks("v1", _state(1)))
    no_update = good[1:]
    details = _fails(grpc.StatusCode.INVALID_ARGUMENT, s.stub.PushWeights, iter(no_update))
    assert "update" in details
    twice = [good[0], *good[1:3], pb.WeightChunk(update=pb.WeightUpdate(version="v9"))]
    assert "update" in _fails(grpc.StatusCode.INVALID_ARGUMENT, s.stub.PushWeights, iter(twice))
    extra = [*good, pb.WeightChunk(data=b"\0" * 8)]
    details = _fails(grpc.StatusCode.INVALID_ARGUMENT, s.stub.PushWeights, iter(extra))
    assert "8 tensor bytes arrived after tensor 'lm_head.weight' was complete" in details
    over = [*good[:-1], pb.WeightChunk(data=good[-1].data + b"\0" * 8)]
    assert "'lm_head.weight': more than" in _fails(
        grpc.StatusCode.INVALID_ARGUMENT, s.stub.PushWeights, iter(over)
    )
    _unchanged(s, refs)


def test_stream_ending_mid_tensor_is_aborted(server: Any, refs: dict):
    s = server
    msgs = list(chunks("v1", _state(1)))
    # Cut inside model.embed_tokens.weight (64 KiB: four 16 KiB chunks), after two chunks.
    first = next(i for i, m in enumerate(msgs) if m.tensor.name == "model.embed_tokens.weight")
    details = _fails(grpc.StatusCode.ABORTED, s.stub.PushWeights, iter(msgs[: first + 2]))
    assert "'model.embed_tokens.weight'" in details and "32768 of its 65536 bytes" in details
    _unchanged(s, refs)


def test_cancelled_push_leaves_the_old_weights_and_scoring_goes_on(server: Any, refs: dict):
    s = server
    msgs = list(chunks("v1", _state(1)))
    # stop inside lm_head.weight (64 KiB: four chunks), after two of them
    half = next(i for i, m in enumerate(msgs) if m.tensor.name == "lm_head.weight") + 2
    sent, release = threading.Event(), threading.Event()

    def stalls_mid_tensor() -> Iterator[pb.WeightChunk]:
        yield from msgs[:half]
        sent.set()
        release.wait(TIMEOUT)

    assert msgs[half].tensor.name == ""  # the cut falls inside a tensor
    call = s.stub.PushWeights.future(stalls_mid_tensor(), timeout=TIMEOUT)
    try:
        assert sent.wait(TIMEOUT)
        _wait_until(lambda: s.server.servicer.weights._lock.locked())  # the push is staging
        # The push is in flight: scoring is served from the old weights, health answers.
        _unchanged(s, refs)
        check = s.health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=TIMEOUT)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        call.cancel()
    finally:
        release.set()
    with pytest.raises(grpc.FutureCancelledError):
        call.result()
    _unchanged(s, refs)
    # the weight lock was released: a whole push now lands
    assert s.stub.PushWeights(chunks("v1", _state(1)), timeout=TIMEOUT).policy_version == "v1"
    _assert_equal(_score(s), refs[1])


def test_version_rules_are_failed_precondition(server: Any, refs: dict):
    s = server
    details = _fails(
        grpc.StatusCode.FAILED_PRECONDITION,
        s.stub.PushWeights,
        chunks("v1", _state(1), replaces="not-served"),
    )
    assert "'not-served'" in details and "'0'" in details
    details = _fails(
        grpc.StatusCode.FAILED_PRECONDITION, s.stub.PushWeights, chunks("0", _state(1))
    )
    assert "already served" in details
    assert "version" in _fails(
        grpc.StatusCode.INVALID_ARGUMENT, s.stub.PushWeights, chunks("", _state(1))
    )
    _unchanged(s, refs)
    assert s.sample("anchorcredit_request_failures_total", {"reason": "weight_version"}) == 2


def test_update_weights_path_follows_the_same_rules(
    other_llama_model: Path, server: Any, refs: dict, tmp_path: Any
):
    s = server
    other = str(other_llama_model)
    details = _fails(
        grpc.StatusCode.FAILED_PRECONDITION,
        s.stub.UpdateWeights,
        pb.UpdateWeightsRequest(path=other, version="0"),
    )
    assert "already served" in details
    _fails(
        grpc.StatusCode.FAILED_PRECONDITION,
        s.stub.UpdateWeights,
        pb.UpdateWeightsRequest(path=other, version="v1", replaces="zzz"),
    )
    _unchanged(s, refs)
    reply = s.stub.UpdateWeights(
        pb.UpdateWeightsRequest(path=other, version="v1", replaces="0"), timeout=TIMEOUT
    )
    assert reply.policy_version == "v1" and reply.tensors == len(_state(1)) and reply.bytes > 0
    _assert_equal(_score(s), refs[1])
    assert s.sample("anchorcredit_weight_updates_by_transport_total", {"transport": "path"}) == 1


def _wait_until(condition: Callable[[], bool]) -> None:
    """Poll `condition` (an event the server does not signal) until true, or fail."""
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, "the condition never came true"
        time.sleep(0.01)


def test_pushes_racing_score_traffic(server: Any, refs: dict):
    """Scoring threads run throughout three pushes; every answer's numbers are those of the
    version it names (per-version references from fresh Scorers)."""
    s = server
    versions = {"0": 0, "r1": 1, "r2": 2, "r3": 3}
    stop = threading.Event()
    seen: list[tuple[str, pb.ScoreResponse]] = []
    errors: list[BaseException] = []

    def score_loop() -> None:
        try:
            while not stop.is_set():
                resp = _score(s)
                seen.append((resp.policy_version, resp))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=score_loop) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        _wait_until(lambda: len(seen) >= 3 or bool(errors))  # answers from version "0"
        previous = "0"
        for version in ("r1", "r2", "r3"):
            state = _state(versions[version])
            reply = s.stub.PushWeights(chunks(version, state, replaces=previous), timeout=TIMEOUT)
            assert reply.policy_version == version
            previous = version
            answered = len(seen)
            _wait_until(lambda n=answered: len(seen) >= n + 3 or bool(errors))
    finally:
        stop.set()
        for t in threads:
            t.join(TIMEOUT)
    assert not errors, errors
    assert {v for v, _ in seen} >= {"0", "r3"} and len(seen) >= 8
    for version, resp in seen:
        # Requests of several threads may share a packed forward: float rounding differs
        # slightly from a lone forward, weights of another version would differ entirely.
        _assert_equal(resp, refs[versions[version]], exact=False)


# ------------------------------------------------------------------------------ collective

TRAINER = r"""
import json, sys
import grpc
from anchorcredit import weight_group
from debug_model import build_debug_model
from anchorcredit.v1 import credit_pb2 as pb, credit_pb2_grpc

target, out = sys.argv[1], sys.argv[2]
stub = credit_pb2_grpc.CreditServiceStub(grpc.insecure_channel(target))
state = build_debug_model("llama", seed=1).state_dict()
store = weight_group.host_store("127.0.0.1", 0, 2, timeout_s=60)
join = stub.JoinWeightGroup.future(pb.JoinWeightGroupRequest(
    group="g", address="127.0.0.1", port=store.port, world_size=2, rank=1, backend="gloo",
    timeout_s=60), timeout=120)
group = weight_group.open_group(store, 0, 2, "gloo", "cpu", timeout_s=60)
joined = join.result()
report = {"backend": joined.backend, "device": joined.device}
headers = [pb.TensorHeader(name=k, dtype="float32", shape=list(v.shape)) for k, v in state.items()]
bad = headers[:-1] + [pb.TensorHeader(name=headers[-1].name, dtype="float32", shape=[1])]
try:  # refused before any broadcast: the trainer must then not broadcast
    stub.ReceiveWeights(pb.ReceiveWeightsRequest(
        group="g", update=pb.WeightUpdate(version="c1"), tensors=bad), timeout=60)
except grpc.RpcError as e:
    report["bad"] = [e.code().name, e.details()]
recv = stub.ReceiveWeights.future(pb.ReceiveWeightsRequest(
    group="g", update=pb.WeightUpdate(version="c1", replaces="0"), tensors=headers), timeout=120)
for t in state.values():
    group.broadcast(t.contiguous())
reply = recv.result()
report["reply"] = [reply.policy_version, reply.tensors, reply.bytes]
stub.LeaveWeightGroup(pb.LeaveWeightGroupRequest(group="g"), timeout=30)
group.close()
with open(out, "w") as f:
    json.dump(report, f)
"""


def _with_test_support(pythonpath: str | None) -> str:
    """PYTHONPATH for a child that imports debug_model (tests/support, pytest's pythonpath)."""
    import debug_model

    support = str(Path(debug_model.__file__).parent)
    return os.pathsep.join([support, *([pythonpath] if pythonpath else [])])


@pytest.mark.slow
def test_collective_gloo_between_two_processes(server: Any, refs: dict, tmp_path: Any):
    s = server
    out = tmp_path / "trainer.json"
    proc = subprocess.run(
        [sys.executable, "-c", TRAINER, s.target, str(out)],
        env={**os.environ, "PYTHONPATH": _with_test_support(os.environ.get("PYTHONPATH"))},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["backend"] == "gloo" and report["device"] == "cpu"
    code, details = report["bad"]
    assert code == "INVALID_ARGUMENT" and "shape (1,)" in details
    state = _state(1)
    assert report["reply"] == ["c1", len(state), sum(t.numel() * 4 for t in state.values())]
    resp = _score(s)
    assert resp.policy_version == "c1"
    _assert_equal(resp, refs[1])
    assert (
        s.sample("anchorcredit_weight_updates_by_transport_total", {"transport": "collective"}) == 1
    )
    assert not s.server.servicer.weights.groups  # left


class ThreadTrainer:
    """Rank 0 in a thread of this process (gloo): host the store, open the group."""

    def __init__(self, s: Any, group: str = "t", timeout_s: float = 30) -> None:
        self.store = weight_group.host_store("127.0.0.1", 0, 2, timeout_s=timeout_s)
        req = pb.JoinWeightGroupRequest(
            group=group, address="127.0.0.1", port=self.store.port, world_size=2, rank=1,
            timeout_s=timeout_s,
        )  # fmt: skip
        join = s.stub.JoinWeightGroup.future(req, timeout=TIMEOUT)
        self.group = weight_group.open_group(self.store, 0, 2, "gloo", "cpu", timeout_s)
        self.joined = join.result()


def test_collective_errors_and_a_broadcast_cut_short(server: Any, refs: dict):
    s = server
    state = _state(1)
    headers = [
        pb.TensorHeader(name=k, dtype="float32", shape=list(v.shape)) for k, v in state.items()
    ]
    unknown = pb.ReceiveWeightsRequest(
        group="nope", update=pb.WeightUpdate(version="x"), tensors=headers
    )
    assert "'nope'" in _fails(grpc.StatusCode.NOT_FOUND, s.stub.ReceiveWeights, unknown)
    _fails(
        grpc.StatusCode.NOT_FOUND, s.stub.LeaveWeightGroup, pb.LeaveWeightGroupRequest(group="nope")
    )
    bad_rank = pb.JoinWeightGroupRequest(
        group="b", address="127.0.0.1", port=1, world_size=2, rank=0
    )
    assert "rank" in _fails(grpc.StatusCode.INVALID_ARGUMENT, s.stub.JoinWeightGroup, bad_rank)
    nccl = pb.JoinWeightGroupRequest(
        group="b", address="127.0.0.1", port=1, world_size=2, rank=1, backend="nccl"
    )
    assert "nccl" in _fails(grpc.StatusCode.INVALID_ARGUMENT, s.stub.JoinWeightGroup, nccl)

    trainer = ThreadTrainer(s, timeout_s=4)
    assert trainer.joined.backend == "gloo"
    again = pb.JoinWeightGroupRequest(
        group="t", address="127.0.0.1", port=trainer.store.port, world_size=2, rank=1
    )
    _fails(grpc.StatusCode.ALREADY_EXISTS, s.stub.JoinWeightGroup, again)
    # version rules before any broadcast
    stale = pb.ReceiveWeightsRequest(
        group="t", update=pb.WeightUpdate(version="c1", replaces="old"), tensors=headers
    )
    _fails(grpc.StatusCode.FAILED_PRECONDITION, s.stub.ReceiveWeights, stale)
    # The trainer stops after three tensors: the server's wait times out -> ABORTED naming
    # the fourth; the group is closed; the old weights keep serving.
    call = s.stub.ReceiveWeights.future(
        pb.ReceiveWeightsRequest(group="t", update=pb.WeightUpdate(version="c1"), tensors=headers),
        timeout=TIMEOUT,
    )
    for t in list(state.values())[:3]:
        trainer.group.broadcast(t.contiguous())
    with pytest.raises(grpc.RpcError) as info:
        call.result()
    assert info.value.code() == grpc.StatusCode.ABORTED
    assert f"{headers[3].name!r}" in info.value.details()
    assert "t" not in s.server.servicer.weights.groups
    trainer.group.close()
    _unchanged(s, refs)

    # A fresh group in this process: the whole broadcast lands.
    trainer = ThreadTrainer(s, group="t2")
    call = s.stub.ReceiveWeights.future(
        pb.ReceiveWeightsRequest(group="t2", update=pb.WeightUpdate(version="c2"), tensors=headers),
        timeout=TIMEOUT,
    )
    for t in state.values():
        trainer.group.broadcast(t.contiguous())
    reply = call.result()
    assert reply.policy_version == "c2" and reply.tensors == len(state)
    _assert_equal(_score(s), refs[1])
    s.stub.LeaveWeightGroup(pb.LeaveWeightGroupRequest(group="t2"), timeout=TIMEOUT)
    trainer.group.close()


def test_weight_rpcs_need_the_token_and_are_timed(start_server: Any, model_dir: str):
    s = start_server(None, Scorer.from_pretrained(model_dir), auth_token="sesame")
    try:
        _fails(grpc.StatusCode.UNAUTHENTICATED, s.stub.PushWeights, chunks("v1", _state(1)))
        auth = (("authorization", "Bearer sesame"),)
        reply = s.stub.PushWeights(chunks("v1", _state(1)), timeout=TIMEOUT, metadata=auth)
        assert reply.policy_version == "v1"
        labels = {"method": "PushWeights", "code": "OK"}
        assert s.sample("anchorcredit_request_duration_seconds_count", labels) == 1
        labels["code"] = "UNAUTHENTICATED"
        assert s.sample("anchorcredit_request_duration_seconds_count", labels) == 1
    finally:
        s.stop()
