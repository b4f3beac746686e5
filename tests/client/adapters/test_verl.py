"""verl adapter against verl 0.9.1's real source and a real CreditService (tiny debug model).

Batches come from verl's own code (agent-loop padding and `_postprocess` for the legacy
trainer, `AgentLoopOutput.as_dict` rows for v1); advantages from verl's own
`compute_advantage` / `compute_grpo_outcome_advantage` and the v1 trainer's real
`_compute_advantage` method. Stubbed, and only these: TransferQueue (a Ray actor service,
replaced by an in-process store that packs with TQ's own `_pack_field_values`) and the
actor worker group (`update_actor` on Ray/GPU workers, replaced by a function returning
the metrics dict a worker returns).
"""

from __future__ import annotations

import copy
import importlib
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("verl", reason="pip install --no-deps verl==0.9.1 (+ the dev extra)")

from omegaconf import OmegaConf  # noqa: E402
from tensordict import TensorDict  # noqa: E402

from anchorcredit.client import CreditClient  # noqa: E402
from anchorcredit.client.adapters import verl as ac_verl  # noqa: E402

# (prompt, response, response_mask): sample 1 has tool output inside its response.
SAMPLES = [
    ([5, 6, 7, 8], [11, 12, 13, 14, 15, 16], [1, 1, 1, 1, 1, 1]),
    ([9, 10], [21, 22, 23, 24, 25, 26, 27, 28, 29], [1, 1, 1, 0, 0, 0, 1, 1, 1]),
    ([5, 6, 7, 8], [31, 32, 33], [1, 1, 1]),
    ([9, 10], [41, 42, 43, 44, 45, 46, 47, 48], [1, 1, 1, 1, 1, 1, 1, 1]),
]
REWARDS = [1.0, 0.0, 0.0, 1.0]
UIDS = ["a", "b", "a", "b"]  # GRPO groups: rows 0, 2 and rows 1, 3
PARAMS = {"q": 0.5}


@pytest.fixture
def client(target):
    with CreditClient([target], cache=None) as c:
        yield c


@pytest.fixture
def installed(client):
    undo = ac_verl.install(client, sync=False, **PARAMS)
    yield client
    undo()


def _gammas(client, rows):
    """The service's gamma for (prompt, full response) rows, straight from score()."""
    res = client.score([p for p, _ in rows], [r for _, r in rows], **PARAMS)
    return [np.asarray(x.gamma) for x in res]


# -- legacy trainer layout (main_ppo_v0's RayPPOTrainer, one-step-off, fully-async) -------
def _tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({f"t{i}": i for i in range(64)}, unk_token="t1"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", unk_token="t1")


def legacy_batch(prompt_length: int = 6, response_length: int = 10):
    """The DataProto verl's agent loop hands the legacy trainer (its `_pad_token_ids`
    through a real HF tokenizer's pad, then `_postprocess`), plus uid and rewards."""
    from verl.experimental.agent_loop.agent_loop import (
        AgentLoopMetrics,
        AgentLoopWorker,
        _InternalAgentLoopOutput,
    )

    worker = types.SimpleNamespace(tokenizer=_tokenizer(), reward_loop_worker_handles=None)
    pad = AgentLoopWorker._pad_token_ids
    outputs = []
    for (p, r, m), score in zip(SAMPLES, REWARDS, strict=True):
        po = pad(
            worker, p, max_length=prompt_length, padding_side="left", return_attention_mask=True
        )
        ro = pad(
            worker, r, max_length=response_length, padding_side="right", return_attention_mask=True
        )
        mo = pad(
            worker, m, max_length=response_length, padding_side="right", return_attention_mask=False
        )
        attention = torch.cat([po["attention_mask"], ro["attention_mask"]], dim=1)
        outputs.append(
            _InternalAgentLoopOutput(
                prompt_ids=po["input_ids"],
                response_ids=ro["input_ids"],
                input_ids=torch.cat([po["input_ids"], ro["input_ids"]], dim=1),
                position_ids=((attention.cumsum(-1) - 1) * attention).clamp(min=0),
                response_mask=mo["input_ids"] * ro["attention_mask"],
                attention_mask=attention,
                reward_score=score,
                num_turns=2,
                metrics=AgentLoopMetrics(),
                extra_fields={},
            )
        )
    data = AgentLoopWorker._postprocess(worker, outputs)
    data.non_tensor_batch["uid"] = np.array(UIDS, dtype=object)
    data.batch["token_level_rewards"] = data.batch["rm_scores"]
    return data


def _check_scaled(out, ref, gammas, response_mask, real_mask, sign="both"):
    """out == ref * gamma exactly where response_mask is set; == ref everywhere else; and
    some scaled, non-zero advantage got a gamma != 1 (the adapter did something)."""
    boosted = 0
    for i, g in enumerate(gammas):
        real = real_mask[i].bool()
        dense = torch.ones_like(ref[i])
        dense[real] = torch.from_numpy(g).to(ref.dtype)
        scaled = response_mask[i].bool()
        if sign == "positive_only":
            scaled = scaled & (ref[i] >= 0)
        expect = torch.where(scaled, ref[i] * dense, ref[i])
        torch.testing.assert_close(out[i], expect, rtol=0, atol=0)
        boosted += int((scaled & (dense != 1) & (ref[i] != 0)).sum())
    assert boosted > 0, "no advantage was scaled by a gamma != 1"


@pytest.mark.parametrize("sign", ["both", "positive_only"])
def test_legacy_compute_advantage_is_verl_grpo_times_gamma(client, sign):
    from verl.trainer.ppo import ray_trainer

    data = legacy_batch()
    assert isinstance(data.meta_info["metrics"], list)  # the agent loop's per-sample list
    ref = ray_trainer.compute_advantage(copy.deepcopy(data), adv_estimator="grpo")
    undo = ac_verl.install(client, sign=sign, sync=False, **PARAMS)
    try:
        out = ray_trainer.compute_advantage(data, adv_estimator="grpo")  # the fit loop's global
    finally:
        undo()
    b = data.batch
    P = b["prompts"].shape[1]
    real = b["attention_mask"][:, P:]
    gammas = _gammas(client, [(p, r) for p, r, _ in SAMPLES])
    _check_scaled(
        out.batch["advantages"], ref.batch["advantages"], gammas, b["response_mask"], real, sign
    )
    # tool output (row 1, positions 3..5) and padding keep verl's zeros
    assert (out.batch["advantages"][1, 3:6] == 0).all() and (
        out.batch["advantages"][2, 3:] == 0
    ).all()
    assert isinstance(out.meta_info["metrics"], list)  # left as verl made it, no TypeError
    assert out.meta_info["anchorcredit_metrics"]["anchorcredit/gamma_mean"] > 0


def test_apply_credit_alone_and_gae(client):
    from verl.trainer.ppo import ray_trainer

    data = legacy_batch()
    data.batch["values"] = (
        torch.linspace(-1, 1, data.batch["responses"].numel())
        .view_as(data.batch["responses"])
        .float()
    )
    ref = ray_trainer.compute_advantage(
        data, adv_estimator="gae", gamma=1.0, lam=0.95, config=OmegaConf.create({})
    )
    before = ref.batch["advantages"].clone()
    metrics = {}
    ac_verl.apply_credit(ref, client, metrics=metrics, **PARAMS)
    b = ref.batch
    real = b["attention_mask"][:, b["prompts"].shape[1] :]
    gammas = _gammas(client, [(p, r) for p, r, _ in SAMPLES])
    _check_scaled(b["advantages"], before, gammas, b["response_mask"], real)
    assert metrics["anchorcredit/gamma_min"] <= metrics["anchorcredit/gamma_mean"]
    assert metrics["anchorcredit/gamma_mean"] <= metrics["anchorcredit/gamma_max"]


def _legacy_trainer():
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer

    cfg = OmegaConf.create(
        {
            "actor_rollout_ref": {
                "rollout": {"multi_turn": {"enable": False}, "temperature": 1.0, "n": 2},
                "actor": {
                    "calculate_entropy": False,
                    "entropy_coeff": 0.0,
                    "ppo_mini_batch_size": 2,
                    "ppo_epochs": 1,
                    "data_loader_seed": 0,
                    "shuffle": False,
                },
            }
        }
    )
    trainer = object.__new__(RayPPOTrainer)
    trainer.config, trainer.distillation_config = cfg, None
    seen = []

    def update_actor(batch_td):  # a worker's reply: metrics lists per micro-batch
        seen.append(batch_td)
        return TensorDict({}, batch_size=[]).set_non_tensor(
            "metrics", {"pg_loss": [0.5, 0.25], "mfu": 0.1}
        )

    trainer.actor_rollout_wg = types.SimpleNamespace(update_actor=update_actor)
    return trainer, seen


def _masked(gammas, masks):
    """The gammas of the tokens whose advantage the adapter scales (verl's response_mask)."""
    return [g[np.asarray(m, bool)] for g, m in zip(gammas, masks, strict=True)]


def test_legacy_gamma_reaches_the_fit_loop_metrics(installed, check_step_summary):
    from verl.trainer.ppo import ray_trainer
    from verl.utils.metric import reduce_metrics

    ratios = []
    for _ in range(2):  # the same batch again: every score from the client's cache
        batch = ray_trainer.compute_advantage(legacy_batch(), adv_estimator="grpo")
        trainer, seen = _legacy_trainer()
        out = trainer._update_actor(batch)  # the real method, as fit() calls it
        logged = reduce_metrics(out.meta_info["metrics"])  # exactly what fit() does next
        assert seen and logged["actor/pg_loss"] == pytest.approx(0.375)
        gammas = _masked(
            _gammas(installed, [(p, r) for p, r, _ in SAMPLES]), [m for *_, m in SAMPLES]
        )
        ratios.append(logged["anchorcredit/cache_hit_ratio"])
        check_step_summary(logged, gammas, hit_ratio=ratios[-1])  # version "0": no step
    assert ratios == [0.0, 1.0]


# -- v1 trainer (the default, trainer.use_v1=true) -------------------------------------------
def v1_rows():
    """Keys `{uid}_{session}_{index}` and rows as AgentLoopWorkerTQ puts them
    (AgentLoopOutput.as_dict). Session b_1 has two outputs: a first turn (index 0) and the
    final one (index 1), whose GRPO advantage v1 re-broadcasts to the first."""
    from verl.experimental.agent_loop.agent_loop import AgentLoopMetrics, AgentLoopOutput

    sessions = [("a", 0, 0), ("b", 0, 0), ("a", 1, 0), ("b", 1, 1)]
    keys, rows = [], []
    for (p, r, m), score, (uid, sess, idx) in zip(SAMPLES, REWARDS, sessions, strict=True):
        d = AgentLoopOutput(
            prompt_ids=p,
            response_ids=r,
            response_mask=m,
            reward_score=score,
            metrics=AgentLoopMetrics(),
        ).as_dict()
        rows.append(
            {k: d[k] for k in ("prompts", "responses", "response_mask", "rm_scores")} | {"uid": uid}
        )
        keys.append(f"{uid}_{sess}_{idx}")
    first = AgentLoopOutput(
        prompt_ids=[9, 10],
        response_ids=[51, 52, 53, 54],
        response_mask=[1, 1, 0, 1],
        metrics=AgentLoopMetrics(),
    ).as_dict()
    rows.append({k: first[k] for k in ("prompts", "responses", "response_mask")})
    rows[-1] |= {"rm_scores": torch.zeros(4), "uid": "b"}
    keys.append("b_1_0")
    return keys, rows


class TransferQueueStub:
    """TransferQueue's kv_batch_get/kv_batch_put over an in-process store: what it returns
    is packed by TQ's own `_pack_field_values` (jagged nested), absent fields are left out
    as TQ does."""

    def __init__(self, keys, rows, partition_id="train"):
        self.store = {(partition_id, k): dict(r) for k, r in zip(keys, rows, strict=True)}

    def kv_batch_get(self, keys, partition_id, select_fields=None):
        from tensordict import NonTensorStack
        from transfer_queue.storage.managers.simple_storage_manager import AsyncSimpleStorageManager

        rows = [self.store[(partition_id, k)] for k in keys]
        names = [n for n in (select_fields or list(rows[0])) if all(n in r for r in rows)]
        out = {}
        for n in names:
            vals = [r[n] for r in rows]
            if isinstance(vals[0], torch.Tensor):
                out[n] = AsyncSimpleStorageManager._pack_field_values(vals)
            else:
                out[n] = NonTensorStack(*vals)
        return TensorDict(out, batch_size=len(keys))

    def kv_batch_put(self, keys, partition_id, fields=None, tags=None, data_parser=None):
        from transfer_queue import KVBatchMeta

        for name in fields.keys():
            v = fields[name]
            for k, row in zip(keys, v.unbind() if v.is_nested else list(v), strict=True):
                self.store[(partition_id, k)][name] = row
        return KVBatchMeta(keys=list(keys), tags=[{} for _ in keys], partition_id=partition_id)

    def get(self, keys, name, partition_id="train"):
        return [self.store[(partition_id, k)][name] for k in keys]


def _v1_run(monkeypatch, estimator="grpo", samples=None):
    """verl's real PPOTrainer._compute_advantage (whatever is installed) on v1 rows."""
    import transfer_queue as tq
    from transfer_queue import KVBatchMeta
    from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

    keys, rows = samples or v1_rows()
    stub = TransferQueueStub(keys, rows)
    monkeypatch.setattr(tq, "kv_batch_get", stub.kv_batch_get)
    monkeypatch.setattr(tq, "kv_batch_put", stub.kv_batch_put)
    trainer = object.__new__(PPOTrainerSync)
    trainer.config = OmegaConf.create(
        {
            "algorithm": {
                "use_kl_in_reward": False,
                "adv_estimator": estimator,
                "gamma": 1.0,
                "lam": 1.0,
                "norm_adv_by_std_in_grpo": True,
            },
            "actor_rollout_ref": {"rollout": {"n": 2}},
        }
    )
    meta = KVBatchMeta(keys=keys, tags=[{} for _ in keys], partition_id="train")
    metrics = {}
    out = trainer._compute_advantage(meta, metrics=metrics)
    return keys, rows, stub, out, metrics


def _v1_check(client, keys, rows, got, ref):
    gammas = _gammas(client, [(r["prompts"].numpy(), r["responses"].numpy()) for r in rows])
    boosted = 0
    for i, (g, a, r) in enumerate(zip(got, ref, rows, strict=True)):
        mask = r["response_mask"].bool()
        gamma = torch.from_numpy(gammas[i]).to(a.dtype)
        expect = torch.where(mask, a * gamma, a)
        torch.testing.assert_close(g, expect, rtol=0, atol=0, msg=keys[i])
        assert (g[~mask] == a[~mask]).all()
        boosted += int((mask & (gamma != 1) & (a != 0)).sum())
    assert boosted > 0, "no advantage was scaled by a gamma != 1"


def test_v1_compute_advantage_grpo_per_token_after_rebroadcast(
    client, monkeypatch, check_step_summary
):
    keys, rows, stub, _, _ = _v1_run(monkeypatch)  # verl alone
    ref = stub.get(keys, "advantages")
    for a, r in zip(ref, rows, strict=True):  # verl's v1 GRPO: one value per sequence
        assert len(set(a[r["response_mask"].bool()].tolist())) == 1
    undo = ac_verl.install(client, sync=False, **PARAMS)
    try:
        keys, rows, stub, out, metrics = _v1_run(monkeypatch)
    finally:
        undo()
    got = stub.get(keys, "advantages")
    _v1_check(client, keys, rows, got, ref)
    # per token, not collapsed to the first token's value by v1's re-broadcast
    assert len(set(got[0].tolist())) > 1
    assert out.keys == keys
    # the step's credit summary in the fit loop's metrics dict
    gammas = _gammas(client, [(r["prompts"].numpy(), r["responses"].numpy()) for r in rows])
    check_step_summary(metrics, _masked(gammas, [r["response_mask"] for r in rows]), hit_ratio=0.0)
    # and it survives the v1 fit loop's aggregation (MetricsAggregator in step())
    from verl.trainer.ppo.v1.utils import MetricsAggregator

    agg = MetricsAggregator()
    agg.add_step_metrics(metrics, sample_count=len(keys))
    aggregated = agg.get_aggregated_metrics()
    for name, value in metrics.items():
        assert aggregated[name] == pytest.approx(value, rel=1e-12), name


def test_v1_when_v1_imports_compute_advantage_after_install(client, monkeypatch):
    """v1's utils binds `compute_advantage` by name at import; re-importing it after
    install binds our wrapper, which must then leave the work to the v1 hook (no KeyError
    'responses', gamma applied once)."""
    import verl.trainer.ppo.v1.utils as v1_utils

    keys, rows, stub, _, _ = _v1_run(monkeypatch)
    ref = stub.get(keys, "advantages")
    undo = ac_verl.install(client, sync=False, **PARAMS)
    try:
        importlib.reload(v1_utils)  # v1 imported after install
        assert hasattr(v1_utils.compute_advantage, "__anchorcredit_wrapped__")
        keys, rows, stub, _, metrics = _v1_run(monkeypatch)
    finally:
        undo()
        importlib.reload(v1_utils)
    _v1_check(client, keys, rows, stub.get(keys, "advantages"), ref)
    assert "anchorcredit/gamma_mean" in metrics


def test_v1_gae_goes_through_too(client, monkeypatch):
    keys, rows = v1_rows()
    for r in rows:
        r["values"] = torch.linspace(-0.5, 0.5, len(r["responses"]))
    _, _, stub, _, _ = _v1_run(monkeypatch, "gae", copy.deepcopy((keys, rows)))
    ref = stub.get(keys, "advantages")
    undo = ac_verl.install(client, sync=False, **PARAMS)
    try:
        _, _, stub, _, _ = _v1_run(monkeypatch, "gae", copy.deepcopy((keys, rows)))
    finally:
        undo()
    _v1_check(client, keys, rows, stub.get(keys, "advantages"), ref)


def test_install_order_and_undo(client):
    """Modules imported before install are patched at once, later ones on import; undo
    restores verl's own functions."""
    import verl.trainer.ppo.ray_trainer as rt
    import verl.trainer.ppo.v1.trainer_base as tb

    own_adv, own_v1 = rt.compute_advantage, tb.PPOTrainer.__dict__["_compute_advantage"]
    undo = ac_verl.install(client, sync=False)
    ac_verl.install(client, sync=False)  # again: replaces, never wraps twice
    try:
        assert rt.compute_advantage.__anchorcredit_wrapped__ is own_adv
        assert tb.PPOTrainer.__dict__["_compute_advantage"].__wrapped__ is own_v1
        import verl.experimental.separation.ray_trainer as sep  # one-step-off / fully-async

        assert sep.compute_advantage is rt.compute_advantage
    finally:
        undo()
    assert (
        rt.compute_advantage is own_adv and tb.PPOTrainer.__dict__["_compute_advantage"] is own_v1
    )


def test_install_from_env_reads_the_runtime_env(monkeypatch):
    monkeypatch.setenv("ANCHORCREDIT_TARGETS", "127.0.0.1:1")
    monkeypatch.setenv("ANCHORCREDIT_SIGN", "positive_only")
    monkeypatch.setenv("ANCHORCREDIT_PARAMS", '{"q": 0.4}')
    monkeypatch.setenv("ANCHORCREDIT_SYNC", "0")
    ac_verl.install_from_env()
    try:
        cfg = ac_verl._CONFIG
        assert (cfg.sign, cfg.params, cfg.sync, cfg.client) == (
            "positive_only",
            {"q": 0.4},
            False,
            None,
        )
        assert cfg.get_client().targets == ["127.0.0.1:1"]  # built lazily, on first use
    finally:
        ac_verl.install(sync=False)()  # replace and undo: closes the client it built
    assert cfg.client is None


def test_install_from_env_names_the_variable_for_a_setting_in_params(monkeypatch):
    monkeypatch.setenv("ANCHORCREDIT_TARGETS", "127.0.0.1:1")
    monkeypatch.setenv("ANCHORCREDIT_PARAMS", '{"q": 0.4, "sign": "positive_only"}')
    with pytest.raises(ValueError, match="'sign' with ANCHORCREDIT_SIGN"):
        ac_verl.install_from_env()


def test_install_logs_each_patch_when_it_happens(client, caplog):
    import verl.trainer.ppo.ray_trainer  # noqa: F401  (loaded: patched at once)

    caplog.set_level("INFO", logger="anchorcredit.adapters")
    undo = ac_verl.install(client, sync=True)
    try:
        lines = [r.getMessage() for r in caplog.records if r.name == "anchorcredit.adapters"]
        assert any("patched verl.trainer.ppo.ray_trainer (compute_advantage" in x for x in lines)
        # every hook point is either patched now or announced for when verl imports it
        later = " ".join(x for x in lines if "will patch on import" in x)
        for module in ("verl.checkpoint_engine.base", "verl.workers.engine_workers"):
            assert any(f"patched {module} (" in x for x in lines) or module in later
    finally:
        undo()


@pytest.mark.slow
def test_the_setup_hook_installs_in_a_ray_worker_and_scales_there(client, target):
    """The Ray route runs for real, not only as configuration. A real local Ray (1 CPU,
    no dashboard) with the documented runtime env: the worker process runs our setup hook,
    verl's compute_advantage is patched there on import, and the advantages it returns from
    that process are verl's x gamma."""
    import os

    import ray
    from verl.trainer.ppo import ray_trainer

    data = legacy_batch()
    ref = ray_trainer.compute_advantage(copy.deepcopy(data), adv_estimator="grpo")  # verl alone
    ray.init(
        num_cpus=1,
        include_dashboard=False,
        object_store_memory=100 * 1024 * 1024,
        runtime_env={
            "worker_process_setup_hook": "anchorcredit.client.adapters.verl.install_from_env",
            "env_vars": {
                "ANCHORCREDIT_TARGETS": target,
                "ANCHORCREDIT_PARAMS": '{"q": 0.5}',
                "ANCHORCREDIT_SYNC": "0",
                "ANCHORCREDIT_STALE_POLICY": "frozen",
            },
        },
    )
    try:

        @ray.remote(num_cpus=1)
        class Trainer:  # stands in for verl's TaskRunner actor: imports verl, runs its step
            def run(self, batch):
                import os

                from verl.trainer.ppo import ray_trainer

                hooked = hasattr(ray_trainer.compute_advantage, "__anchorcredit_wrapped__")
                out = ray_trainer.compute_advantage(batch, adv_estimator="grpo")
                return os.getpid(), hooked, out

        pid, hooked, out = ray.get(Trainer.remote().run.remote(data), timeout=300)
    finally:
        ray.shutdown()
    assert pid != os.getpid() and hooked  # it ran in the actor's process, hooked there
    assert not hasattr(ray_trainer.compute_advantage, "__anchorcredit_wrapped__")  # not here
    b = data.batch
    real = b["attention_mask"][:, b["prompts"].shape[1] :]
    gammas = _gammas(client, [(p, r) for p, r, _ in SAMPLES])
    _check_scaled(
        out.batch["advantages"], ref.batch["advantages"], gammas, b["response_mask"], real
    )
    assert not torch.equal(out.batch["advantages"], ref.batch["advantages"])
    assert any((g != 1).any() for g in gammas)
    assert out.meta_info["anchorcredit_metrics"]["anchorcredit/gamma_max"] > 1.0
