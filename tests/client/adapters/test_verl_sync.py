"""verl weight sync: verl 0.9.1's real `CheckpointEngineManager.update_weights` and
`ActorRolloutRefWorker.update_weights` (as the adapter patches them) push the actor's
weights to a real CreditService, and scoring is pinned to that version.

Stubbed, and only these: the Ray worker group (its `update_weights` runs the worker method
in-process; `ray.get` passes results through), the actor engine (`get_per_tensor_param`
yields a real HF model's tensors, as verl's FSDP engine yields full HF-named tensors) and
the checkpoint engine's `send_weights` (the NCCL hop to the rollout replicas). The worker
takes the checkpoint-engine path (mode "nccl"); the colocated path would need vLLM.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("verl", reason="pip install --no-deps verl==0.9.1 (+ the dev extra)")

from omegaconf import OmegaConf  # noqa: E402

from anchorcredit.client import CreditClient  # noqa: E402
from anchorcredit.client.adapters import verl as ac_verl  # noqa: E402
from anchorcredit.client.adapters import verl_sync  # noqa: E402
from anchorcredit.client.errors import StalePolicyVersionError  # noqa: E402

# a real model is loaded and pushed end to end
pytestmark = pytest.mark.slow

PROMPTS = [[5, 6, 7, 8], [9, 10]]
RESPONSES = [[11, 12, 13, 14, 15], [21, 22, 23]]


@pytest.fixture(scope="module")
def served(llama_model, start_server):
    path = llama_model
    s = start_server(path)
    yield path, s.target
    s.stop()


@pytest.fixture
def rig(served, monkeypatch):
    """(client, manager, worker, sent): verl's manager and actor worker, hooked."""
    from transformers import AutoModelForCausalLM
    from verl.checkpoint_engine import base as ckpt_base
    from verl.workers.engine_workers import ActorRolloutRefWorker

    path, target = served
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():  # "the optimizer step": weights the service has not seen
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    monkeypatch.setenv("ANCHORCREDIT_RUN_ID", "t")
    monkeypatch.setattr(verl_sync, "STATE", verl_sync.SyncState())
    client = CreditClient([target], cache=None)
    undo = ac_verl.install(client, sync=True, q=0.5)

    worker = object.__new__(ActorRolloutRefWorker)
    worker.role = "actor_rollout"
    worker.config = OmegaConf.create({"rollout": {"checkpoint_engine": {"backend": "nccl"}}})
    worker.actor = types.SimpleNamespace(
        engine=types.SimpleNamespace(
            get_per_tensor_param=lambda **kw: (iter(model.state_dict().items()), None)
        )
    )
    sent = []

    async def send_weights(params, global_steps=None):
        sent.append((global_steps, sum(1 for _ in params)))
        return {}

    worker.checkpoint_engine = types.SimpleNamespace(send_weights=send_weights)

    def group_update_weights(global_steps=None, mode="auto"):  # ONE_TO_ALL on one rank
        coro = worker.update_weights(global_steps=global_steps, mode="nccl")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return [pool.submit(asyncio.run, coro).result()]

    manager = object.__new__(ckpt_base.CheckpointEngineManager)
    manager.backend = "naive"
    manager.actor_wg = types.SimpleNamespace(update_weights=group_update_weights)
    monkeypatch.setattr(ckpt_base.ray, "get", lambda refs: refs)
    yield client, manager, worker, sent, model
    undo()
    client.close()


def test_verl_sync_serves_and_pins_the_new_version(rig):
    client, manager, _, sent, model = rig
    before = client.score(PROMPTS, RESPONSES, q=0.5)
    manager.update_weights(3)  # what fit() calls after update_actor, with global_steps
    version = "step-3-t"
    assert client.model_info(refresh=True).policy_version == version
    assert verl_sync.STATE.version == version == verl_sync.STATE.pushed
    assert sent == [(3, len(model.state_dict()))]  # verl's own rollout sync still ran
    # what the adapter now pins on every score() call
    assert ac_verl._CONFIG.score_kwargs()["policy_version"] == version
    after = client.score(PROMPTS, RESPONSES, policy_version=version, q=0.5)
    assert all(r.policy_version == version for r in after)
    assert not np.allclose(before[0].waad, after[0].waad)  # the new weights score
    manager.update_weights(3)  # a second manager syncing the same step: no second push
    assert len(verl_sync.STATE.seconds) == 1


def test_stale_pin_is_refused_never_used(rig):
    from verl.trainer.ppo import ray_trainer

    client, manager, _, _, model = rig
    manager.update_weights(1)
    pinned = verl_sync.STATE.version
    name, tensor = next(iter(model.state_dict().items()))
    client.push_weights({name: tensor}, "someone-else", partial=True)  # the service moves on
    with pytest.raises(StalePolicyVersionError):
        client.score(PROMPTS, RESPONSES, policy_version=pinned, q=0.5)
    # through the adapter: verl's compute_advantage raises rather than use other weights
    data = _tiny_batch()
    with pytest.raises(StalePolicyVersionError):
        ray_trainer.compute_advantage(data, adv_estimator="grpo")


def test_missing_actor_hook_is_an_error(rig):
    client, manager, _, _, _ = rig
    manager.actor_wg = types.SimpleNamespace(update_weights=lambda **kw: [None])  # no push
    with pytest.raises(RuntimeError, match="worker_process_setup_hook"):
        manager.update_weights(7)


def _tiny_batch():
    from verl.protocol import DataProto

    p = torch.tensor([[0, 5, 6], [9, 10, 11]])
    r = torch.tensor([[11, 12, 0], [21, 22, 23]])
    am = torch.tensor([[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    rm = am[:, 3:].clone()
    data = DataProto.from_dict(
        {
            "prompts": p,
            "responses": r,
            "attention_mask": am,
            "response_mask": rm,
            "token_level_rewards": torch.tensor([[0, 1.0, 0], [0, 0, 0.0]]),
        },
        non_tensors={"uid": np.array(["a", "a"], dtype=object)},
    )
    return data


def _fake_ray(monkeypatch, job_id: str, session: str) -> None:
    context = types.SimpleNamespace(get_job_id=lambda: job_id, get_session_name=lambda: session)
    fake = types.SimpleNamespace(is_initialized=lambda: True, get_runtime_context=lambda: context)
    monkeypatch.setitem(__import__("sys").modules, "ray", fake)


def test_run_id_differs_between_ray_clusters_with_the_same_job_id(monkeypatch):
    """Every fresh Ray cluster (verl's own ray.init()) numbers its first job 01000000: two
    runs must still name their versions differently, or a shared cache serves run 1's
    step-5 scores to run 2's step 5."""
    monkeypatch.delenv("ANCHORCREDIT_RUN_ID", raising=False)
    _fake_ray(monkeypatch, "01000000", "session_2026-11-30_10-00-00_000001_11")
    first = verl_sync.SyncState().version_for(5)
    again = verl_sync.SyncState().version_for(5)
    _fake_ray(monkeypatch, "01000000", "session_2026-11-30_12-00-00_000002_22")
    second = verl_sync.SyncState().version_for(5)
    assert first == again  # every process of one job agrees
    assert first != second
