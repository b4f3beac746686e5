"""Tensor parallelism on the CPU (gloo, 2 processes): the same scores as one process.

The tiny debug models keep what matters for head sharding: GQA (Llama 4 query / 2 kv heads,
Qwen3 8 / 4 with per-head q/k norms), so each rank holds whole GQA groups. Batches pack
sequences of unequal lengths. The statistics of every head (before head classification)
are compared too, which checks that the gather puts heads back in global order.
"""

from __future__ import annotations

import signal
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from debug_model import debug_config, save_debug_model

from anchorcredit.engine import PackedStats
from anchorcredit.runner import Scorer
from anchorcredit.runner.forward import Horizon
from anchorcredit.runner.tensor_parallel import check_divisible, launch
from anchorcredit.runner.timing import StageTimer
from anchorcredit.runner.tp_gather import concat_heads, flatten_stats

TOL = dict(rtol=1e-5, atol=1e-5)  # float32; the row-parallel all-reduce sums in another order
LENGTHS = [(5, 9), (12, 30), (3, 4), (40, 17)]  # (prompt, response): unequal on purpose
MODELS = {
    # name: (save_debug_model arguments, load every layer and the LM head)
    "llama": ({"arch": "llama"}, True),
    "qwen3-gqa": ({"arch": "qwen3", "num_attention_heads": 8, "num_key_value_heads": 4}, False),
}


def _pairs(seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 256, p), rng.integers(0, 256, r)) for p, r in LENGTHS]


@pytest.fixture(scope="module", params=sorted(MODELS))
def scorers(request, tmp_path_factory):
    """(single-process Scorer, rank 0's TensorParallelScorer over 2 processes) of one model."""
    args, entropy = MODELS[request.param]
    path = save_debug_model(tmp_path_factory.mktemp(request.param) / "model", **args)
    single = Scorer.from_pretrained(path, entropy=entropy)
    sharded = launch(2, path, entropy=entropy)
    assert sharded is not None
    yield single, sharded, entropy
    sharded.close()
    assert not sharded.group.workers  # the spawned rank was joined


def test_scores_equal_single_process(scorers):
    single, sharded, entropy = scorers
    for strategy in ("coupled_rhythm", "global_anchor"):
        kwargs = {"with_entropy": entropy, "h_hi": "end"}
        want = single.score(_pairs(), strategy, **kwargs)
        got = sharded.score(_pairs(), strategy, **kwargs)
        assert len(got) == len(LENGTHS)
        for w, g in zip(want, got, strict=True):
            np.testing.assert_allclose(g.waad, w.waad, **TOL)
            np.testing.assert_allclose(g.fai, w.fai, **TOL)
            np.testing.assert_allclose(g.gamma, w.gamma, **TOL)
            assert g.local_heads == w.local_heads and g.global_heads == w.global_heads
            if entropy:
                np.testing.assert_allclose(g.entropy, w.entropy, **TOL)
            else:
                assert g.entropy is None


def test_per_head_statistics_equal(scorers):
    """Every head's span / WAAD / FAI of every layer, in global head order."""
    single, sharded, _ = scorers
    pairs = single.validate(_pairs(1))
    horizon = Horizon(window=4, h_lo=2, h_hi=None)
    with torch.inference_mode():
        want, _ = single._forward_stats(pairs, horizon, StageTimer(single.device), False)
        with sharded._lock:  # the scoring lock, as score_batch holds it
            got, _ = sharded._forward_stats(pairs, horizon, StageTimer(sharded.device), False)
    assert len(got) == len(single.layers)  # one PackedStats per selected layer
    for w_layer, g_layer in zip(want, got, strict=True):
        assert len(g_layer) == len(pairs) and g_layer.offsets == w_layer.offsets
        for w, g in zip(w_layer, g_layer, strict=True):
            assert g.num_heads == single.num_heads  # all heads, not one rank's
            for field in ("span", "waad", "fai"):
                torch.testing.assert_close(getattr(g, field), getattr(w, field), **TOL)


def test_info_reports_the_shard(scorers):
    single, sharded, _ = scorers
    info, ref = sharded.info(), single.info()
    assert (info.num_heads, info.num_kv_heads, info.layers) == (
        ref.num_heads,
        ref.num_kv_heads,
        ref.layers,
    )
    assert info.total_param_count == ref.total_param_count
    # Each rank holds its half of every sharded projection: less than one process holds.
    assert info.loaded_param_count < ref.loaded_param_count


def test_gather_layout_roundtrip():
    """Two ranks' halves, flattened and put back together, equal the whole (no processes)."""
    g = torch.Generator().manual_seed(0)

    def stats(heads: int, lengths: tuple[int, ...]) -> PackedStats:
        n = sum(lengths)
        offsets = [0, *torch.tensor(lengths).cumsum(0).tolist()]
        return PackedStats(
            torch.rand(len(lengths), heads, generator=g),
            torch.rand(heads, n, generator=g),
            torch.rand(heads, n, generator=g),
            offsets,
        )

    whole = [stats(4, (3, 7)), stats(4, (3, 7))]  # two layers, two sequences
    halves = [
        [PackedStats(s.span[:, a:b], s.waad[a:b], s.fai[a:b], s.offsets) for s in whole]
        for a, b in ((0, 2), (2, 4))
    ]
    got = concat_heads([flatten_stats(h) for h in halves], halves[0])
    for w, s in zip(whole, got, strict=True):
        assert s.offsets == w.offsets
        for field in ("span", "waad", "fai"):
            assert torch.equal(getattr(s, field), getattr(w, field))


def test_heads_must_divide():
    cfg = debug_config("llama")  # 4 query / 2 kv heads
    check_divisible(cfg, 2)
    with pytest.raises(ValueError, match=r"query heads \(4\) and the kv heads \(2\)"):
        check_divisible(cfg, 4)
    with pytest.raises(ValueError, match="must divide"):
        check_divisible(debug_config("llama", num_key_value_heads=1), 2)


@pytest.mark.slow
def test_serve_tensor_parallel_end_to_end(llama_model: Path, tmp_path: Path, serve_process):
    """`anchorcredit serve --tensor-parallel 2` as a real process: a gRPC Score answers what
    one process computes; SIGTERM stops rank 0 and the rank it spawned, exit 0."""
    from anchorcredit.v1 import credit_pb2 as pb
    from anchorcredit.v1 import credit_pb2_grpc

    model = llama_model
    server = serve_process(
        "--model", str(model), "--device", "cpu", "--tensor-parallel", "2",
        "--port", "0", "--host", "127.0.0.1", "--metrics-port", "-1", "--grace-s", "5",
    )  # fmt: skip
    port = int(server.wait_for(r"gRPC on 127\.0\.0\.1:(\d+)").group(1))
    server.wait_for(r"loaded in")
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = credit_pb2_grpc.CreditServiceStub(channel)
        request = pb.ScoreRequest(
            sequences=[
                pb.Sequence(prompt_ids=p.tolist(), response_ids=r.tolist()) for p, r in _pairs()
            ],
            outputs=pb.Outputs(waad=True, fai=True, gamma=True),
        )
        reply = stub.Score(request, timeout=60)
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    want = Scorer.from_pretrained(model, entropy=False).score(_pairs())
    assert len(reply.results) == len(want)
    for res, w in zip(reply.results, want, strict=True):
        for field in ("waad", "fai", "gamma"):
            got = np.frombuffer(getattr(res, field), dtype="<f4")
            np.testing.assert_allclose(got, getattr(w, field), **TOL)
        assert [(h.layer, h.head) for h in res.local_heads] == w.local_heads
    assert info.loaded_param_count < info.total_param_count
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=60) == 0, server.output()
    assert any("rank 1 stopping" in line for line in server.lines), server.output()
