"""The control plane against a real server on loopback (the debug model): one status table, bounded
messages, version labels that name one set of weights for good, garbage on every method,
path refusals counted as permission_denied, a device OOM no split fixes answered once.
(The hung collective, SIGTERM and restarts run real processes: test_control_process.py.)"""

from __future__ import annotations

import logging
import math
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from debug_model import build_debug_model

from anchorcredit import status
from anchorcredit.client import CreditClient, CreditServiceError
from anchorcredit.client.cache import LRUBytesCache
from anchorcredit.runner import Scorer
from anchorcredit.server.weights import MAX_GROUP_SIZE, MAX_GROUP_TIMEOUT_S
from anchorcredit.v1 import credit_pb2 as pb

ADMIN = "control-plane-admin"
METHOD = "/anchorcredit.v1.CreditService/"
PROMPTS = [[1, 2, 3, 4], [5, 6, 7]]
RESPONSES = [list(range(10, 30)), list(range(40, 52))]


@pytest.fixture(scope="module")
def model_dir(llama_model: Path) -> str:
    return str(llama_model)


@pytest.fixture
def admin_server(start_server: Any, model_dir: str, tmp_path: Path) -> Iterator[Any]:
    weights = tmp_path / "weights"
    weights.mkdir()
    srv = start_server(
        model_dir,
        admin_token=ADMIN,
        allow_unauthenticated_weights=False,
        weights_dir=str(weights),
    )
    yield srv
    srv.stop()


def _admin(srv: Any, **kw: Any) -> CreditClient:
    return CreditClient([srv.target], admin_token=ADMIN, **kw)


def _state(seed: int) -> dict[str, torch.Tensor]:
    return build_debug_model("llama", seed=seed).state_dict()


def _code(call: Any, *args: Any, **kw: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call(*args, **kw)
    return e.value.code(), e.value.details() or ""


# ------------------------------------------------------------------ the status table


def test_the_reliability_page_prints_the_status_table():
    page = (Path(__file__).resolve().parents[2] / "docs" / "RELIABILITY.md").read_text()
    assert status.markdown_table() in page


def test_every_error_class_has_one_row_and_the_hint_travels_as_metadata():
    from anchorcredit import errors

    assert status.status_of(errors.DeviceOutOfMemory("x")).retryable is False
    busy = status.status_of(errors.QueueFull(3, 0.25))
    assert busy.code == grpc.StatusCode.RESOURCE_EXHAUSTED and busy.retryable
    sent = dict(status.trailers(busy, errors.QueueFull(3, 0.25)))
    assert sent[status.RETRY_AFTER_KEY] == "250" and sent[status.RETRYABLE_KEY] == "1"
    assert status.retry_hint_s(tuple(sent.items())) == pytest.approx(0.25)
    # the verdict wins over the code; no trailer: the code's default
    assert not status.retryable(grpc.StatusCode.RESOURCE_EXHAUSTED, [(status.RETRYABLE_KEY, "0")])
    assert status.retryable(grpc.StatusCode.UNAVAILABLE, [])
    assert status.status_of(KeyError("x")) is status.INTERNAL
    assert status.status_of(errors.PathRefused("x")).reason == "permission_denied"


# ------------------------------------------------------------ caller text is bounded


@pytest.mark.parametrize("field", ["strategy", "expected_policy_version"])
def test_a_huge_caller_string_gets_its_own_status_not_resource_exhausted(
    admin_server: Any, field: str
):
    big = "x" * 20_000
    req = pb.ScoreRequest(
        sequences=[pb.Sequence(prompt_ids=PROMPTS[0], response_ids=RESPONSES[0])], **{field: big}
    )
    code, details = _code(admin_server.stub.Score, req, timeout=60)
    want = "INVALID_ARGUMENT" if field == "strategy" else "FAILED_PRECONDITION"
    assert code.name == want  # it was RESOURCE_EXHAUSTED "Stream removed" (metadata too big)
    assert "20000 characters" in details and len(details.encode()) <= status.MESSAGE_MAX_BYTES
    assert status.message("y" * 100_000).encode().__len__() <= status.MESSAGE_MAX_BYTES


# ------------------------------------------------------------ version labels


def test_a_label_names_one_set_of_weights_for_good(admin_server: Any):
    """A -> B -> A with other weights is refused; the same weights may come back under A."""
    t1, t2 = _state(1), _state(2)
    with _admin(admin_server, cache=False) as c:
        c.push_weights(t1, "A")
        a1 = c.model_info(refresh=True).weights_digest
        c.push_weights(t2, "B")
        b = c.model_info(refresh=True).weights_digest
        assert a1 and b and a1 != b
        with pytest.raises(CreditServiceError) as e:
            c.push_weights(t2, "A")  # accepted before: A then named T2 while caches held T1
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "named other weights" in str(e.value)
        assert c.model_info(refresh=True).policy_version == "B"  # nothing changed
        c.push_weights(t1, "A")  # the very weights A named: fine
        assert c.model_info(refresh=True).weights_digest == a1
    assert (
        admin_server.sample("anchorcredit_request_failures_total", {"reason": "weight_version"})
        == 1
    )


def test_no_cache_returns_numbers_of_other_weights_under_a_reused_label(
    start_server: Any, model_dir: str
):
    """Two servers (one restarted, or another deployment) give label "A" to different
    weights; one cache shared by their clients (as Redis would be) must never serve one's
    numbers for the other."""
    shared = LRUBytesCache()
    first, second = start_server(model_dir), start_server(model_dir)
    try:
        with CreditClient([first.target], cache=shared) as c1:
            c1.push_weights(_state(1), "A")
            r1 = c1.score(PROMPTS, RESPONSES, policy_version="A")
        with CreditClient([second.target], cache=shared) as c2:
            c2.push_weights(_state(2), "A")
            r2 = c2.score(PROMPTS, RESPONSES, policy_version="A")
            assert c2.last_stats == {"hits": 0, "misses": 2}
            fresh = c2.score(PROMPTS, RESPONSES, policy_version="A")
            assert c2.last_stats["hits"] == 2  # its own answers are cached
        assert not np.allclose(r1[0].waad, r2[0].waad)
        np.testing.assert_array_equal(fresh[0].waad, r2[0].waad)
    finally:
        first.stop()
        second.stop()


def test_the_digest_follows_the_weights_not_the_path(start_server: Any, model_dir: str):
    """Same weights -> same digest on two servers; a partial push that changes one tensor
    and a second one that puts it back return to the first digest."""
    a, b = start_server(model_dir), start_server(model_dir)
    try:
        with (
            CreditClient([a.target], cache=False) as ca,
            CreditClient([b.target], cache=False) as cb,
        ):
            d0 = ca.model_info().weights_digest
            assert d0 == cb.model_info().weights_digest
            name, value = next((k, v) for k, v in _state(0).items() if v.ndim == 2)
            ca.push_weights({name: value + 1.0}, "v1", partial=True)
            assert ca.model_info(refresh=True).weights_digest != d0
            ca.push_weights({name: value}, "v2", partial=True)
            assert ca.model_info(refresh=True).weights_digest == d0
            resp = a.stub.Score(
                pb.ScoreRequest(sequences=[pb.Sequence(prompt_ids=[1, 2], response_ids=[3, 4])]),
                timeout=60,
            )
            assert resp.weights_digest == d0 and resp.policy_version == "v2"
    finally:
        a.stop()
        b.stop()


# ------------------------------------------------------------ garbage, paths, joins


def test_garbage_on_every_method_is_invalid_argument_without_a_traceback(
    admin_server: Any, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO)
    meta = (("authorization", f"Bearer {ADMIN}"),)
    garbage = b"\xff\xff\xff\xff garbage"
    ch = admin_server.channel
    unary = ["Score", "GetModelInfo", "UpdateWeights", "JoinWeightGroup", "ReceiveWeights"]
    unary.append("LeaveWeightGroup")
    for name in unary:
        call = ch.unary_unary(METHOD + name, request_serializer=None)
        assert (
            _code(call, garbage, timeout=30, metadata=meta)[0] == grpc.StatusCode.INVALID_ARGUMENT
        )
    push = ch.stream_unary(METHOD + "PushWeights", request_serializer=None)
    code, details = _code(push, iter([garbage]), timeout=30, metadata=meta)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "frame 0" in details  # was INTERNAL
    stream = ch.stream_stream(METHOD + "ScoreStream", request_serializer=None)
    with pytest.raises(grpc.RpcError) as e:
        list(stream(iter([garbage]), timeout=30, metadata=meta))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Traceback" not in caplog.text and "internal error" not in caplog.text
    assert admin_server.sample("anchorcredit_request_failures_total", {"reason": "internal"}) == 0


def test_a_path_outside_the_weights_dir_counts_as_permission_denied(
    admin_server: Any, model_dir: str
):
    with _admin(admin_server, cache=False) as c, pytest.raises(CreditServiceError) as e:
        c.update_weights(model_dir, "outside")
    assert e.value.code == grpc.StatusCode.PERMISSION_DENIED
    denied = {"reason": "permission_denied"}
    assert admin_server.sample("anchorcredit_request_failures_total", denied) == 1
    group = {"reason": "weight_group"}
    assert admin_server.sample("anchorcredit_request_failures_total", group) == 0


@pytest.mark.parametrize(
    "field, value",
    [
        ("timeout_s", math.nan),
        ("timeout_s", math.inf),
        ("timeout_s", 1e300),
        ("timeout_s", -1.0),
        ("timeout_s", MAX_GROUP_TIMEOUT_S + 1),
        ("world_size", 2**31),
        ("world_size", MAX_GROUP_SIZE + 1),
    ],
)
def test_join_arguments_out_of_range_are_invalid_argument(
    admin_server: Any, field: str, value: float
):
    with socket.socket() as silent:  # would hang the join if it were ever reached
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        req = dict(group="g", address="127.0.0.1", port=silent.getsockname()[1], world_size=2)
        req.update(rank=1, backend="gloo", timeout_s=2.0)
        req[field] = value
        t0 = time.monotonic()
        code, details = _code(
            admin_server.stub.JoinWeightGroup,
            pb.JoinWeightGroupRequest(**req),
            timeout=60,
            metadata=(("authorization", f"Bearer {ADMIN}"),),
        )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and field in details
    assert time.monotonic() - t0 < 30


# ------------------------------------------------------------ OOM that no split fixes


class _OneTooBig(Scorer):
    """Runs out of memory on any forward holding a sequence of more than 40 tokens."""

    def score_batch(self, pairs: Any, params: Any, *, with_entropy: bool = False) -> Any:
        if any(p.num_tokens > 40 for p in pairs):
            raise type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory (test)")
        return super().score_batch(pairs, params, with_entropy=with_entropy)


def test_an_oom_no_split_fixes_is_answered_once_not_retried(start_server: Any, model_dir: str):
    scorer = _OneTooBig.from_pretrained(model_dir, device="cpu", dtype="float32")
    srv = start_server(backend=scorer)
    try:
        with CreditClient([srv.target], cache=False) as c:
            t0 = time.monotonic()
            with pytest.raises(CreditServiceError) as e:
                c.score([[1, 2, 3]], [list(range(10, 60))])
            assert time.monotonic() - t0 < 60  # it was retried for retry_budget_s (120 s)
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and not e.value.retryable
        assert srv.sample("anchorcredit_request_failures_total", {"reason": "oom"}) == 1
    finally:
        srv.stop()
