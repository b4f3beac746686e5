"""Security, each past failure reproduced against a real server on loopback.

1. anyone could replace the weights (no token by default, one token for both roles, any
   path, symlinks followed): two roles, PERMISSION_DENIED by default, --weights-dir;
2. a FIFO named model.safetensors froze the process: refused at once, and a load that does
   block leaves health and /metrics answering;
8. other weights under the served version label: FAILED_PRECONDITION;
9. garbage frames were parsed before the token check and logged a traceback each: denied
   calls never parse their payload, malformed frames are one line per interval; secrets
   can come from files (`*_FILE`), off the command line.
(3, client TLS, is tests/client/test_tls.py.)
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from debug_model import save_debug_model
from grpc_health.v1 import health_pb2

from anchorcredit.client import CreditClient, CreditServiceError
from anchorcredit.runner import Scorer
from anchorcredit.server import config as cfgmod
from anchorcredit.server.app import MalformedFrameLog
from anchorcredit.server.config import SERVICE_NAME
from anchorcredit.v1 import credit_pb2 as pb

TIMEOUT = 60
SCORE, ADMIN = "score-t0ken", "admin-t0ken"
AS_SCORER = (("authorization", f"Bearer {SCORE}"),)
AS_ADMIN = (("authorization", f"Bearer {ADMIN}"),)
WEIGHT_CALLS = {
    "UpdateWeights": lambda stub, **kw: stub.UpdateWeights(
        pb.UpdateWeightsRequest(path="x", version="v9"), **kw
    ),
    "PushWeights": lambda stub, **kw: stub.PushWeights(
        iter([pb.WeightChunk(update=pb.WeightUpdate(version="v9"))]), **kw
    ),
    "JoinWeightGroup": lambda stub, **kw: stub.JoinWeightGroup(
        pb.JoinWeightGroupRequest(group="g", address="127.0.0.1", port=1, world_size=2, rank=1),
        **kw,
    ),
    "ReceiveWeights": lambda stub, **kw: stub.ReceiveWeights(
        pb.ReceiveWeightsRequest(group="g"), **kw
    ),
    "LeaveWeightGroup": lambda stub, **kw: stub.LeaveWeightGroup(
        pb.LeaveWeightGroupRequest(group="g"), **kw
    ),
}


def _code(call: Any, *args: Any, **kw: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kw)
    return info.value.code()


def _details(code: grpc.StatusCode, call: Any, *args: Any, **kw: Any) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, timeout=TIMEOUT, **kw)
    assert info.value.code() == code, info.value.details()
    return info.value.details()


def _score_request() -> pb.ScoreRequest:
    return pb.ScoreRequest(sequences=[pb.Sequence(prompt_ids=[1, 2, 3], response_ids=[4, 5, 6])])


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sec")
    weights = root / "weights"
    weights.mkdir()
    return {
        "base": save_debug_model(root / "base", arch="llama", seed=0),
        "inside": save_debug_model(weights / "v1", arch="llama", seed=1),
        "outside": save_debug_model(root / "elsewhere", arch="llama", seed=2),
        "weights_dir": weights,
    }


# -- 1: who may change the weights ----------------------------------------------------------
def test_weight_changes_are_refused_by_default(start_server: Any, models: dict):
    # The default server: no tokens at all. Scoring is open, weight changes are not.
    s = start_server(
        None, Scorer.from_pretrained(models["base"]), allow_unauthenticated_weights=False
    )
    try:
        assert len(s.stub.Score(_score_request(), timeout=TIMEOUT).results) == 1
        for name, call in WEIGHT_CALLS.items():
            assert _code(call, s.stub, timeout=TIMEOUT) == grpc.StatusCode.PERMISSION_DENIED, name
        with pytest.raises(CreditServiceError) as info:
            with CreditClient(s.target, cache=False) as c:
                c.update_weights(str(models["inside"]), "v1")
        assert "--admin-token" in str(info.value)
        assert s.sample("anchorcredit_request_failures_total", {"reason": "permission_denied"}) >= 5
        assert s.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=TIMEOUT).policy_version == "0"
    finally:
        s.stop()


def test_two_roles_scoring_token_cannot_change_weights(start_server: Any, models: dict):
    s = start_server(
        None,
        Scorer.from_pretrained(models["base"]),
        auth_token=SCORE,
        admin_token=ADMIN,
        weights_dir=str(models["weights_dir"]),
        allow_unauthenticated_weights=False,
    )
    try:
        req = _score_request()
        assert _code(s.stub.Score, req, timeout=TIMEOUT) == grpc.StatusCode.UNAUTHENTICATED
        assert s.stub.Score(req, timeout=TIMEOUT, metadata=AS_SCORER).results
        assert s.stub.Score(req, timeout=TIMEOUT, metadata=AS_ADMIN).results  # admin may score
        info = pb.GetModelInfoRequest()
        assert _code(s.stub.GetModelInfo, info, timeout=TIMEOUT) == grpc.StatusCode.UNAUTHENTICATED
        # Health stays open (probes send no metadata).
        reply = s.health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        for name, call in WEIGHT_CALLS.items():
            no_token = _code(call, s.stub, timeout=TIMEOUT)
            scorer = _code(call, s.stub, timeout=TIMEOUT, metadata=AS_SCORER)
            assert no_token == grpc.StatusCode.UNAUTHENTICATED, name
            assert scorer == grpc.StatusCode.PERMISSION_DENIED, name
        # The client: the scoring token alone cannot, the admin token can (sent only there).
        with CreditClient(s.target, cache=False, token=SCORE) as c:
            with pytest.raises(CreditServiceError) as err:
                c.update_weights("v1", "v1")
            assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
        with CreditClient(s.target, cache=False, token=SCORE, admin_token=ADMIN) as c:
            assert c.transport.metadata == AS_SCORER
            assert c.transport.admin_metadata == AS_ADMIN
            out = c.update_weights("v1", "v1")  # relative to --weights-dir
            assert {r.policy_version for r in out.values()} == {"v1"}
            assert c.score([[1, 2, 3]], [[4, 5, 6]])[0].policy_version == "v1"
    finally:
        s.stop()


def test_path_loads_only_inside_the_weights_dir(start_server: Any, models: dict, tmp_path: Path):
    wd = models["weights_dir"]
    (wd / "link-out").symlink_to(models["outside"], target_is_directory=True)
    sneaky = wd / "sneaky"
    sneaky.mkdir()
    (sneaky / "model.safetensors").symlink_to(models["outside"] / "model.safetensors")
    (wd / "link-in").symlink_to(models["inside"], target_is_directory=True)
    s = start_server(
        None,
        Scorer.from_pretrained(models["base"]),
        admin_token=ADMIN,
        weights_dir=str(wd),
        allow_unauthenticated_weights=False,
    )
    try:
        for path in (
            str(models["outside"]),  # outside
            str(wd / ".." / "elsewhere"),  # .. out of it
            str(wd / "link-out"),  # a symlink out of it
            str(sneaky),  # a directory whose file links out of it
            "/etc/passwd",
        ):
            req = pb.UpdateWeightsRequest(path=path, version="v2")
            details = _details(
                grpc.StatusCode.PERMISSION_DENIED, s.stub.UpdateWeights, req, metadata=AS_ADMIN
            )
            assert "--weights-dir" in details, path
        # 8: other weights under the label already served.
        req = pb.UpdateWeightsRequest(path="v1", version="0")
        details = _details(
            grpc.StatusCode.FAILED_PRECONDITION, s.stub.UpdateWeights, req, metadata=AS_ADMIN
        )
        assert "already served" in details
        # A symlink that stays inside is fine.
        req = pb.UpdateWeightsRequest(path=str(wd / "link-in"), version="v1")
        assert s.stub.UpdateWeights(req, timeout=TIMEOUT, metadata=AS_ADMIN).policy_version == "v1"
    finally:
        s.stop()
    # No --weights-dir: no path loads at all (unless the development flag says any path).
    s = start_server(
        None,
        Scorer.from_pretrained(models["base"]),
        admin_token=ADMIN,
        allow_unauthenticated_weights=False,
    )
    try:
        req = pb.UpdateWeightsRequest(path=str(models["inside"]), version="v1")
        details = _details(
            grpc.StatusCode.PERMISSION_DENIED, s.stub.UpdateWeights, req, metadata=AS_ADMIN
        )
        assert "--weights-dir" in details
    finally:
        s.stop()


def test_development_flag_warns(start_server: Any, models: dict, caplog: Any):
    with caplog.at_level(logging.WARNING, logger="anchorcredit.server.app"):
        s = start_server(None, Scorer.from_pretrained(models["base"]))  # conftest: the flag on
        s.stop()
    assert any("DEVELOPMENT ONLY" in r.getMessage() for r in caplog.records)


# -- 2: a FIFO ------------------------------------------------------------------------------
def _health_and_metrics_answer(s: Any) -> None:
    """Health, /metrics and scoring answer. Called while a load is blocked for good (or
    after a refusal that opening a FIFO would have blocked for good): an answer at all
    shows nothing waits on it, so the timeouts are generous (a loaded box stays green)."""
    reply = s.health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=TIMEOUT)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    url = f"http://127.0.0.1:{s.server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=TIMEOUT) as r:  # noqa: S310 - loopback
        assert b"anchorcredit_" in r.read()
    assert s.stub.Score(_score_request(), timeout=TIMEOUT).results


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo (POSIX)")
def test_a_fifo_is_refused_at_once(start_server: Any, models: dict, tmp_path: Path):
    wd = tmp_path / "w"
    (wd / "fifo").mkdir(parents=True)
    os.mkfifo(wd / "fifo" / "model.safetensors")
    os.mkfifo(wd / "bare.safetensors")
    s = start_server(
        None,
        Scorer.from_pretrained(models["base"]),
        admin_token=ADMIN,
        weights_dir=str(wd),
        metrics_port=0,
        metrics_host="127.0.0.1",
    )
    try:
        for path in ("fifo", "bare.safetensors", "/dev/zero"):
            # opening a FIFO with no writer blocks for good: any answer is a refusal first
            code = _code(
                s.stub.UpdateWeights,
                pb.UpdateWeightsRequest(path=path, version="v1"),
                timeout=TIMEOUT,
                metadata=AS_ADMIN,
            )
            want = grpc.StatusCode.PERMISSION_DENIED if path.startswith("/dev") else None
            assert code == (want or grpc.StatusCode.INVALID_ARGUMENT), path
        _health_and_metrics_answer(s)
    finally:
        s.stop()


def test_a_blocked_load_leaves_health_and_metrics_answering(
    start_server: Any, models: dict, monkeypatch: Any
):
    # A load that blocks (a slow disk, say) runs in a worker thread: health, /metrics and
    # scoring keep answering. (A FIFO itself cannot show this: safetensors' open holds the
    # GIL while it blocks, freezing every thread; hence the refusal before opening above.)
    import anchorcredit.runner.weights as runner_weights

    release, entered = threading.Event(), threading.Event()
    original = runner_weights._safetensors_files

    def slow(path: Path) -> list[Path]:
        entered.set()
        release.wait(TIMEOUT)
        return original(path)

    monkeypatch.setattr(runner_weights, "_safetensors_files", slow)
    s = start_server(
        None, Scorer.from_pretrained(models["base"]), metrics_port=0, metrics_host="127.0.0.1"
    )
    try:
        call = s.stub.UpdateWeights.future(
            pb.UpdateWeightsRequest(path=str(models["inside"]), version="v1"), timeout=TIMEOUT
        )
        assert entered.wait(TIMEOUT)
        assert not call.done()  # the load is blocked ...
        _health_and_metrics_answer(s)  # ... and the server answers meanwhile
        release.set()
        assert call.result().policy_version == "v1"
    finally:
        release.set()
        s.stop()


# -- 9: garbage before the token, log flooding, secrets off argv ----------------------------
GARBAGE = b"\xff\xff\xff\xff\x0fnot a protobuf" * 4


def test_unauthenticated_garbage_is_never_parsed(start_server: Any, models: dict, caplog: Any):
    s = start_server(
        None, Scorer.from_pretrained(models["base"]), auth_token=SCORE, admin_token=ADMIN
    )
    try:
        with caplog.at_level(logging.DEBUG):
            for method, kind in (
                ("Score", "unary_unary"),
                ("GetModelInfo", "unary_unary"),
                ("UpdateWeights", "unary_unary"),
                ("PushWeights", "stream_unary"),
                ("ScoreStream", "stream_stream"),
            ):
                fn = getattr(s.channel, kind)(f"/anchorcredit.v1.CreditService/{method}")
                arg = GARBAGE if kind == "unary_unary" else iter([GARBAGE, GARBAGE])
                with pytest.raises(grpc.RpcError) as info:
                    out = fn(arg, timeout=TIMEOUT)
                    list(out) if kind == "stream_stream" else None
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, method
        # Not parsed: no DecodeError anywhere in the log.
        text = "\n".join(r.getMessage() + str(r.exc_info) for r in caplog.records)
        assert "DecodeError" not in text and "Wire format" not in text
    finally:
        s.stop()


def test_malformed_frames_are_one_line_per_interval(start_server: Any, models: dict, caplog: Any):
    s = start_server(None, Scorer.from_pretrained(models["base"]), auth_token=SCORE)
    try:
        fn = s.channel.unary_unary("/anchorcredit.v1.CreditService/Score")
        with caplog.at_level(logging.INFO, logger=MalformedFrameLog.LOGGER):
            for _ in range(20):
                with pytest.raises(grpc.RpcError) as info:
                    fn(GARBAGE, timeout=TIMEOUT, metadata=AS_SCORER)
                # a clear status for the caller (it was UNKNOWN: grpc's own parse failed)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "not a valid Score request" in info.value.details()
        logged = [
            r
            for r in caplog.records
            if r.name == MalformedFrameLog.LOGGER and r.levelno >= logging.INFO
        ]
        assert len(logged) <= 1, [r.getMessage() for r in logged]
        assert all(r.exc_info is None and "Traceback" not in r.getMessage() for r in logged)
        assert s.stub.Score(_score_request(), timeout=TIMEOUT, metadata=AS_SCORER).results
    finally:
        s.stop()


def test_malformed_frame_filter_unit():
    f = MalformedFrameLog(interval_s=60)

    def record(exc: BaseException | None) -> logging.LogRecord:
        info = (type(exc), exc, None) if exc else None
        return logging.LogRecord("grpc", logging.ERROR, "x", 1, "Unexpected [%s]", ("X",), info)

    class DecodeError(Exception):
        pass

    first = record(DecodeError("Wire format was corrupt"))
    assert f.filter(first) and first.exc_info is None and first.levelno == logging.WARNING
    assert "Wire format was corrupt" in first.getMessage()
    assert not any(f.filter(record(DecodeError("again"))) for _ in range(5))
    assert f.dropped == 5
    assert f.filter(record(RuntimeError("other")))  # other errors untouched
    f._next = 0.0
    later = record(DecodeError("later"))
    assert f.filter(later) and "5 more dropped" in later.getMessage()


def test_secrets_from_files_and_flags(tmp_path: Path, caplog: Any):
    admin, score = tmp_path / "admin", tmp_path / "score"
    admin.write_text(ADMIN + "\n")
    score.write_text(SCORE)
    env = {"ANCHORCREDIT_ADMIN_TOKEN_FILE": str(admin), "ANCHORCREDIT_WEIGHTS_DIR": "/w"}
    cfg = cfgmod.ServeConfig.from_env(env)
    assert cfg.admin_token == ADMIN and cfg.auth_token is None and cfg.weights_dir == "/w"
    parser = argparse.ArgumentParser()
    cfgmod.add_arguments(parser)
    args = parser.parse_args(["--auth-token-file", str(score), "--allow-unauthenticated-weights"])
    cfg = cfgmod.from_args(args, environ={})
    assert cfg.auth_token == SCORE and cfg.allow_unauthenticated_weights is True
    assert (
        cfgmod.from_args(parser.parse_args([]), environ={}).allow_unauthenticated_weights is False
    )
    on = {"ANCHORCREDIT_ALLOW_UNAUTHENTICATED_WEIGHTS": "true"}
    assert cfgmod.ServeConfig.from_env(on).allow_unauthenticated_weights is True
    with pytest.raises(ValueError, match="ALLOW_UNAUTHENTICATED_WEIGHTS"):
        cfgmod.ServeConfig.from_env({"ANCHORCREDIT_ALLOW_UNAUTHENTICATED_WEIGHTS": "maybe"})
    with pytest.raises(ValueError, match="not both"):
        cfgmod.ServeConfig(admin_token="x", admin_token_file=str(admin))
    with pytest.raises(ValueError, match="--admin-token-file"):
        cfgmod.ServeConfig(admin_token_file=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="must differ"):
        cfgmod.ServeConfig(auth_token="same", admin_token="same")
    with pytest.raises(ValueError, match="tls-client-ca"):
        cfgmod.ServeConfig(tls_client_ca="ca.pem")
    with caplog.at_level(logging.WARNING, logger="anchorcredit.server.config"):
        cfgmod.from_args(parser.parse_args(["--admin-token", "x"]), environ={})
    assert "process list" in caplog.text and "--admin-token-file" in caplog.text
    help_text = parser.format_help()
    for flag in ("--admin-token-file", "--auth-token-file", "--weights-dir", "--tls-client-ca"):
        assert flag in help_text
