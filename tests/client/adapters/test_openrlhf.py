"""OpenRLHF adapter on OpenRLHF's Experience layout (sequences = prompt + response,
right-padded, action_mask shifted by one), scored by a real service.

OpenRLHF itself (Ray, DeepSpeed, vLLM) is not installed in CI: a stand-in base class with
its `compute_advantages_and_returns` hook point checks the subclass wiring.
"""

from __future__ import annotations

import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from anchorcredit.client import CreditClient  # noqa: E402
from anchorcredit.client.adapters import openrlhf as ac_orl  # noqa: E402


@pytest.fixture(scope="module")
def target(tmp_path_factory, start_server):
    from anchorcredit.offline.debug_model import save_debug_model

    s = start_server(save_debug_model(tmp_path_factory.mktemp("m") / "llama"))
    yield s.target
    s.stop()


def _experience(with_hole: bool = False):
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 256, n).tolist() for n in (4, 7)]
    responses = [rng.integers(3, 256, n).tolist() for n in (11, 6)]
    L = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True)) + 2
    seq = torch.zeros(2, L, dtype=torch.long)
    attn = torch.zeros(2, L, dtype=torch.long)
    action = torch.zeros(2, L - 1, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        seq[i, : len(p) + len(r)] = torch.tensor(p + r)
        attn[i, : len(p) + len(r)] = 1
        action[i, len(p) - 1 : len(p) + len(r) - 1] = True  # token j+1 is an action
    if with_hole:
        action[0, len(prompts[0]) + 2] = False  # an observation token inside the response
    adv = torch.randn(2, L - 1) * action
    exp = types.SimpleNamespace(
        sequences=seq, attention_mask=attn, action_mask=action, advantages=adv.clone(), info={}
    )
    return exp, prompts, responses, adv


@pytest.mark.parametrize("with_hole", [False, True])
def test_apply_credit_is_a_times_gamma(target, with_hole):
    exp, prompts, responses, adv = _experience(with_hole)
    with CreditClient([target]) as client:
        ac_orl.apply_credit(exp, client, strategy="coupled_rhythm")
        ref = client.score(prompts, responses)
    for i, res in enumerate(ref):
        p = len(prompts[i])
        span = slice(p - 1, p - 1 + len(responses[i]))
        want = adv[i, span] * torch.from_numpy(np.array(res.gamma))
        m = exp.action_mask[i, span]
        torch.testing.assert_close(exp.advantages[i, span][m], want[m], rtol=0, atol=0)
    assert exp.advantages.dtype == adv.dtype
    assert exp.info["anchorcredit_gamma_mean"].shape == (2,)


def test_experience_maker_subclass_runs_after_the_base(target):
    class FakeMaker:  # OpenRLHF's hook point: advantages computed, then returned
        def compute_advantages_and_returns(self, experiences):
            for e in experiences:
                e.advantages = e.advantages * 2
            return experiences

    exp, prompts, responses, adv = _experience()
    with CreditClient([target]) as client:
        cls = ac_orl.experience_maker_class(client, base=FakeMaker, sign="positive_only")
        (out,) = cls().compute_advantages_and_returns([exp])
        ref = client.score(prompts, responses)
    g = np.array(ref[0].gamma)
    p = len(prompts[0])
    a = (adv[0, p - 1 : p - 1 + len(g)] * 2).numpy()
    want = np.where(a >= 0, a * g, a)
    np.testing.assert_allclose(out.advantages[0, p - 1 : p - 1 + len(g)].numpy(), want, rtol=1e-6)


def test_client_from_env(monkeypatch, target):
    monkeypatch.setenv("ANCHORCREDIT_TARGETS", target)
    monkeypatch.setenv("ANCHORCREDIT_PARAMS", '{"q": 0.3}')
    monkeypatch.setenv("ANCHORCREDIT_SIGN", "positive_only")
    client, kwargs = ac_orl._client_from_env()
    try:
        assert kwargs == {"q": 0.3, "strategy": "coupled_rhythm", "sign": "positive_only"}
        assert client.model_info().model_id
    finally:
        client.close()
