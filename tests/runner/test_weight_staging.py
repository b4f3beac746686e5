"""Weight staging (runner/weights.py): bytes, tensors and broadcasts land in a buffer beside
the model, are checked, and only a commit changes what is served."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from debug_model import build_debug_model

from anchorcredit.backend import TruncatedWeights
from anchorcredit.errors import InputError, WeightVersionConflict
from anchorcredit.runner import Scorer
from anchorcredit.runner.weights import PartialWeightsError
from anchorcredit.weight_wire import WeightUpdateSpec

PAIRS = [([1, 2, 3], list(range(10, 40))), ([7], list(range(50, 75)))]


def wire(t: torch.Tensor, dtype: str = "float32") -> bytes:
    """A tensor's bytes as PushWeights carries them."""
    return t.detach().to(getattr(torch, dtype)).contiguous().view(torch.uint8).numpy().tobytes()


def push(stage, state: dict, dtype: str = "float32", chunk: int = 4096) -> None:
    for name, t in state.items():
        stage.begin(name, dtype, tuple(t.shape))
        raw = wire(t, dtype)
        for i in range(0, len(raw), chunk):
            stage.write(raw[i : i + chunk])


def same(a, b) -> None:
    for x, y in zip(a, b, strict=True):
        for name in ("waad", "fai", "gamma"):
            np.testing.assert_array_equal(getattr(x, name), getattr(y, name))
        assert x.local_heads == y.local_heads and x.global_heads == y.global_heads


@pytest.fixture(scope="module")
def new_state() -> dict:
    return build_debug_model("llama", seed=1).state_dict()


@pytest.fixture(scope="module")
def fresh(new_state) -> list:
    return Scorer.from_pretrained(build_debug_model("llama", seed=1)).score(PAIRS)


@pytest.mark.parametrize("chunk", [7, 4096, 1 << 22])  # 7: elements split across chunks
def test_streamed_bytes_equal_a_fresh_scorer(new_state, fresh, chunk):
    scorer = Scorer.from_pretrained(build_debug_model("llama", seed=0))
    before = scorer.score(PAIRS)
    stage = scorer.stage_weights(WeightUpdateSpec("v1"))
    push(stage, new_state, chunk=chunk)
    same(scorer.score(PAIRS), before)  # staged, not served
    assert scorer.policy_version == "0"
    scorer.commit_weights(stage)
    got = scorer.score(PAIRS)
    assert scorer.policy_version == "v1" and {r.policy_version for r in got} == {"v1"}
    same(got, fresh)
    assert stage.tensors == len(new_state)
    assert stage.bytes == sum(t.numel() * 4 for t in new_state.values())


def test_half_precision_on_the_wire_casts_into_float32(new_state):
    scorer = Scorer.from_pretrained(build_debug_model("llama", seed=0))
    stage = scorer.stage_weights(WeightUpdateSpec("bf16"))
    push(stage, new_state, dtype="bfloat16", chunk=1001)
    scorer.commit_weights(stage)
    for name, t in scorer.model.state_dict().items():
        torch.testing.assert_close(t, new_state[name].to(torch.bfloat16).float(), rtol=0, atol=0)
    assert stage.bytes == sum(t.numel() * 2 for t in new_state.values())


def test_bad_headers_name_the_tensor(new_state):
    scorer = Scorer.from_pretrained(build_debug_model("llama", seed=0))
    stage = scorer.stage_weights(WeightUpdateSpec("v1"))
    with pytest.raises(InputError, match="'model.extra'.*does not have"):
        stage.begin("model.extra", "float32", (2,))
    with pytest.raises(InputError, match=r"'model.norm.weight': shape \(3,\) != .*\(64,\)"):
        stage.begin("model.norm.weight", "float32", (3,))
    with pytest.raises(InputError, match="'model.norm.weight': dtype 'int8' is not one of"):
        stage.begin("model.norm.weight", "int8", (64,))
    with pytest.raises(InputError, match="before without a tensor header"):
        stage.write(b"\0" * 8)
    with pytest.raises(InputError, match="cannot be cast"):
        stage.put("model.norm.weight", torch.ones(64, dtype=torch.int32))
    stage.begin("model.norm.weight", "float32", (64,))
    with pytest.raises(InputError, match="'model.norm.weight': more than its 256 bytes"):
        stage.write(b"\0" * 260)
    stage.write(b"\0" * 256)
    with pytest.raises(InputError, match="'model.norm.weight' was sent twice"):
        stage.begin("model.norm.weight", "float32", (64,))
    stage.begin("lm_head.weight", "float32", (256, 64))
    stage.write(b"\0" * 100)
    with pytest.raises(InputError, match="'lm_head.weight': 100 of 65536 bytes"):
        stage.begin("model.embed_tokens.weight", "float32", (256, 64))


def test_cut_short_and_missing_tensors(new_state):
    scorer = Scorer.from_pretrained(build_debug_model("llama", seed=0))
    stage = scorer.stage_weights(WeightUpdateSpec("v1"))
    stage.begin("model.norm.weight", "float32", (64,))
    stage.write(b"\0" * 128)
    with pytest.raises(TruncatedWeights, match="'model.norm.weight'.* 128 of its 256 bytes"):
        stage.finish()
    whole = scorer.stage_weights(WeightUpdateSpec("v1"))
    push(whole, {k: v for k, v in new_state.items() if "layers.2.mlp" not in k})
    with pytest.raises(InputError, match="missing .*layers.2.mlp"):
        scorer.commit_weights(whole)
    assert scorer.policy_version == "0"


def test_partial_update_keeps_the_rest(new_state):
    scorer = Scorer.from_pretrained(build_debug_model("llama", seed=0))
    old = {k: v.clone() for k, v in scorer.model.state_dict().items()}
    sent = {k: v for k, v in new_state.items() if k.startswith("model.layers.1.")}
    stage = scorer.stage_weights(WeightUpdateSpec("p1", replaces="0", partial=True))
    push(stage, sent)
    scorer.commit_weights(stage)
    assert scorer.policy_version == "p1" and stage.tensors == len(sent)
    for name, t in scorer.model.state_dict().items():
        torch.testing.assert_close(t, sent.get(name, old[name]), rtol=0, atol=0)


def test_tied_embeddings_stage_once_and_may_be_absent():
    kw = dict(tie_word_embeddings=True)
    scorer = Scorer.from_pretrained(build_debug_model("llama", seed=0, **kw))
    state = build_debug_model("llama", seed=3, **kw).state_dict()
    stage = scorer.stage_weights(WeightUpdateSpec("t3"))
    push(stage, {k: v for k, v in state.items() if k != "lm_head.weight"})
    assert len(stage._staged) == len(state) - 1  # one buffer for the tied pair
    scorer.commit_weights(stage)
    fresh = Scorer.from_pretrained(build_debug_model("llama", seed=3, **kw))
    same(scorer.score(PAIRS), fresh.score(PAIRS))
    info = scorer.info()
    assert info.total_param_count == info.loaded_param_count
    assert info.total_param_count == sum(p.numel() for p in fresh.model.parameters())
    assert info.total_param_count < sum(t.numel() for t in state.values())  # counted once


def test_version_rules_at_stage_and_at_commit(new_state):
    scorer = Scorer.from_pretrained(build_debug_model("llama", seed=0), policy_version="a")
    with pytest.raises(InputError, match="non-empty"):
        scorer.stage_weights(WeightUpdateSpec(""))
    with pytest.raises(WeightVersionConflict, match="already served"):
        scorer.stage_weights(WeightUpdateSpec("a"))
    with pytest.raises(WeightVersionConflict, match="replaces version 'x'"):
        scorer.stage_weights(WeightUpdateSpec("b", replaces="x"))
    with pytest.raises(WeightVersionConflict, match="already served"):
        scorer.load_weights(new_state, version="a")
    # Staged against "a", but "c" was committed meanwhile: the commit re-checks.
    slow = scorer.stage_weights(WeightUpdateSpec("b", replaces="a"))
    push(slow, new_state)
    scorer.load_weights(new_state, version="c", replaces="a")
    with pytest.raises(WeightVersionConflict, match="'c' is served"):
        scorer.commit_weights(slow)
    assert scorer.policy_version == "c"


def test_commit_failing_half_way_refuses_to_score(new_state):
    scorer = Scorer.from_pretrained(build_debug_model("llama", seed=0), policy_version="v0")
    stage = scorer.stage_weights(WeightUpdateSpec("v1"))
    push(stage, new_state)
    third = list(stage._staged)[2]
    stage._staged[third] = torch.ones(1, 2, 3)  # copy_ into the model raises
    with pytest.raises(PartialWeightsError, match="after 2 of"):
        scorer.commit_weights(stage)
    assert scorer.policy_version == "v0"
    with pytest.raises(PartialWeightsError, match="load_weights again"):
        scorer.score(PAIRS)
    scorer.load_weights(new_state, version="v1")
    assert {r.policy_version for r in scorer.score(PAIRS)} == {"v1"}


class LoopbackGroup:
    """Stands in for weight_group.WeightGroup: 'receives' the trainer's tensors in order."""

    def __init__(self, tensors, fail_at: int | None = None) -> None:
        self.device = torch.device("cpu")
        self._it = iter(tensors)
        self.calls = 0
        self.fail_at = fail_at

    def broadcast(self, buf: torch.Tensor) -> torch.Tensor:
        if self.calls == self.fail_at:
            raise RuntimeError("connection reset by peer")
        self.calls += 1
        buf.copy_(next(self._it))
        return buf


def test_receive_checks_every_header_first(new_state, fresh):
    scorer = Scorer.from_pretrained(build_debug_model("llama", seed=0))
    headers = [(k, "float32", tuple(v.shape)) for k, v in new_state.items()]
    bad = [*headers[:-1], (headers[-1][0], "float32", (1,))]
    group = LoopbackGroup(new_state.values())
    with pytest.raises(InputError, match=f"{headers[-1][0]!r}: shape"):
        scorer.stage_weights(WeightUpdateSpec("v1")).receive(group, bad)
    assert group.calls == 0  # nothing was received
    with pytest.raises(InputError, match="listed twice"):
        scorer.stage_weights(WeightUpdateSpec("v1")).receive(group, [headers[0], headers[0]])
    stage = scorer.stage_weights(WeightUpdateSpec("v1"))
    stage.receive(group, headers)
    scorer.commit_weights(stage)
    same(scorer.score(PAIRS), fresh)
    # bf16 on the wire: received into a temporary, cast into the staging buffer
    halves = [t.to(torch.bfloat16) for t in new_state.values()]
    stage = scorer.stage_weights(WeightUpdateSpec("v2"))
    stage.receive(LoopbackGroup(halves), [(k, "bfloat16", s) for k, _, s in headers])
    scorer.commit_weights(stage)
    torch.testing.assert_close(
        scorer.model.model.norm.weight, new_state["model.norm.weight"].bfloat16().float()
    )


def test_a_failed_broadcast_is_truncation(new_state):
    scorer = Scorer.from_pretrained(build_debug_model("llama", seed=0))
    headers = [(k, "float32", tuple(v.shape)) for k, v in new_state.items()]
    stage = scorer.stage_weights(WeightUpdateSpec("v1"))
    with pytest.raises(TruncatedWeights, match=f"{headers[3][0]!r}: the broadcast failed"):
        stage.receive(LoopbackGroup(new_state.values(), fail_at=3), headers)
    assert scorer.policy_version == "0"
