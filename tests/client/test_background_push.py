"""Background weight pushes: they overlap the trainer's work, a score waits for them, and a
push that failed is raised at the next score call, naming its step."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from anchorcredit.client import CreditClient  # noqa: E402
from anchorcredit.client.background_push import BackgroundPusher, BackgroundPushError  # noqa: E402
from anchorcredit.client.errors import CreditServiceError  # noqa: E402

P = [[1, 2, 3, 4], [7, 8, 9]]
R = [[5, 6, 7, 8, 9, 10, 11, 12], [3, 4, 5, 6, 7]]


class GatedPush:
    """A push that records the order of events and blocks until released."""

    def __init__(self, fail: bool = False):
        self.release = threading.Event()
        self.events: list[str] = []
        self.fail = fail

    def __call__(self, weights, version, **kw):
        self.events.append(f"push {version} started")
        assert self.release.wait(30)
        self.events.append(f"push {version} done")
        if self.fail:
            raise CreditServiceError(grpc.StatusCode.UNAVAILABLE, "the service went away")
        return {"addr": version}


def test_the_push_runs_while_the_trainer_generates_and_the_wait_comes_after():
    """Event-ordered: submit returns while the push is still running; the trainer's next
    work happens before the push ends; wait() returns only once it has ended."""
    push = GatedPush()
    pusher = BackgroundPusher(push)
    record = pusher.submit({"w": 1}, "step-1-r", step=1)
    assert record.started.wait(10)
    push.events.append("generate step 2")  # the trainer's work, while the push runs
    assert pusher.in_flight() and not record.finished.is_set()
    waiter = threading.Thread(target=lambda: push.events.append(f"wait -> {pusher.wait()}"))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive()  # the score waits: the push has not committed
    push.release.set()
    waiter.join(10)
    assert push.events[:3] == ["push step-1-r started", "generate step 2", "push step-1-r done"]
    assert push.events[3].startswith("wait -> PushRecord(version='step-1-r'")
    assert record.ok and pusher.last_done is record
    times = pusher.take_times()
    assert times.push_seconds == record.seconds and times.blocked_seconds > 0
    # a step with no new push reports none (e.g. a later run without a sync, same client)
    assert pusher.take_times().push_seconds is None


def test_a_failed_push_is_raised_once_at_the_next_wait_naming_its_step():
    push = GatedPush(fail=True)
    pusher = BackgroundPusher(push)
    pusher.submit({"w": 1}, "step-4-r", step=4)
    push.release.set()
    pusher.fence()  # the fence waits but does not report
    with pytest.raises(BackgroundPushError, match=r"push of step 4 \(policy version 'step-4-r'\)"):
        pusher.wait()
    assert pusher.wait() is None  # reported once; nothing succeeded


def test_the_next_push_waits_for_the_one_in_flight_and_reports_its_failure():
    push = GatedPush(fail=True)
    pusher = BackgroundPusher(push)
    pusher.submit({"w": 1}, "step-1-r", step=1)
    push.release.set()
    with pytest.raises(BackgroundPushError, match="step 1"):
        pusher.submit({"w": 2}, "step-2-r", step=2)


# -- through the client ------------------------------------------------------------------------
def test_a_failed_background_push_is_reported_at_the_next_score_call(start_server, llama_model):
    """A push the server refuses (a tensor the model does not have) fails in the background;
    the next score call raises it, naming the step, and scores nothing."""
    server = start_server(str(llama_model))
    with CreditClient(server.target, cache=False) as client:
        record = client.push_weights_background({"no.such.tensor": torch.ones(2)}, "s7", step=7)
        assert record.finished.wait(60) and record.error is not None
        with pytest.raises(BackgroundPushError, match=r"step 7 \(policy version 's7'\)") as err:
            client.score(P, R)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.step == 7 and server.target in err.value.failed
        assert client.model_info(refresh=True).policy_version == "0"
        # reported once: the next call scores from the weights still served
        assert {r.policy_version for r in client.score(P, R)} == {"0"}


def test_scores_after_background_pushes_equal_a_scorer_on_the_final_weights(
    start_server, tmp_path, llama_model, other_llama_model
):
    """Two background pushes in a row, each scored pinned to its version: the numbers equal a
    fresh Scorer on the weights last pushed."""
    from transformers import AutoModelForCausalLM

    from anchorcredit.client.weights import full_state_items
    from anchorcredit.runner import Scorer

    a, b = str(llama_model), str(other_llama_model)
    server = start_server(a)
    model = AutoModelForCausalLM.from_pretrained(b, torch_dtype=torch.float32)
    with CreditClient(server.target, cache=False) as client:
        client.push_weights_background(list(full_state_items(model)), "s1", step=1)
        first = client.score(P, R, policy_version="s1")
        with torch.no_grad():  # the next optimizer step: only after the fence
            client.background_pusher.fence()
            for p in model.parameters():
                p.mul_(1.01)
        client.push_weights_background(list(full_state_items(model)), "s2", step=2)
        got = client.score(P, R, policy_version="s2")
    assert {r.policy_version for r in got} == {"s2"}
    final = tmp_path / "final"
    model.save_pretrained(final)
    ref = Scorer.from_pretrained(str(final)).score(list(zip(P, R, strict=True)))
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_array_equal(g.gamma, r.gamma)
        np.testing.assert_array_equal(g.waad, r.waad)
    assert not np.array_equal(first[0].waad, got[0].waad)
