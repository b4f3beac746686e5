"""verl adapter on verl's DataProto layout (left-padded prompts, right-padded responses).

verl itself (Ray, vLLM, ...) is not installed in CI; the batch below is a stand-in with the
same `.batch` fields and padding, scored by a real service.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from anchorcredit.client import CreditClient  # noqa: E402
from anchorcredit.client.adapters import verl as ac_verl  # noqa: E402


@pytest.fixture(scope="module")
def target(tmp_path_factory, start_server):
    from anchorcredit.offline.debug_model import save_debug_model

    s = start_server(save_debug_model(tmp_path_factory.mktemp("m") / "llama"))
    yield s.target
    s.stop()


def _batch():
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 256, n).tolist() for n in (4, 6, 2)]
    responses = [rng.integers(3, 256, n).tolist() for n in (12, 7, 15)]
    P, T = 6, 16
    p = torch.zeros(3, P, dtype=torch.long)
    r = torch.zeros(3, T, dtype=torch.long)
    am = torch.zeros(3, P + T, dtype=torch.long)
    for i, (x, y) in enumerate(zip(prompts, responses, strict=True)):
        p[i, P - len(x) :] = torch.tensor(x)
        r[i, : len(y)] = torch.tensor(y)
        am[i, P - len(x) : P] = 1
        am[i, P : P + len(y)] = 1
    rmask = am[:, P:].clone()
    adv = torch.tensor([1.5, -0.5, 2.0])[:, None] * rmask  # GRPO: score broadcast on the mask
    batch = {
        "prompts": p,
        "responses": r,
        "input_ids": torch.cat([p, r], 1),
        "attention_mask": am,
        "response_mask": rmask,
        "advantages": adv.clone(),
    }
    return types.SimpleNamespace(batch=batch, meta_info={}), prompts, responses, adv


@pytest.mark.parametrize("sign", ["both", "positive_only"])
def test_apply_credit_is_a_times_gamma(target, sign):
    data, prompts, responses, adv = _batch()
    with CreditClient([target], cache=None) as client:
        ac_verl.apply_credit(data, client, strategy="coupled_rhythm", sign=sign, q=0.5)
        ref = client.score(prompts, responses, q=0.5)
    out = data.batch["advantages"]
    assert out.shape == adv.shape and out.dtype == adv.dtype
    for i, res in enumerate(ref):
        n = len(responses[i])
        g = torch.from_numpy(np.array(res.gamma))
        if sign == "positive_only" and adv[i, 0] < 0:
            g = torch.ones_like(g)
        torch.testing.assert_close(out[i, :n], adv[i, :n] * g, rtol=0, atol=0)
        assert (out[i, n:] == 0).all()
    assert data.meta_info["metrics"]["anchorcredit/gamma_mean"] > 1.0


def test_install_wraps_the_fit_loop_global(target, monkeypatch):
    # A stand-in for verl.trainer.ppo.ray_trainer with its compute_advantage global.
    mod = types.ModuleType("verl.trainer.ppo.ray_trainer")
    mod.compute_advantage = lambda data, adv_estimator, **kw: data
    for name in ("verl", "verl.trainer", "verl.trainer.ppo"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "verl.trainer.ppo.ray_trainer", mod)
    sys.modules["verl.trainer.ppo"].ray_trainer = mod
    data, _, _, adv = _batch()
    with CreditClient([target]) as client:
        undo = ac_verl.install(client, q=0.5)
        ac_verl.install(client, q=0.5)  # idempotent: never wraps twice
        out = mod.compute_advantage(data, "grpo", gamma=1.0)
        assert not torch.equal(out.batch["advantages"], adv)
        undo()
    assert not hasattr(mod.compute_advantage, "__anchorcredit_wrapped__")
