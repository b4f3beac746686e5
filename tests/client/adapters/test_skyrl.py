"""SkyRL adapter against SkyRL 0.3.0's installed trainer code (`pip install --no-deps
skyrl==0.3.0`, its light imports from the dev extra) and a real anchorcredit service.

SkyRL's own code does the work: `SkyRLTrainConfig.from_cli_overrides` builds the config,
`RayPPOTrainer.convert_to_training_input` pads the generator output (its
`convert_prompts_responses_to_batch_tensors`, dp padding rows included),
`RayPPOTrainer.compute_advantages_and_returns` runs the estimator from SkyRL's
`AdvantageEstimatorRegistry` (built-in or registered here with SkyRL's decorator), and the
weight sync runs SkyRL's `WorkerDispatch.save_weights_for_sampler`,
`FSDPPolicyWorkerBase.broadcast_to_inference_engines` and `FSDPWeightExtractor` on a real
model in a one-process gloo group.

Stubbed, and only these (the GPU / Ray / vLLM boundaries): `flash_attn` (imported by
SkyRL's model wrapper; a GPU package), the vLLM inference client and its weight sender
(record what they get), the Ray actor group (runs the worker method in this process),
`ray.get` in the dispatch module and `torch.cuda.current_device` (the extractor's device: the
CPU here). SkyRL 0.3.0 is written for Python 3.12: on 3.11 its tinker
types module (`skyrl.tinker.types`, not part of the trainer) trips pydantic on a
`typing.TypedDict`, so that one module is imported with `typing_extensions.TypedDict`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import importlib.abc
import importlib.machinery
import sys
import types
import typing
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("skyrl", reason="pip install --no-deps skyrl==0.3.0 (+ the dev extra)")

from anchorcredit.client import CreditClient  # noqa: E402
from anchorcredit.client.adapters import skyrl as ac_skyrl  # noqa: E402
from anchorcredit.client.adapters import skyrl_sync  # noqa: E402
from anchorcredit.client.errors import StalePolicyVersionError  # noqa: E402

ESTIMATORS = ("grpo", "gae", "rloo", "reinforce++", "maxrl")
PARAMS = {"q": 0.5}

# Generator output as SkyRL's generator returns it: rows 2 and 5 are multi-turn (an
# observation inside the response: loss mask 0), the reward sits on the last token.
PROMPTS = [[5, 6, 7], [5, 6, 7], [9, 10], [9, 10], [11, 12, 13, 14], [11, 12, 13, 14]]
RESPONSES = [
    [20, 21, 22, 1],
    [23, 24, 25, 26, 1],
    [25, 26, 27, 28, 29, 30, 1],
    [31, 32, 1],
    [33, 34, 35, 36, 37, 1],
    [38, 39, 40, 41, 42, 43, 44, 1],
]
LOSS_MASKS = [
    [1, 1, 1, 1],
    [1, 1, 1, 1, 1],
    [1, 1, 0, 0, 1, 1, 1],
    [1, 1, 1],
    [1, 1, 1, 1, 1, 1],
    [1, 1, 1, 0, 0, 0, 1, 1],
]
SCORES = [1.0, 0.0, 0.0, 1.0, 1.0, 0.5]
UIDS = ["a", "a", "b", "b", "c", "c"]


class _FlashAttnStub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`flash_attn` (a CUDA package SkyRL's model wrapper imports): placeholder attributes."""

    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] == "flash_attn":
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = lambda name: (_ for _ in ()).throw(AttributeError(name))
        for name in ("pad_input", "unpad_input", "index_first_axis", "rearrange"):
            setattr(module, name, lambda *a, **k: None)
        return module

    def exec_module(self, module):
        pass


@pytest.fixture(scope="module")
def sky():
    """SkyRL's trainer modules (see the module docstring for the two import shims)."""
    import typing_extensions

    before = set(sys.modules)
    finder = _FlashAttnStub()
    sys.meta_path.insert(0, finder)
    original = typing.TypedDict
    typing.TypedDict = typing_extensions.TypedDict
    try:
        import skyrl.tinker.types  # noqa: F401
    finally:
        typing.TypedDict = original
    try:
        import skyrl.backends.skyrl_train.utils.ppo_utils as ppo_utils
        import skyrl.backends.skyrl_train.workers.fsdp.fsdp_worker as fsdp_worker
        import skyrl.backends.skyrl_train.workers.worker_dispatch as worker_dispatch
        import skyrl.train.trainer as trainer
        from skyrl.train.config import SkyRLTrainConfig

        yield types.SimpleNamespace(
            trainer=trainer,
            ppo_utils=ppo_utils,
            fsdp_worker=fsdp_worker,
            worker_dispatch=worker_dispatch,
            Config=SkyRLTrainConfig,
        )
    finally:
        sys.meta_path.remove(finder)
        for name in set(sys.modules) - before:
            if name.split(".")[0] in ("skyrl", "flash_attn"):
                del sys.modules[name]


@pytest.fixture(autouse=True)
def uninstalled():
    yield
    ac_skyrl.install(sync=False)()  # whatever a test installed: undone


def config(sky, estimator: str = "grpo", *overrides: str):
    return sky.Config.from_cli_overrides(
        [
            f"trainer.algorithm.advantage_estimator={estimator}",
            "generator.n_samples_per_prompt=2",
            "trainer.train_batch_size=3",
            "trainer.policy_mini_batch_size=3",
            *overrides,
        ]
    )


def trainer_and_batch(sky, cfg, dp_size: int = 4, step_wise: list[bool] | None = None):
    """SkyRL's RayPPOTrainer (no Ray actors built) and the batch its own
    convert_to_training_input makes of the generator output (padded to dp_size rows)."""
    trainer = object.__new__(sky.trainer.RayPPOTrainer)
    trainer.cfg = cfg
    trainer.all_metrics = {}
    trainer.tokenizer = types.SimpleNamespace(pad_token_id=0)
    trainer.dispatch = types.SimpleNamespace(get_lcm_dp_size=lambda: dp_size)
    output = {
        "prompt_token_ids": copy.deepcopy(PROMPTS),
        "response_ids": copy.deepcopy(RESPONSES),
        "rewards": [[0.0] * (len(r) - 1) + [s] for r, s in zip(RESPONSES, SCORES, strict=True)],
        "loss_masks": copy.deepcopy(LOSS_MASKS),
    }
    if step_wise is not None:
        output["is_last_step"] = step_wise
    data = trainer.convert_to_training_input(output, list(UIDS))
    r = data["response_mask"].shape[1]
    data["values"] = torch.linspace(-0.5, 0.5, data["sequences"].shape[0] * r).view(-1, r)
    return trainer, data


def expected(checker, ref, data, sign="both", **params):
    """SkyRL's advantages x gamma at the loss-mask positions of the real rows, gamma asked
    of the service for each (prompt, response) straight from the generator output."""
    res = checker.score(PROMPTS, RESPONSES, **params)
    want = ref["advantages"].clone()
    r = want.shape[1]
    boosted = 0
    for i, (resp, x) in enumerate(zip(RESPONSES, res, strict=True)):
        g = torch.from_numpy(np.asarray(x.gamma))
        for j in range(len(resp)):
            pos = r - len(resp) + j
            a = ref["advantages"][i, pos]
            if data["loss_mask"][i, pos] and (sign == "both" or a >= 0):
                want[i, pos] = a * g[j]
                boosted += int(g[j] != 1 and a != 0)
    return want, boosted


def reweighted_gammas(checker, **params) -> list[np.ndarray]:
    """The gamma of each token whose advantage the adapter scales (SkyRL's loss mask)."""
    res = checker.score(PROMPTS, RESPONSES, **params)
    return [np.asarray(x.gamma)[np.asarray(m, bool)] for x, m in zip(res, LOSS_MASKS, strict=True)]


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_advantages_are_skyrls_times_gamma(sky, target, estimator, check_step_summary):
    cfg = config(sky, estimator)
    trainer, data = trainer_and_batch(sky, cfg)
    pad = data.metadata["pad_size"]
    assert pad == 2  # SkyRL padded 6 rows to the dp size: those rows must be left alone
    ref = trainer.compute_advantages_and_returns(copy.deepcopy(data))  # SkyRL alone
    with (
        CreditClient([target], cache=None) as client,
        CreditClient([target], cache=False) as checker,
    ):
        ac_skyrl.install(client, sync=False, **PARAMS)
        got = trainer.compute_advantages_and_returns(copy.deepcopy(data))
        logged = [dict(trainer.all_metrics)]
        trainer.all_metrics = {}  # SkyRL's loop: logged, then cleared, once per step
        trainer.compute_advantages_and_returns(copy.deepcopy(data))  # the same batch again
        logged.append(dict(trainer.all_metrics))
        want, boosted = expected(checker, ref, data, **PARAMS)
        gammas = reweighted_gammas(checker, **PARAMS)
    # the step's credit summary in SkyRL's metrics (the dp padding rows are not data);
    # the repeated batch is scored from the client's cache; version "0": no step number
    for metrics, hits in zip(logged, (0.0, 1.0), strict=True):
        check_step_summary(metrics, gammas, hit_ratio=hits)
    torch.testing.assert_close(got["advantages"], want, rtol=0, atol=0)
    assert boosted > 0  # gamma != 1 on positions whose advantage it scaled
    assert not torch.equal(got["advantages"], ref["advantages"])
    assert torch.equal(got["advantages"][-pad:], ref["advantages"][-pad:])  # dp padding
    assert torch.equal(got["returns"], ref["returns"])
    # observation tokens inside a multi-turn response keep SkyRL's value
    obs = ~data["loss_mask"].bool()
    assert torch.equal(got["advantages"][obs], ref["advantages"][obs])
    assert logged[0]["anchorcredit/gamma_mean"] > 1.0


def test_a_custom_registry_estimator_and_positive_only(sky, target):
    """An estimator registered with SkyRL's own decorator is covered too (the hook sits
    after whichever estimator the registry returns)."""
    registry = sky.ppo_utils.AdvantageEstimatorRegistry

    @sky.ppo_utils.register_advantage_estimator("anchorcredit_test_signed")
    def signed(token_level_rewards, response_mask, index, **kwargs):
        score = token_level_rewards.sum(-1, keepdim=True) - 0.5  # both signs
        return score * response_mask, score * response_mask

    try:
        cfg = config(sky, "anchorcredit_test_signed")
        trainer, data = trainer_and_batch(sky, cfg)
        ref = trainer.compute_advantages_and_returns(copy.deepcopy(data))
        assert (ref["advantages"] < 0).any() and (ref["advantages"] > 0).any()
        with (
            CreditClient([target]) as client,
            CreditClient([target], cache=False) as checker,
        ):
            ac_skyrl.install(client, sync=False, sign="positive_only", **PARAMS)
            got = trainer.compute_advantages_and_returns(copy.deepcopy(data))
            want, boosted = expected(checker, ref, data, sign="positive_only", **PARAMS)
        torch.testing.assert_close(got["advantages"], want, rtol=0, atol=0)
        assert boosted > 0
        neg = ref["advantages"] < 0
        assert torch.equal(got["advantages"][neg], ref["advantages"][neg])
    finally:
        registry.unregister("anchorcredit_test_signed")


def test_step_wise_trajectories(sky, target):
    """Step-wise training: SkyRL computes each trajectory's advantage on its last step and
    broadcasts it to every step; gamma then applies per step, on each step's own tokens."""
    cfg = config(sky, "grpo", "generator.step_wise_trajectories=true")
    trainer, data = trainer_and_batch(
        sky, cfg, dp_size=1, step_wise=[False, True, True, False, True, True]
    )
    ref = trainer.compute_advantages_and_returns(copy.deepcopy(data))
    with CreditClient([target]) as client, CreditClient([target], cache=False) as checker:
        ac_skyrl.install(client, sync=False, **PARAMS)
        got = trainer.compute_advantages_and_returns(copy.deepcopy(data))
        want, boosted = expected(checker, ref, data, **PARAMS)
    torch.testing.assert_close(got["advantages"], want, rtol=0, atol=0)
    assert boosted > 0


# -- weight sync ---------------------------------------------------------------------------
class InferenceClient:
    """SkyRL's inference-engine client (vLLM servers), as save_weights_for_sampler calls it."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def pause_generation(self):
        self.calls.append("pause")

    async def resume_generation(self):
        self.calls.append("resume")

    async def wake_up(self, tags=None):
        self.calls.append("wake_up")

    def increment_weight_version(self):
        self.calls.append("version+1")

    async def reset_prefix_cache(self, reset_running_requests=False):
        self.calls.append("reset_prefix_cache")


class Sender:
    """The NCCL sender to vLLM: records the chunks SkyRL sends."""

    def __init__(self) -> None:
        self.sent: list[dict[str, torch.Tensor]] = []  # one dict per sync

    async def send_chunks(self, chunks, weight_metadata=None):
        self.sent.append(
            {n: t.clone() for c in chunks for n, t in zip(c.names, c.tensors, strict=True)}
        )


@pytest.fixture
def synced(sky, served_model, monkeypatch, free_port):
    """(client, dispatch, worker, model, sender): SkyRL's dispatch and FSDP policy worker,
    hooked, over a real model in a one-process gloo group."""
    from transformers import AutoModelForCausalLM

    path, target = served_model
    dist = torch.distributed
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    monkeypatch.setenv("ANCHORCREDIT_RUN_ID", "sk1")
    monkeypatch.setattr(sky.worker_dispatch.ray, "get", lambda refs: refs)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")  # the extractor's device
    client = CreditClient([target], cache=None, replica_wait_s=0.2)
    ac_skyrl.install(client, **PARAMS)  # sync on (grpc)
    cfg = config(sky, "grpo", "generator.inference_engine.model_dtype=float32")
    model = AutoModelForCausalLM.from_pretrained(path)
    worker = object.__new__(sky.fsdp_worker.FSDPPolicyWorkerBase)
    worker.cfg = cfg.trainer
    worker._is_lora = False
    worker.model = types.SimpleNamespace(model=model)
    worker.weight_extractor = sky.fsdp_worker.FSDPWeightExtractor(model)  # SkyRL's own
    worker._weight_transfer_sender = sender = Sender()

    class PolicyGroup:  # the Ray actor group: the worker's method, run here
        def async_run_ray_method(self, how, method, *args, **kwargs):
            coro = getattr(worker, method)(*args, **kwargs)
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                return [pool.submit(asyncio.run, coro).result()]

    dispatch = object.__new__(sky.worker_dispatch.WorkerDispatch)
    dispatch.cfg = cfg
    dispatch.colocate_all = False
    dispatch._actor_groups = {"policy": PolicyGroup()}
    dispatch._inference_engine_client = InferenceClient()
    try:
        yield client, dispatch, worker, model, sender
    finally:
        client.close()
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def served_model(llama_model, start_server):
    path = llama_model
    s = start_server(path)
    yield path, s.target
    s.stop()


@pytest.mark.slow
def test_weight_sync_rides_skyrls_save_weights_for_sampler(sky, synced, monkeypatch, tmp_path):
    client, dispatch, _, model, sender = synced
    asyncio.run(dispatch.save_weights_for_sampler())  # SkyRL: before training
    assert client.model_info(refresh=True).policy_version == "step-0-sk1"
    assert skyrl_sync.PIN.version == "step-0-sk1" == skyrl_sync.PUSHED.version
    calls = dispatch._inference_engine_client.calls
    assert calls == ["pause", "reset_prefix_cache", "resume", "version+1"]
    assert set(sender.sent[0]) == set(model.state_dict())  # vLLM got its weights too

    cfg = config(sky, "grpo")
    trainer, data = trainer_and_batch(sky, cfg)
    scored = []
    real_score = client.score

    def spy(*a, **kw):
        scored.append(kw.get("policy_version"))
        return real_score(*a, **kw)

    monkeypatch.setattr(client, "score", spy)
    trainer.compute_advantages_and_returns(copy.deepcopy(data))
    assert scored == ["step-0-sk1"]
    assert trainer.all_metrics["anchorcredit/policy_step"] == 0  # the version's step

    with torch.no_grad():  # "the optimizer step"
        for p in model.parameters():
            p.add_(0.01)
    asyncio.run(dispatch.save_weights_for_sampler())  # SkyRL: after the step
    assert client.model_info(refresh=True).policy_version == "step-1-sk1"
    # the service now serves exactly what vLLM was sent
    from anchorcredit.runner import Scorer

    ids_p, ids_r = [[3, 4, 5, 6]], [[7, 8, 9, 10, 11, 12]]
    tuned = sender.sent[1]
    model.load_state_dict(tuned)
    model.save_pretrained(tmp_path / "sent")
    ref = Scorer.from_pretrained(tmp_path / "sent").score(list(zip(ids_p, ids_r, strict=True)))
    got = real_score(ids_p, ids_r, policy_version="step-1-sk1")
    np.testing.assert_array_equal(got[0].gamma, ref[0].gamma)
    trainer.compute_advantages_and_returns(copy.deepcopy(data))
    assert scored == ["step-0-sk1", "step-1-sk1"]
    assert trainer.all_metrics["anchorcredit/policy_step"] == 1
    assert trainer.all_metrics["anchorcredit/cache_hit_ratio"] == 0.0  # new weights: no hits

    # another writer moves the service on: a new batch pinned to step-1 is refused, never
    # scored with them (step-1's results already in the client's cache stay step-1's)
    with CreditClient(client.targets) as other:
        other.push_weights(tuned, "someone-else")
    new = copy.deepcopy(data)
    new["sequences"] = new["sequences"] + 60 * new["attention_mask"]  # other token ids
    with pytest.raises(StalePolicyVersionError):
        trainer.compute_advantages_and_returns(new)
    # and a sync the workers did not push is caught before anything is scored
    dispatch._actor_groups["policy"].async_run_ray_method = lambda *a, **k: [None]
    with pytest.raises(skyrl_sync.WeightSyncError, match="someone-else"):
        asyncio.run(dispatch.save_weights_for_sampler())


def test_lora_policy_is_refused(sky, synced):
    _, dispatch, worker, _, _ = synced
    worker._is_lora = True
    with pytest.raises(RuntimeError, match="LoRA"):
        asyncio.run(dispatch.save_weights_for_sampler())


def test_the_documented_launch(sky, monkeypatch):
    """docs/trainers/skyrl.md: SkyRL's own config parser takes the overrides; Ray merges the
    job's runtime env with the one SkyRL's initialize_ray passes; the setup hook it names,
    run with those variables, configures the adapter."""
    import importlib
    import json
    import shlex

    from ray.runtime_env.runtime_env import _merge_runtime_env
    from skyrl.train.utils.utils import prepare_runtime_environment

    doc = (Path(__file__).parents[3] / "docs" / "trainers" / "skyrl.md").read_text()
    block = doc.split("```bash\n", 1)[1].split("```", 1)[0]
    runtime_env = json.loads(block.split("--runtime-env-json '", 1)[1].split("'", 1)[0])
    command = block.split("-- python -m skyrl.train.entrypoints.main_base", 1)[1]
    cfg = sky.Config.from_cli_overrides(shlex.split(command.replace("\\\n", " ")))
    assert cfg.trainer.algorithm.advantage_estimator == "grpo"
    assert cfg.generator.n_samples_per_prompt == 8
    # what SkyRL's initialize_ray passes to ray.init, merged with the job's as Ray does
    merged = _merge_runtime_env(runtime_env, {"env_vars": prepare_runtime_environment(cfg)})
    assert merged is not None and merged["worker_process_setup_hook"].endswith("install_from_env")
    assert merged["env_vars"]["ANCHORCREDIT_TARGETS"] == "credit-svc:50051"
    module, name = runtime_env["worker_process_setup_hook"].rsplit(".", 1)
    hook = getattr(importlib.import_module(module), name)
    assert hook is ac_skyrl.install_from_env
    for key, value in runtime_env["env_vars"].items():
        assert f"`{key}`" in doc  # every variable is in the table
        monkeypatch.setenv(key, value)
    hook()
    config = ac_skyrl._CONFIG
    assert config.sync and config.client is None  # built on first use
    assert config.kwargs["strategy"] == "coupled_rhythm" and config.kwargs["q"] == 0.4
    assert config.get_client().targets == ["credit-svc:50051"]
