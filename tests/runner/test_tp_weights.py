"""Weight changes under tensor parallelism (CPU, gloo, 2 processes).

Rank 0 stages whole tensors; every rank takes its shard at commit (runner/tp_weights.py).
The new weights are another tiny random model of the same shapes: after an update the
sharded scores must equal one process loaded from them, and differ from the old ones.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from debug_model import save_debug_model
from safetensors.torch import load_file

from anchorcredit.errors import InputError
from anchorcredit.runner import Scorer
from anchorcredit.runner.tensor_parallel import launch
from anchorcredit.weight_wire import WeightUpdateSpec

TOL = dict(rtol=1e-5, atol=1e-5)  # float32; the row-parallel all-reduce sums in another order
LENGTHS = [(5, 9), (12, 30), (40, 17)]


def _pairs() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(3)
    return [(rng.integers(0, 256, p), rng.integers(0, 256, r)) for p, r in LENGTHS]


def _score(scorer, entropy: bool):
    return scorer.score(_pairs(), "coupled_rhythm", with_entropy=entropy, h_hi="end")


def _assert_same(got, want, entropy: bool) -> None:
    for g, w in zip(got, want, strict=True):
        for field in ("waad", "fai", "gamma") + (("entropy",) if entropy else ()):
            np.testing.assert_allclose(getattr(g, field), getattr(w, field), **TOL)
        assert g.local_heads == w.local_heads


def _differs(got, want) -> bool:
    return any(not np.allclose(g.waad, w.waad, **TOL) for g, w in zip(got, want, strict=True))


@pytest.fixture(scope="module")
def models(other_llama_model, llama_model):
    old = llama_model
    new = other_llama_model  # same shapes, other values
    return old, new


@pytest.fixture(scope="module", params=[True, False], ids=["entropy", "partial"])
def setup(request, models):
    """(rank 0's scorer over 2 processes on the old weights, single-process scorers of the
    old and new weights, entropy). entropy=False loads only the scored layers, no head."""
    old, new = models
    entropy = request.param
    sharded = launch(2, old, entropy=entropy)
    assert sharded is not None
    singles = {
        "old": Scorer.from_pretrained(old, entropy=entropy),
        "new": Scorer.from_pretrained(new, entropy=entropy),
    }
    yield sharded, singles, entropy
    sharded.close()


def _load(sharded, source, version: str) -> None:
    sharded.load_weights(source, version)
    assert sharded.policy_version == version == sharded.info().policy_version


def test_update_from_path_scores_the_new_weights(setup, models):
    sharded, singles, entropy = setup
    old, new = models
    _load(sharded, new, "path-new")
    got = _score(sharded, entropy)
    _assert_same(got, _score(singles["new"], entropy), entropy)
    assert _differs(got, _score(singles["old"], entropy))
    assert all(r.policy_version == "path-new" for r in got)
    _load(sharded, old, "path-old")  # and back
    _assert_same(_score(sharded, entropy), _score(singles["old"], entropy), entropy)


def test_stream_update(setup, models):
    """What PushWeights does: headers and raw little-endian bytes in uneven chunks."""
    sharded, singles, entropy = setup
    tensors = load_file(str(models[1] / "model.safetensors"))
    stage = sharded.stage_weights(WeightUpdateSpec("stream-new"))
    try:
        for name, t in tensors.items():
            stage.begin(name, "float32", tuple(t.shape))
            raw = t.contiguous().numpy().astype("<f4").tobytes()
            for i in range(0, len(raw), 1001):  # splits values across chunks
                stage.write(raw[i : i + 1001])
        stage.finish()
        if not entropy:  # the LM head and the layers after the last scored one were dropped
            assert stage.skipped_tensors > 0
            assert "lm_head.weight" in tensors
        sharded.commit_weights(stage)
    finally:
        stage.discard()
    assert sharded.policy_version == "stream-new"
    _assert_same(_score(sharded, entropy), _score(singles["new"], entropy), entropy)


def test_wrong_shape_refused_old_weights_kept(setup, models):
    sharded, singles, entropy = setup
    _load(sharded, models[0], "before-bad")
    tensors = load_file(str(models[1] / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors[name] = torch.zeros(tensors[name].shape[0], tensors[name].shape[1] + 1)
    with pytest.raises(InputError, match="shape"):
        sharded.load_weights(tensors, "bad")
    assert sharded.policy_version == "before-bad"
    _assert_same(_score(sharded, entropy), _score(singles["old"], entropy), entropy)


def test_partial_update_of_one_sharded_tensor(setup, models):
    """A partial update (one row-parallel and one column-parallel tensor) changes exactly
    those: the same as a single process given the same partial update."""
    sharded, singles, entropy = setup
    _load(sharded, models[0], "before-partial")
    new = load_file(str(models[1] / "model.safetensors"))
    part = {k: new[k] for k in ("model.layers.1.self_attn.o_proj.weight", "model.norm.weight")}
    single = Scorer.from_pretrained(models[0], entropy=entropy)
    for s in (sharded, single):
        stage = s.stage_weights(WeightUpdateSpec("partial", partial=True))
        stage.load(part)
        s.commit_weights(stage)
    got = _score(sharded, entropy)
    _assert_same(got, _score(single, entropy), entropy)
    assert _differs(got, _score(singles["old"], entropy))


def test_a_rank_failing_to_stage_changes_no_rank(setup, models, monkeypatch):
    """Rank 0 cannot take its shard of one tensor: it still joins every broadcast, the
    update fails on every rank, the old weights keep scoring and later updates work."""
    from anchorcredit.runner import tp_weights
    from anchorcredit.runner.tp_weights import TensorParallelWeightsFailed

    sharded, singles, entropy = setup
    _load(sharded, models[0], "before-fail")
    real = tp_weights.local_shard

    def failing(param, whole):
        if whole.shape == (64, 64):  # q_proj and o_proj of every layer
            raise MemoryError("no room for this shard")
        return real(param, whole)

    monkeypatch.setattr(tp_weights, "local_shard", failing)
    with pytest.raises(TensorParallelWeightsFailed, match="rank 0.*no room"):
        sharded.load_weights(models[1], "failed")
    assert sharded.policy_version == "before-fail"
    _assert_same(_score(sharded, entropy), _score(singles["old"], entropy), entropy)
    monkeypatch.undo()
    _load(sharded, models[1], "after-fail")  # the ranks are still in step
    _assert_same(_score(sharded, entropy), _score(singles["new"], entropy), entropy)


def test_collective_push_from_a_client(setup, models, start_server):
    """push_weights(transport="collective") against a server whose backend is the 2-rank
    scorer: rank 0 joins the client's private gloo group beside the ranks' default group,
    receives the broadcast into its host staging and commits on every rank."""
    from anchorcredit.client import CreditClient

    sharded, singles, entropy = setup
    _load(sharded, models[0], "before-collective")
    new = load_file(str(models[1] / "model.safetensors"))
    server = start_server(models[0], backend=sharded)
    try:
        with CreditClient(server.target, cache=False) as client:
            group = client.open_weight_group(timeout_s=60)
            assert group.backend == "gloo"
            out = client.push_weights(new, "collective-new", transport="collective")
            assert out[server.target].policy_version == "collective-new"
            assert client.model_info(refresh=True).policy_version == "collective-new"
            got = _score(sharded, entropy)
            _assert_same(got, _score(singles["new"], entropy), entropy)
            assert all(r.policy_version == "collective-new" for r in got)
            # the same group again, and the ranks are still in step for a path update after
            client.push_weights(
                load_file(str(models[0] / "model.safetensors")),
                "collective-old",
                transport="collective",
                replaces="collective-new",
            )
            _assert_same(_score(sharded, entropy), _score(singles["old"], entropy), entropy)
    finally:
        server.stop()
    _load(sharded, models[1], "path-after-collective")
    _assert_same(_score(sharded, entropy), _score(singles["new"], entropy), entropy)


@pytest.mark.slow
def test_serve_tensor_parallel_weight_rpcs(tmp_path: Path, serve_process):
    """`anchorcredit serve --tensor-parallel 2`: UpdateWeights(path), PushWeights and a
    collective push (gloo weight group), each followed by a Score equal to one process on
    those weights."""
    from anchorcredit.client import CreditClient
    from anchorcredit.v1 import credit_pb2 as pb
    from anchorcredit.v1 import credit_pb2_grpc

    old = save_debug_model(tmp_path / "weights" / "old", arch="llama", seed=0)
    new = save_debug_model(tmp_path / "weights" / "new", arch="llama", seed=1)
    server = serve_process(
        "--model", str(old), "--device", "cpu", "--tensor-parallel", "2",
        "--weights-dir", str(tmp_path / "weights"), "--port", "0", "--host", "127.0.0.1",
        "--metrics-port", "-1", "--grace-s", "5",
        ANCHORCREDIT_ADMIN_TOKEN="tp-admin",
    )  # fmt: skip

    def score(stub) -> pb.ScoreResponse:
        request = pb.ScoreRequest(
            sequences=[
                pb.Sequence(prompt_ids=p.tolist(), response_ids=r.tolist()) for p, r in _pairs()
            ],
            outputs=pb.Outputs(waad=True, fai=True, gamma=True),
        )
        return stub.Score(request, timeout=60)

    def check(reply: pb.ScoreResponse, model: Path, version: str) -> None:
        assert reply.policy_version == version
        want = Scorer.from_pretrained(model, entropy=False).score(_pairs())
        for res, w in zip(reply.results, want, strict=True):
            for field in ("waad", "fai", "gamma"):
                got = np.frombuffer(getattr(res, field), dtype="<f4")
                np.testing.assert_allclose(got, getattr(w, field), **TOL)

    port = int(server.wait_for(r"gRPC on 127\.0\.0\.1:(\d+)").group(1))
    server.wait_for(r"loaded in")
    target = f"127.0.0.1:{port}"
    client = CreditClient(target, cache=False, admin_token="tp-admin")
    with grpc.insecure_channel(target) as channel:
        stub = credit_pb2_grpc.CreditServiceStub(channel)
        client.update_weights("new", "v-path")
        check(score(stub), new, "v-path")
        client.push_weights(load_file(str(old / "model.safetensors")), "v-push")
        check(score(stub), old, "v-push")
        client.push_weights(
            load_file(str(new / "model.safetensors")), "v-group", transport="collective"
        )
        check(score(stub), new, "v-group")
    client.close()
