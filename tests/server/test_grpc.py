"""The real grpc.aio server on 127.0.0.1:0 with the real runner and a tiny debug model.

The server runs on its own event loop in a background thread; tests are plain sync gRPC
clients (grpcio-testing does not support grpc.aio). `GatedScorer` wraps the real Scorer with
a gate so a batch can be held on the device: that makes queueing, batching, queue-full and
deadline behaviour deterministic without sleeps in the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from debug_model import save_debug_model
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anchorcredit.errors import InputError
from anchorcredit.runner import Scorer
from anchorcredit.server.config import SERVICE_NAME, ServeConfig
from anchorcredit.server.convert import from_f32_bytes
from anchorcredit.v1 import credit_pb2 as pb
from anchorcredit.v1 import credit_pb2_grpc

VOCAB = 256
TIMEOUT = 30.0


class GatedScorer:
    """The real Scorer, with a gate score_batch() waits on (set = open) and a call log."""

    def __init__(self, scorer: Scorer) -> None:
        self._scorer = scorer
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.calls: list[int] = []

    def score_batch(self, pairs: Any, params: Any, **kw: Any) -> Any:
        self.entered.set()
        assert self.gate.wait(TIMEOUT)
        self.calls.append(len(pairs))
        return self._scorer.score_batch(pairs, params, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._scorer, name)


def _config(**kw: Any) -> dict[str, Any]:
    """ServeConfig fields of these tests (on top of conftest's loopback CPU defaults)."""
    base = dict(
        host="127.0.0.1",
        port=0,
        metrics_host="127.0.0.1",
        metrics_port=0,
        max_wait_ms=5.0,
        grace_s=2.0,
    )
    return {**base, **kw}


@pytest.fixture(scope="module")
def serving(start_server: Any) -> Any:
    """serving(config, backend): a context manager around conftest's start_server."""

    @contextlib.contextmanager
    def serve(config: dict[str, Any], backend: Any, **kw: Any) -> Iterator[Any]:
        s = start_server(None, backend, **kw, **config)
        try:
            yield s
        finally:
            s.stop(grace=1.0)

    return serve


@pytest.fixture(scope="module")
def model_dir(llama_model: Path) -> str:
    return str(llama_model)


@pytest.fixture(scope="module")
def scorer(model_dir: str) -> GatedScorer:
    return GatedScorer(Scorer.from_pretrained(model_dir, device="cpu", dtype="float32"))


@pytest.fixture(scope="module")
def srv(scorer: GatedScorer, serving: Any) -> Iterator[Any]:
    with serving(_config(max_queue=4), scorer) as s:
        yield s


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


def _assert_matches(resp: pb.ScoreResponse, expected: list, exact: bool = True) -> None:
    assert len(resp.results) == len(expected)
    for got, want in zip(resp.results, expected, strict=True):
        assert got.response_len == len(want.gamma)
        for name in ("waad", "fai", "gamma"):
            a, b = from_f32_bytes(getattr(got, name)), getattr(want, name)
            if exact:
                np.testing.assert_array_equal(a, b)
            else:
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        assert [(h.layer, h.head) for h in got.local_heads] == list(want.local_heads)
        assert [(h.layer, h.head) for h in got.global_heads] == list(want.global_heads)


# ------------------------------------------------------------------------------ basics


def test_score_equals_runner(srv: Any, scorer: GatedScorer):
    pairs = _pairs(3, seed=1)
    params = pb.CreditParams(q=0.3, k=2, h_lo=2, h_hi=12)
    resp = srv.stub.Score(
        _request(
            pairs,
            params=params,
            request_id="r1",
            outputs=pb.Outputs(waad=True, fai=True, gamma=True, entropy=True),
        ),
        timeout=TIMEOUT,
    )
    want = scorer.score(pairs, q=0.3, k=2, h_lo=2, h_hi=12, with_entropy=True)
    _assert_matches(resp, want)
    np.testing.assert_array_equal(from_f32_bytes(resp.results[0].entropy), want[0].entropy)
    assert resp.request_id == "r1" and resp.policy_version == "0"
    assert resp.stat_version and resp.compute_seconds > 0 and resp.queue_seconds >= 0


def test_outputs_selects_arrays(srv: Any):
    resp = srv.stub.Score(
        _request(_pairs(1, 2), strategy="random", outputs=pb.Outputs(gamma=True)), timeout=TIMEOUT
    )
    r = resp.results[0]
    assert r.waad == b"" and r.fai == b"" and len(r.gamma) == 4 * r.response_len


def test_score_stream_in_order_equals_runner(srv: Any, scorer: GatedScorer):
    batches = [_pairs(2, seed=10 + i, response=8 + 4 * i) for i in range(5)]
    requests = [
        _request(p, strategy="global_anchor", request_id=f"s{i}") for i, p in enumerate(batches)
    ]
    responses = list(srv.stub.ScoreStream(iter(requests), timeout=TIMEOUT))
    assert [r.request_id for r in responses] == [f"s{i}" for i in range(5)]
    for resp, pairs in zip(responses, batches, strict=True):
        # Stream requests may be merged with each other: packing changes float rounding.
        _assert_matches(resp, scorer.score(pairs, strategy="global_anchor"), exact=False)


def test_stream_stops_at_a_bad_request(srv: Any):
    good = _request(_pairs(1, 3), request_id="ok")
    bad = _request([([1], [VOCAB + 5])], request_id="bad")
    it = srv.stub.ScoreStream(iter([good, bad, good]), timeout=TIMEOUT)
    first = next(it)
    assert first.request_id == "ok"
    with pytest.raises(grpc.RpcError) as info:
        list(it)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request_id='bad'" in info.value.details()
    assert "sequences[0].response_ids" in info.value.details()


def test_model_info(srv: Any, scorer: GatedScorer):
    info = srv.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=TIMEOUT)
    want = scorer.info()
    assert info.num_layers == want.num_layers and tuple(info.layers) == want.layers
    assert info.vocab_size == VOCAB and info.max_positions == want.max_positions
    assert info.max_batch_tokens == srv.server.config.max_batch_tokens  # the batcher's budget
    assert info.policy_version == "0" and info.stat_version == want.stat_version
    assert info.max_request_sequences == srv.server.config.max_request_sequences
    assert info.server_version and info.stat_version and info.kernel_backend == "chunked"


def test_health_and_probe(srv: Any):
    from anchorcredit.server import probe

    for service in ("", SERVICE_NAME):
        reply = srv.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert probe.main(["--port", str(srv.server.port)]) == 0
    assert probe.main(["--port", str(srv.server.port), "--service", "nope"]) == 1


def test_reflection_lists_services(srv: Any):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(srv.channel)
    replies = list(
        stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
    )
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"anchorcredit.v1.CreditService", "grpc.health.v1.Health"} <= names


# ------------------------------------------------------------------------------ batching


def test_concurrent_clients_are_batched(srv: Any, scorer: GatedScorer):
    before = srv.sample("anchorcredit_batch_size_sum"), srv.sample("anchorcredit_batch_size_count")
    groups = [_pairs(2, seed=100 + i) for i in range(4)]
    scorer.gate.clear()
    scorer.entered.clear()
    try:
        futures = [srv.stub.Score.future(_request(groups[0]), timeout=TIMEOUT)]
        assert scorer.entered.wait(10)  # the first batch holds the device
        futures += [srv.stub.Score.future(_request(g), timeout=TIMEOUT) for g in groups[1:]]
        deadline = time.monotonic() + 10
        while srv.sample("anchorcredit_queue_size") < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        scorer.gate.set()
    responses = [f.result() for f in futures]
    for resp, pairs in zip(responses, groups, strict=True):
        _assert_matches(resp, scorer.score(pairs), exact=False)
    size_sum = srv.sample("anchorcredit_batch_size_sum") - before[0]
    batches = srv.sample("anchorcredit_batch_size_count") - before[1]
    assert size_sum == 4 and batches == 2  # 1 alone, then the 3 queued ones together
    assert max(r.queue_seconds for r in responses[1:]) > 0


def test_queue_full_is_resource_exhausted_with_hint(srv: Any, scorer: GatedScorer):
    scorer.gate.clear()
    scorer.entered.clear()
    futures = []
    try:
        futures.append(srv.stub.Score.future(_request(_pairs(1, 5)), timeout=TIMEOUT))
        assert scorer.entered.wait(10)
        futures += [
            srv.stub.Score.future(_request(_pairs(1, 6)), timeout=TIMEOUT) for _ in range(4)
        ]  # max_queue=4
        deadline = time.monotonic() + 10
        while srv.sample("anchorcredit_queue_size") < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(grpc.RpcError) as info:
            srv.stub.Score(_request(_pairs(1, 7)), timeout=TIMEOUT)
    finally:
        scorer.gate.set()
    err = info.value
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry after" in err.details()
    trailers = dict(err.trailing_metadata())
    assert int(trailers["retry-after-ms"]) > 0
    assert all(f.result().results for f in futures)  # everyone queued still gets served
    assert srv.sample("anchorcredit_request_failures_total", {"reason": "queue_full"}) >= 1


def test_deadline_expiry_drops_request(srv: Any, scorer: GatedScorer):
    dropped = sum(
        srv.sample("anchorcredit_queue_dropped_total", {"reason": r})
        for r in ("cancelled", "deadline")
    )
    by_deadline = srv.sample("anchorcredit_queue_dropped_total", {"reason": "deadline"})
    scorer.gate.clear()
    scorer.entered.clear()
    try:
        holder = srv.stub.Score.future(_request(_pairs(1, 8)), timeout=TIMEOUT)
        assert scorer.entered.wait(10)
        with pytest.raises(grpc.RpcError) as info:
            srv.stub.Score(_request(_pairs(1, 9)), timeout=0.3)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        calls = len(scorer.calls)
    finally:
        scorer.gate.set()
    holder.result()
    srv.stub.Score(_request(_pairs(1, 10)), timeout=TIMEOUT)  # the loop moves on
    after = sum(
        srv.sample("anchorcredit_queue_dropped_total", {"reason": r})
        for r in ("cancelled", "deadline")
    )
    assert after == dropped + 1
    # counted as a deadline drop even though the handler cancelled the future at the deadline
    assert srv.sample("anchorcredit_queue_dropped_total", {"reason": "deadline"}) == by_deadline + 1
    assert len(scorer.calls) == calls + 2  # holder + the last one; the expired never ran


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "request_, needle",
    [
        (_request([([1, 2], [3])], strategy="bogus"), "strategy"),
        (_request([([1, 2], [3])], params=pb.CreditParams(q=2.0)), "params.q"),
        (_request([([1, 2], [3])], params=pb.CreditParams(k=0)), "params.k"),
        (_request([([1, 2], [3]), ([1], [VOCAB])]), "sequences[1].response_ids"),
        (_request([([1], [2]), ([], [2])]), "sequences[1].prompt_ids"),
        (_request([([1] * 600, [2] * 600)]), "sequences[0]"),  # over max_positions=1024
        (_request([([1], [2])], params=pb.CreditParams(window=2**32 - 1)), "params.window"),
        (_request([([1], [2])], params=pb.CreditParams(h_lo=1025)), "params.h_lo"),
        (_request([([1], [2])], params=pb.CreditParams(h_hi=2**32 - 1)), "params.h_hi"),
        (_request([([1], [2])], params=pb.CreditParams(gamma_amp=1e308)), "params.gamma_amp"),
        (pb.ScoreRequest(), "sequences"),
    ],
)
def test_invalid_argument_names_field(srv: Any, request_: pb.ScoreRequest, needle: str):
    with pytest.raises(grpc.RpcError) as info:
        srv.stub.Score(request_, timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in info.value.details() and "Traceback" not in info.value.details()


_ids = st.lists(st.integers(0, 2**32 - 1) | st.integers(0, VOCAB - 1), max_size=6)
_floats = st.floats(allow_nan=True, allow_infinity=True) | st.floats(-0.5, 1.5)


@st.composite
def _any_request(draw: Any) -> pb.ScoreRequest:
    params = pb.CreditParams()
    for name, value in (
        ("q", _floats),
        ("gamma_amp", _floats),
        ("alpha", _floats),
        ("tau_waad", _floats),
        ("head_quantile", _floats),
        ("k", st.integers(0, 5)),
        ("window", st.integers(0, 12)),
        ("h_lo", st.integers(0, 12)),
        ("h_hi", st.integers(0, 12)),
    ):
        if draw(st.booleans()):
            setattr(params, name, draw(value))
    params.h_hi_to_end = draw(st.booleans())
    seqs = draw(st.lists(st.tuples(_ids, _ids), max_size=3))
    strategy = draw(
        st.sampled_from(
            ["", "uniform", "coupled_rhythm", "entropy", "random", "Coupled_Rhythm", "x" * 3]
        )
    )
    return _request(
        seqs,
        strategy=strategy,
        params=params,
        expected_policy_version=draw(st.sampled_from(["", "0"])),
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request_=_any_request())
def test_fuzz_requests_get_ok_or_invalid_argument(srv: Any, request_: pb.ScoreRequest):
    try:
        resp = srv.stub.Score(request_, timeout=TIMEOUT)
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert "Traceback" not in err.details()
    else:
        assert len(resp.results) == len(request_.sequences)
        for r in resp.results:
            assert np.all(np.isfinite(from_f32_bytes(r.gamma)))


def test_server_still_serves_after_fuzz(srv: Any):
    resp = srv.stub.Score(_request(_pairs(1, 11)), timeout=TIMEOUT)
    assert len(resp.results) == 1
    assert srv.sample("anchorcredit_request_failures_total", {"reason": "internal"}) == 0


def test_metrics_endpoint_exposes_histograms(srv: Any):
    # One good and one bad request of its own, so the test stands alone.
    srv.stub.Score(_request(_pairs(1, 13)), timeout=TIMEOUT)
    with pytest.raises(grpc.RpcError):
        srv.stub.Score(_request([([1], [])]), timeout=TIMEOUT)
    url = f"http://127.0.0.1:{srv.server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    for name in (
        "anchorcredit_request_duration_seconds_bucket",
        "anchorcredit_queue_duration_seconds_bucket",
        "anchorcredit_inference_duration_seconds_bucket",
        "anchorcredit_batch_size_bucket",
        "anchorcredit_batch_tokens_bucket",
        "anchorcredit_tokens_total",
        "anchorcredit_queue_size",
        "anchorcredit_inflight_requests",
        "anchorcredit_model_info",
        "anchorcredit_device_memory_bytes",
        "anchorcredit_stage_duration_seconds_bucket",
    ):
        assert name in text, name
    assert 'code="OK",method="Score"' in text and 'code="INVALID_ARGUMENT"' in text
    for stage in ("runner", "forward", "statistics", "credit"):  # the span kernel's own time
        assert f'anchorcredit_stage_duration_seconds_count{{stage="{stage}"}}' in text, stage
    # Every observed RPC left the in-flight gauge, failed ones included.
    assert srv.registry_value("anchorcredit_inflight_requests") == 0
    assert 'policy_version="0"' in text
    for line in text.splitlines():
        if not line.startswith("#") and line.strip():
            assert ":" not in line.split("{")[0].split(" ")[0]  # no colons in names


# ------------------------------------------------------------------------------ lifecycle


def test_unavailable_while_loading(model_dir: str, start_server: Any):
    release = threading.Event()

    def slow_factory() -> Scorer:
        assert release.wait(TIMEOUT)
        return Scorer.from_pretrained(model_dir)

    s = start_server(None, load=False, backend_factory=slow_factory, **_config(metrics_port=-1))
    try:
        loading = asyncio.run_coroutine_threadsafe(s.server.load(), s.loop)
        reply = s.health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as info:
            s.stub.Score(_request(_pairs(1, 1)), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        release.set()
        loading.result(TIMEOUT)
        reply = s.health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        release.set()
        s.stop(grace=1.0)


def test_update_weights_then_version_mismatch(
    other_llama_model: Path, model_dir: str, tmp_path: Any, serving: Any
):
    other = other_llama_model
    scorer = Scorer.from_pretrained(model_dir)
    pairs = _pairs(2, 12)
    with serving(_config(metrics_port=-1), scorer) as s:
        v0 = s.stub.Score(_request(pairs, expected_policy_version="0"), timeout=TIMEOUT)
        with pytest.raises(grpc.RpcError) as info:
            s.stub.UpdateWeights(
                pb.UpdateWeightsRequest(path=str(tmp_path / "missing"), version="v2"),
                timeout=TIMEOUT,
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "path" in info.value.details()
        # Garbage and truncated safetensors (SafetensorError, not an OSError): the caller's
        # input, no traceback, and the old weights keep serving.
        garbage = tmp_path / "garbage"
        garbage.mkdir()
        (garbage / "model.safetensors").write_bytes(b"\x07not a safetensors file" * 100)
        truncated = tmp_path / "truncated"
        truncated.mkdir()
        whole = (other / "model.safetensors").read_bytes()
        (truncated / "model.safetensors").write_bytes(whole[: len(whole) // 2])
        for bad in (garbage, truncated):
            with pytest.raises(grpc.RpcError) as info:
                s.stub.UpdateWeights(
                    pb.UpdateWeightsRequest(path=str(bad), version="v2"), timeout=TIMEOUT
                )
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "path" in info.value.details() and str(bad) in info.value.details()
            assert "Traceback" not in info.value.details()
        again = s.stub.Score(_request(pairs, expected_policy_version="0"), timeout=TIMEOUT)
        assert [r.waad for r in again.results] == [r.waad for r in v0.results]
        with pytest.raises(grpc.RpcError) as info:
            s.stub.UpdateWeights(pb.UpdateWeightsRequest(path=str(other)), timeout=TIMEOUT)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        reply = s.stub.UpdateWeights(
            pb.UpdateWeightsRequest(path=str(other), version="v2"), timeout=TIMEOUT
        )
        assert reply.policy_version == "v2" and reply.load_seconds >= 0
        with pytest.raises(grpc.RpcError) as info:
            s.stub.Score(_request(pairs, expected_policy_version="0"), timeout=TIMEOUT)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "'0'" in info.value.details() and "'v2'" in info.value.details()
        v2 = s.stub.Score(_request(pairs, expected_policy_version="v2"), timeout=TIMEOUT)
        assert v2.policy_version == "v2"
        assert s.stub.Score(_request(pairs), timeout=TIMEOUT).policy_version == "v2"
        assert s.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5).policy_version == "v2"
        # the model-info metric keeps its stat_version label across reloads
        labels = {"policy_version": "v2", "stat_version": s.server.state.info.stat_version}
        assert any(
            all(smp.labels.get(k) == v for k, v in labels.items())
            for mf in s.server.metrics.registry.collect()
            if mf.name == "anchorcredit_model"
            for smp in mf.samples
        )
        assert any(a.waad != b.waad for a, b in zip(v0.results, v2.results, strict=True))
        want = Scorer.from_pretrained(str(other)).score(pairs)
        _assert_matches(v2, want)


def test_bearer_token(model_dir: str, scorer: GatedScorer, serving: Any):
    with serving(_config(metrics_port=-1, auth_token="t0ken"), scorer) as s:
        req = _request(_pairs(1, 13))
        for metadata in (None, (("authorization", "Bearer wrong"),), (("authorization", "t0ken"),)):
            with pytest.raises(grpc.RpcError) as info:
                s.stub.Score(req, timeout=TIMEOUT, metadata=metadata)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = s.stub.Score(req, timeout=TIMEOUT, metadata=(("authorization", "Bearer t0ken"),))
        assert len(ok.results) == 1
        # Probes cannot send metadata: health stays open.
        reply = s.health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert s.sample("anchorcredit_request_failures_total", {"reason": "unauthenticated"}) == 3


def test_errors_from_the_runner_map_to_invalid_argument(
    model_dir: str, scorer: GatedScorer, serving: Any
):
    class Picky(GatedScorer):
        def score_batch(self, pairs: Any, params: Any, **kw: Any) -> Any:
            if params.seed == 7:
                raise InputError("runner says no", field="params.seed")
            if params.seed == 8:
                raise RuntimeError("boom")
            return super().score_batch(pairs, params, **kw)

    with serving(_config(metrics_port=-1), Picky(scorer._scorer)) as s:
        for seed, code, needle in (
            (7, grpc.StatusCode.INVALID_ARGUMENT, "runner says no"),
            (8, grpc.StatusCode.INTERNAL, "RuntimeError"),
        ):
            with pytest.raises(grpc.RpcError) as info:
                s.stub.Score(
                    _request(_pairs(1, 1), params=pb.CreditParams(seed=seed)), timeout=TIMEOUT
                )
            assert info.value.code() == code and needle in info.value.details()
            assert "boom" not in info.value.details() and "Traceback" not in info.value.details()
        assert len(s.stub.Score(_request(_pairs(1, 1)), timeout=TIMEOUT).results) == 1


def test_non_finite_results_are_never_sent(scorer: GatedScorer, serving: Any):
    class Broken(GatedScorer):
        def score_batch(self, pairs: Any, params: Any, **kw: Any) -> Any:
            out = super().score_batch(pairs, params, **kw)
            if params.seed == 5:
                out.results[0].gamma = np.full_like(out.results[0].gamma, np.nan)
            return out

    with serving(_config(metrics_port=-1), Broken(scorer._scorer)) as s:
        with pytest.raises(grpc.RpcError) as info:
            s.stub.Score(_request(_pairs(1, 1), params=pb.CreditParams(seed=5)), timeout=TIMEOUT)
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert "NonFiniteResult" in info.value.details()
        assert s.sample("anchorcredit_request_failures_total", {"reason": "non_finite"}) == 1
        assert len(s.stub.Score(_request(_pairs(1, 1)), timeout=TIMEOUT).results) == 1


def test_nan_free_defaults_roundtrip():
    # Guard for the fuzz strategy above: proto doubles keep NaN, so validation must see it.
    msg = pb.CreditParams(q=math.nan)
    assert math.isnan(pb.CreditParams.FromString(msg.SerializeToString()).q)


def test_tls(tmp_path: Any, scorer: GatedScorer, serving: Any):
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl not available to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    with serving(_config(metrics_port=-1, tls_cert=str(cert), tls_key=str(key)), scorer) as s:
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        options = (("grpc.ssl_target_name_override", "localhost"),)
        with grpc.secure_channel(f"127.0.0.1:{s.server.port}", creds, options) as channel:
            stub = credit_pb2_grpc.CreditServiceStub(channel)
            assert len(stub.Score(_request(_pairs(1, 14)), timeout=TIMEOUT).results) == 1
        with pytest.raises(grpc.RpcError):  # plaintext is refused
            s.stub.Score(_request(_pairs(1, 14)), timeout=5)


def test_large_head_lists_are_sent(tmp_path: Any, serving: Any):
    # Head lists scale with len(layers) x num_heads per sequence; the response must be sent
    # however large they get (it used to exceed a fixed per-sequence send budget).
    wide = save_debug_model(
        tmp_path / "wide",
        arch="llama",
        num_attention_heads=32,
        num_key_value_heads=2,
        hidden_size=64,
        head_dim=16,
    )
    scorer = Scorer.from_pretrained(str(wide), layers=[0, 1, 2, 3])
    n, budget = 256, 64
    cfg = _config(metrics_port=-1, max_request_sequences=n, max_batch_tokens=budget)
    old_cap = 16 * ServeConfig(**cfg).max_request_tokens + 512 * n + (1 << 16)
    with serving(cfg, scorer) as s:
        req = _request([([1], [2])] * n, params=pb.CreditParams(head_quantile=1.0))
        resp = s.stub.Score(req, timeout=TIMEOUT)
        assert len(resp.results) == n
        heads = len(resp.results[0].local_heads) + len(resp.results[0].global_heads)
        assert heads >= 4 * 32  # every head of the layers, in one list or both
        assert resp.ByteSize() > old_cap
