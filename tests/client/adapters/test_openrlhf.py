"""OpenRLHF adapter against OpenRLHF 0.11.2's installed source and a real anchorcredit service.

OpenRLHF's own code does the work: its CLI parser (`openrlhf.cli.train_ppo_ray`) builds the
args, `SamplesGenerator._process_response_into_experience` turns rollouts into Experiences,
`RemoteExperienceMaker.split_rollout_samples` pads them into micro-batches, the real base
class's `compute_advantages_and_returns` computes the advantages the adapter reweights,
`BasePPOTrainer.__init__` / `broadcast_to_vllm` and `ActorPPOTrainer.__init__` /
`broadcast_to_vllm` run the weight sync, `BasePPOTrainer.train_step` returns the step status
that carries the credit summary, `openrlhf.models.Actor` loads the HF model.

Stubbed, and only these (the GPU / Ray / vLLM / DeepSpeed boundaries):
- import stubs for `deepspeed`, `vllm`, `flash_attn` (GPU packages, not installable here);
  ZeRO-3 is a one-process stand-in (`Zero3`): partitioned parameters hold an empty tensor
  and `deepspeed.zero.GatheredParameters` puts the full value back while inside;
  `DeepSpeedEngine` is a wrapper module with `.module`, as DeepSpeed's;
- Ray: `ray.get` inside OpenRLHF's modules returns its argument, and the actor group calls
  the actor's method in this process (or, for `train_step`, records `append` and returns
  the status of the actor's `fit`: PPO training on GPU actors);
- vLLM: engines record `update_weight` calls, the vLLM process group records broadcasts;
- CUDA: `torch_dist_barrier_and_cuda_sync` is the barrier of a one-process gloo group,
  `torch.cuda.current_stream` returns None and `torch.cuda.current_device` 0;
- the actor/reference forward passes (GPU Ray actors) that fill `kl`: random values;
- the tokenizer: only `pad_token_id` is read (the debug model ships none), and `decode`
  of the sample train_step logs.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.abc
import importlib.machinery
import inspect
import json
import runpy
import shlex
import sys
import types
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from anchorcredit.client import CreditClient  # noqa: E402
from anchorcredit.client.adapters import openrlhf as ac_orl  # noqa: E402
from anchorcredit.client.adapters import openrlhf_sync as ac_sync  # noqa: E402
from anchorcredit.client.errors import StalePolicyVersionError  # noqa: E402

STUBBED = ("deepspeed", "vllm", "flash_attn")
N_SAMPLES = 2  # rollouts per prompt (the group of group_norm / rloo / ...)
ESTIMATORS = ("group_norm", "reinforce_baseline", "rloo", "dr_grpo", "reinforce")


# -- the GPU-package boundary ---------------------------------------------------------------
class _StubModule(types.ModuleType):
    """Any attribute is a placeholder class (what importing OpenRLHF needs of it)."""

    def __getattr__(self, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        value = type(name, (), {"__module__": self.__name__})
        setattr(self, name, value)
        return value


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] in STUBBED:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


class Zero3:
    """One-process stand-in for DeepSpeed ZeRO-3: partition() empties every parameter (the
    full value kept aside as `ds_full`); GatheredParameters restores it while inside."""

    def __init__(self) -> None:
        self.gathered = 0  # parameters gathered, summed over calls

    @staticmethod
    def partition(model) -> None:
        for p in model.parameters():
            p.ds_id, p.ds_shape, p.ds_full = id(p), p.shape, p.data
            p.data = torch.empty(0, dtype=p.dtype)

    @contextlib.contextmanager
    def GatheredParameters(self, params, modifier_rank=None, fwd_module=None, enabled=True):
        params = [p for p in params if hasattr(p, "ds_id")] if enabled else []
        for p in params:
            p.data = p.ds_full
        self.gathered += len(params)
        try:
            yield
        finally:
            for p in params:
                p.ds_full, p.data = p.data, torch.empty(0, dtype=p.dtype)


@pytest.fixture(scope="module")
def orl():
    """OpenRLHF's modules, imported with the GPU packages stubbed; undone afterwards."""
    before = set(sys.modules)
    finder = _StubFinder()
    sys.meta_path.insert(0, finder)
    zero3 = Zero3()
    try:
        import deepspeed

        deepspeed.zero = types.SimpleNamespace(GatheredParameters=zero3.GatheredParameters)
        deepspeed.DeepSpeedEngine = type(
            "DeepSpeedEngine",
            (torch.nn.Module,),
            {"__init__": _engine_init, "__module__": "deepspeed"},
        )
        import openrlhf.trainer.ppo_trainer as ppo_trainer
        import openrlhf.trainer.ppo_utils.experience_maker as experience_maker
        import openrlhf.trainer.ppo_utils.samples_generator as samples_generator
        import openrlhf.trainer.ray.ppo_actor as ppo_actor
        from openrlhf.models import Actor
        from openrlhf.trainer.ppo_utils.kl_controller import FixedKLController

        yield types.SimpleNamespace(
            ppo_trainer=ppo_trainer,
            ppo_actor=ppo_actor,
            experience_maker=experience_maker,
            samples_generator=samples_generator,
            Actor=Actor,
            FixedKLController=FixedKLController,
            DeepSpeedEngine=deepspeed.DeepSpeedEngine,
            zero3=zero3,
        )
    finally:
        ac_orl.uninstall()
        sys.meta_path.remove(finder)
        for name in set(sys.modules) - before:
            if name.split(".")[0] in (*STUBBED, "openrlhf"):
                del sys.modules[name]


def _engine_init(self, module):
    torch.nn.Module.__init__(self)
    self.module = module


def cli_args(orl, estimator: str, model_dir: str = "unused", **flags: str):
    """OpenRLHF's own parsed and validated args for a small train_ppo_ray command line."""
    argv = {
        "--actor.model_name_or_path": model_dir,
        "--algo.advantage.estimator": estimator,
        "--rollout.n_samples_per_prompt": str(N_SAMPLES),
        "--rollout.batch_size": "4",
        "--rollout.micro_batch_size": "4",
        "--train.batch_size": "8",
        "--train.micro_batch_size": "2",
        "--actor.num_gpus_per_node": "1",
        "--vllm.num_engines": "1",
        "--data.prompt_dataset": "unused",
        "--reward.remote_url": "http://unused",
        **flags,
    }
    return parse_cli([x for kv in argv.items() for x in kv])


def parse_cli(argv: list[str]):
    """Run train_ppo_ray's __main__ (OpenRLHF's parser and its checks) on `argv`, stopped at
    ray.init; returns the args it built."""
    import openrlhf.utils.config as config
    import ray

    captured = {}
    real = config.hierarchize

    def spy(ns):
        captured["args"] = real(ns)
        return captured["args"]

    class Stop(Exception):
        pass

    def no_ray(*a, **k):
        raise Stop

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(config, "hierarchize", spy)
        mp.setattr(ray, "is_initialized", lambda: False)
        mp.setattr(ray, "init", no_ray)
        mp.setattr(sys, "argv", ["train_ppo_ray", *argv])
        with pytest.raises(Stop):
            runpy.run_module("openrlhf.cli.train_ppo_ray", run_name="__main__")
    return captured["args"]


# -- rollouts -> OpenRLHF Experiences -------------------------------------------------------
def rollouts(seed: int = 5) -> list[dict]:
    """vLLM-engine outputs as OpenRLHF's SamplesGenerator receives them: prompt tokens, then
    actions; sample 1 is multi-turn (a 2-token tool observation between two action spans)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(3 * N_SAMPLES):
        prompt = rng.integers(3, 256, 4 + 3 * (i // N_SAMPLES)).tolist()
        if i == 1:
            acts = [rng.integers(3, 256, 3).tolist(), rng.integers(3, 256, 4).tolist()]
            tokens, ranges, pos = list(prompt), [], len(prompt)
            for k, a in enumerate(acts):
                if k:
                    tokens += rng.integers(3, 256, 2).tolist()  # tool output
                    pos += 2
                tokens += a
                ranges.append((pos, pos + len(a)))
                pos += len(a)
        else:
            resp = rng.integers(3, 256, int(rng.integers(5, 12))).tolist()
            tokens, ranges = prompt + resp, [(len(prompt), len(prompt) + len(resp))]
        out.append(
            {
                "observation_tokens": tokens,
                "action_ranges": ranges,
                "reward": float(rng.normal()),
                "scores": 0.0,
                "rollout_log_probs": None,
                "prompt": f"p{i // N_SAMPLES}",
                "label": "",
            }
        )
    return out


def experiences(orl, args, raw: list[dict]):
    """Experiences as OpenRLHF's make_experience_batch has them before advantages."""
    strategy = types.SimpleNamespace(args=args)
    tokenizer = types.SimpleNamespace(pad_token_id=0)
    gen = orl.samples_generator.SamplesGenerator(strategy, None, None, tokenizer, [])
    samples = [gen._process_response_into_experience(r) for r in raw]
    maker = orl.experience_maker.RemoteExperienceMaker(
        None, None, None, None, orl.FixedKLController(args.algo.kl.init_coef), strategy, tokenizer
    )
    exps = maker.split_rollout_samples(samples)
    gen_rng = torch.Generator().manual_seed(0)
    for e in exps:  # what the actor/reference forward passes would add (GPU Ray actors)
        e.kl = torch.rand(e.action_mask.shape, generator=gen_rng) * 0.1
    return exps, strategy, tokenizer


def expected_gamma(client: CreditClient, raw: list[dict]) -> list[tuple[int, np.ndarray]]:
    """(sequence index of the first response token, gamma per response token) of each
    rollout, scored straight from the raw tokens."""
    spans = []
    for r in raw:
        first, end = r["action_ranges"][0][0], r["action_ranges"][-1][1]
        spans.append((first, r["observation_tokens"][:first], r["observation_tokens"][first:end]))
    res = client.score([p for _, p, _ in spans], [s for _, _, s in spans])
    return [
        (first, np.asarray(x.gamma, np.float32))
        for (first, _, _), x in zip(spans, res, strict=True)
    ]


def check_reweighted(before, after, raw, gammas, sign: str = "both") -> int:
    """after == before x gamma exactly at action positions; identical everywhere else
    (prompt, tool tokens, padding). Returns how many action positions were checked."""
    checked = boosted = 0
    for eb, ea in zip(before, after, strict=True):
        assert ea.advantages.shape == eb.advantages.shape
        assert ea.advantages.dtype == eb.advantages.dtype
        want = eb.advantages.clone()
        for row, idx in enumerate(ea.index):
            first, g = gammas[idx]
            for j in torch.nonzero(eb.action_mask[row]).flatten().tolist():
                a = eb.advantages[row, j]
                if sign == "both" or a >= 0:
                    want[row, j] = a * torch.tensor(g[j + 1 - first])
                    boosted += int(g[j + 1 - first] != 1 and a != 0)
                checked += 1
            n_tokens = len(raw[idx]["observation_tokens"])
            assert int(eb.attention_mask[row].sum()) == n_tokens
        torch.testing.assert_close(ea.advantages, want, rtol=0, atol=0)
        assert torch.equal(ea.returns, eb.returns)
        assert ea.info.keys() == eb.info.keys()  # the credit summary goes to the step status
    assert boosted > 0, "no advantage was scaled by a gamma != 1"
    return checked


# -- advantages ------------------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_advantages_are_openrlhfs_times_gamma(orl, target, estimator):
    args = cli_args(orl, estimator)
    raw = rollouts()
    exps, strategy, tokenizer = experiences(orl, args, raw)
    kl = orl.FixedKLController(args.algo.kl.init_coef)
    base = orl.experience_maker.RemoteExperienceMaker(
        None, None, None, None, kl, strategy, tokenizer
    )
    ref = base.compute_advantages_and_returns(copy.deepcopy(exps))
    with CreditClient([target]) as client:
        cls = ac_orl.experience_maker_class(client, strategy="coupled_rhythm")
        assert cls.__mro__[1] is orl.experience_maker.RemoteExperienceMaker
        maker = cls(None, None, None, None, kl, strategy, tokenizer)
        got = maker.compute_advantages_and_returns(copy.deepcopy(exps))
        gammas = expected_gamma(client, raw)
    assert len(exps) == 2 and exps[0].sequences.shape[1] != exps[1].sequences.shape[1]
    assert check_reweighted(ref, got, raw, gammas) == sum(
        sum(e - s for s, e in r["action_ranges"]) for r in raw
    )
    # the multi-turn rollout's tool tokens are in the span but keep OpenRLHF's advantage
    row = got[0].index.index(1)
    first = raw[1]["action_ranges"][0][1] - 1  # action index of the first tool token
    tool = slice(first, first + 2)
    assert not ref[0].action_mask[row, tool].any()
    assert torch.equal(got[0].advantages[row, tool], ref[0].advantages[row, tool])
    assert any(not np.allclose(g, 1.0) for _, g in gammas)  # gamma is not a no-op here


def test_positive_only_leaves_negative_advantages(orl, target):
    args = cli_args(orl, "group_norm")
    raw = rollouts(seed=9)
    exps, strategy, tokenizer = experiences(orl, args, raw)
    kl = orl.FixedKLController(args.algo.kl.init_coef)
    ref = orl.experience_maker.RemoteExperienceMaker(
        None, None, None, None, kl, strategy, tokenizer
    ).compute_advantages_and_returns(copy.deepcopy(exps))
    with CreditClient([target]) as client:
        cls = ac_orl.experience_maker_class(client, sign="positive_only")
        got = cls(None, None, None, None, kl, strategy, tokenizer).compute_advantages_and_returns(
            copy.deepcopy(exps)
        )
        gammas = expected_gamma(client, raw)
    check_reweighted(ref, got, raw, gammas, sign="positive_only")
    assert any((e.advantages < 0).any() for e in ref)


def reweighted_gammas(checker: CreditClient, raw: list[dict]) -> list[np.ndarray]:
    """The gamma of each action token (the tokens whose advantage the adapter scales)."""
    out = []
    for (first, g), r in zip(expected_gamma(checker, raw), raw, strict=True):
        actions = np.concatenate([np.arange(s, e) for s, e in r["action_ranges"]])
        out.append(g[actions - first])
    return out


class ActorGroupAtFit:
    """The actor Ray group as the controller's train_step drives it: `append` the
    experiences to its replay buffer, then `fit` returns the actor's status (GPU actors)."""

    def __init__(self) -> None:
        self.appended: list = []

    def async_run_method_batch(self, method_name, experience):
        assert method_name == "append"
        self.appended.append(experience)
        return []

    def async_run_method(self, method_name, **kwargs):
        assert method_name == "fit"
        return [{"policy_loss": 0.25}]


def test_the_step_summary_joins_openrlhfs_step_status(orl, target, monkeypatch, check_step_summary):
    """OpenRLHF's own BasePPOTrainer.train_step (the sync and async trainers' step): the
    status it returns, which fit() logs and hands to wandb / TensorBoard, carries the credit
    summary over every micro-batch of the step; the same rollouts again come from the cache."""
    args = cli_args(orl, "group_norm")
    raw = rollouts(seed=13)
    strategy = types.SimpleNamespace(args=args)
    tokenizer = types.SimpleNamespace(
        pad_token_id=0, decode=lambda ids, skip_special_tokens=True: ["sample"]
    )
    gen = orl.samples_generator.SamplesGenerator(strategy, None, None, tokenizer, [])
    samples = [gen._process_response_into_experience(r) for r in raw]
    same = types.SimpleNamespace(get=lambda refs: refs, put=lambda x: x)
    monkeypatch.setattr(orl.ppo_trainer, "ray", same)
    gen_rng = torch.Generator().manual_seed(0)

    def make_experience(samples_list):  # the actor/reference forward passes (GPU actors)
        for e in samples_list:
            e.kl = torch.rand(e.action_mask.shape, generator=gen_rng) * 0.1
        return samples_list

    with CreditClient([target]) as client, CreditClient([target], cache=False) as checker:
        ac_orl.install(client, weight_sync=None, strategy="coupled_rhythm")
        try:
            group = ActorGroupAtFit()
            controller = orl.ppo_trainer.BasePPOTrainer(
                strategy, group, None, None, None, None, tokenizer
            )
            monkeypatch.setattr(controller.experience_maker, "make_experience", make_experience)
            statuses = []
            for step in (1, 2):
                status, next_step = controller.train_step(copy.deepcopy(samples), step)
                assert next_step == step + 1 and len(group.appended) == step
                statuses.append(status)
        finally:
            ac_orl.uninstall()
        gammas = reweighted_gammas(checker, raw)
    assert len(group.appended[0]) == 2  # two micro-batches, one summary
    for status, hits in zip(statuses, (0.0, 1.0), strict=True):
        assert status["policy_loss"] == 0.25 and "rollout/reward_mean" in status  # OpenRLHF's
        check_step_summary(status, gammas, hit_ratio=hits)  # version "0": no step number
    assert "anchorcredit_summary" not in vars(controller.experience_maker)  # moved, not kept
    assert not hasattr(orl.ppo_trainer.BasePPOTrainer.train_step, "__wrapped__")  # uninstalled


# -- weight sync -----------------------------------------------------------------------------
class Engine:
    """A vLLM engine (a Ray actor) as OpenRLHF's broadcast calls it."""

    def __init__(self) -> None:
        self.updates: list[tuple[str, tuple[int, ...]]] = []
        self.update_weight = types.SimpleNamespace(remote=self._update)

    def _update(self, name, dtype, shape, empty_cache=False):
        self.updates.append((name, tuple(shape)))


class VllmGroup:
    """The process group OpenRLHF broadcasts the weights to vLLM on."""

    def __init__(self) -> None:
        self.tensors: list = []

    def broadcast(self, tensor, src, stream=None):
        self.tensors.append(tensor.detach().clone())


class ActorGroup:
    """OpenRLHF's RayActorGroup with one actor, called in this process."""

    def __init__(self, actor) -> None:
        self.actor = actor

    def async_run_method(self, method_name, *args, **kwargs):
        return [getattr(self.actor, method_name)(*args, **kwargs)]


@pytest.fixture
def one_process_group(free_port):
    dist = torch.distributed
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


def test_weight_sync_rides_openrlhfs_vllm_broadcast(
    orl, target, model_dir, monkeypatch, one_process_group
):
    args = cli_args(orl, "group_norm", str(model_dir), **{"--ds.zero_stage": "3"})
    strategy = types.SimpleNamespace(args=args)
    ppo_actor, ppo_trainer = orl.ppo_actor, orl.ppo_trainer
    same = types.SimpleNamespace(get=lambda refs: refs)  # ray.get on in-process results
    monkeypatch.setattr(ppo_actor, "ray", same)
    monkeypatch.setattr(ppo_trainer, "ray", same)
    monkeypatch.setattr(ppo_actor, "torch_dist_barrier_and_cuda_sync", torch.distributed.barrier)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # the replay buffer's device

    client = CreditClient([target], replica_wait_s=0.2)  # how long a pinned call waits
    pushed, scored = [], []
    real_push, real_score = client.push_weights, client.score

    def spy_push(weights, version, **kw):
        weights = list(weights)
        pushed.append((version, {n: t.detach().clone() for n, t in weights}))
        return real_push(weights, version, **kw)

    def spy_score(*a, **kw):
        scored.append(kw.get("policy_version"))
        return real_score(*a, **kw)

    monkeypatch.setattr(client, "push_weights", spy_push)
    monkeypatch.setattr(client, "score", spy_score)
    ac_orl.install(client, strategy="coupled_rhythm")  # weight_sync="grpc"
    try:
        trainer_cls = ppo_actor.ActorPPOTrainer
        assert trainer_cls.__mro__[1] is ac_orl._ORIGINALS[(ppo_actor, "ActorPPOTrainer")]
        # OpenRLHF's PolicyModelActor builds its trainer by that module-level name
        ray_cls = ppo_actor.PolicyModelActor.__ray_metadata__.modified_class
        build = inspect.unwrap(ray_cls.init_model_from_pretrained)  # Ray wraps it for tracing
        assert "ActorPPOTrainer" in build.__code__.co_names
        assert build.__globals__["ActorPPOTrainer"] is trainer_cls

        actor = orl.Actor(str(model_dir), attn_implementation="eager")
        actor.model = orl.DeepSpeedEngine(actor.model)
        hf = actor.model.module
        orl.zero3.partition(hf)
        trainer = trainer_cls(
            strategy, actor, ema_model=None, actor_optim=None, actor_scheduler=None
        )
        assert len(pushed) == 1  # step 0: the starting weights, gathered from ZeRO-3
        v0, w0 = pushed[0]
        assert ac_sync.parse_version(v0)[0] == 0
        assert all(p.data.numel() == 0 for p in hf.parameters())  # partitioned again
        for name, p in hf.named_parameters():
            assert torch.equal(w0[name], p.ds_full)
        engine, vllm_group = Engine(), VllmGroup()
        trainer.vllm_engines, trainer._model_update_group = [engine], vllm_group

        controller = ppo_trainer.BasePPOTrainer(
            strategy, ActorGroup(trainer), None, None, None, [engine], trainer_cls
        )
        maker = controller.experience_maker
        assert type(maker).__mro__[1] is orl.experience_maker.RemoteExperienceMaker
        exps, _, _ = experiences(orl, args, rollouts())
        maker.compute_advantages_and_returns(copy.deepcopy(exps))
        assert scored == [v0] * len(exps)  # one score() per micro-batch
        assert maker.anchorcredit_summary["anchorcredit/policy_step"] == 0  # v0's step

        with torch.no_grad():  # what an optimizer step does to the partitioned weights
            for p in hf.parameters():
                p.ds_full.add_(0.01)
        controller.broadcast_to_vllm()  # OpenRLHF: after ppo_train, before the next batch
        assert len(pushed) == 2
        v1, w1 = pushed[1]
        assert ac_sync.parse_version(v1) == (1, ac_sync.parse_version(v0)[1])
        assert client.model_info(refresh=True).policy_version == v1
        # vLLM and the service got the same tensors, by the same names, full size
        assert [n for n, _ in engine.updates] == list(w1)
        assert [s for _, s in engine.updates] == [tuple(t.shape) for t in w1.values()]
        for t_vllm, (name, t_ac) in zip(vllm_group.tensors, w1.items(), strict=True):
            assert torch.equal(t_vllm, t_ac), name
            assert not torch.equal(t_ac, w0[name])
        maker.compute_advantages_and_returns(copy.deepcopy(exps))
        assert scored == [v0] * len(exps) + [v1] * len(exps)
        assert maker.anchorcredit_summary["anchorcredit/policy_step"] == 1

        # the service moves to other weights: a new batch pinned to v1 is refused, never
        # scored with them (v1's results already in the client's cache stay v1's)
        with CreditClient([target]) as other:
            other.update_weights(str(model_dir), "someone-else")
        new_exps, _, _ = experiences(orl, args, rollouts(seed=11))
        with pytest.raises(StalePolicyVersionError) as err:
            maker.compute_advantages_and_returns(copy.deepcopy(new_exps))
        assert err.value.code.name == "FAILED_PRECONDITION"
        assert scored[-1] == v1
        # a sync the actors did not push is caught before scoring
        maker.anchorcredit_pin.synced()
        with pytest.raises(ac_sync.WeightSyncError, match="someone-else"):
            maker.compute_advantages_and_returns(copy.deepcopy(new_exps))
    finally:
        ac_orl.uninstall()
        client.close()
    assert ppo_actor.ActorPPOTrainer is ac_orl._ORIGINALS.get(
        (ppo_actor, "ActorPPOTrainer"), ppo_actor.ActorPPOTrainer
    )


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


def test_sync_settings_from_env(monkeypatch):
    for var in ("WEIGHT_SYNC", "POLICY_VERSION", "PINNED_VERSION", "RUN_ID", "WEIGHT_DTYPE"):
        monkeypatch.delenv(f"ANCHORCREDIT_{var}", raising=False)
    assert ac_orl._sync_from_env() == ("grpc", "auto", None)
    monkeypatch.setenv("ANCHORCREDIT_PINNED_VERSION", "fixed")  # a fixed pin: no sync
    assert ac_orl._sync_from_env()[0] is None
    monkeypatch.setenv("ANCHORCREDIT_WEIGHT_SYNC", "collective")
    with pytest.raises(ValueError, match="ANCHORCREDIT_PINNED_VERSION"):
        ac_orl._sync_from_env()  # a fixed pin and a sync exclude each other
    monkeypatch.delenv("ANCHORCREDIT_PINNED_VERSION")
    monkeypatch.setenv("ANCHORCREDIT_RUN_ID", "r7")
    monkeypatch.setenv("ANCHORCREDIT_WEIGHT_DTYPE", "none")
    assert ac_orl._sync_from_env() == ("collective", None, "r7")
    monkeypatch.setenv("ANCHORCREDIT_WEIGHT_SYNC", "nfs")
    with pytest.raises(ValueError, match="ANCHORCREDIT_WEIGHT_SYNC"):
        ac_orl._sync_from_env()


def test_version_pin_learns_the_run_then_holds_it():
    served = ["step-0-ab12", "step-1-ab12", "step-2-zz"]
    client = types.SimpleNamespace(served_version=lambda: served.pop(0))
    pin = ac_sync.VersionPin()
    assert pin.current(client) == "step-0-ab12"
    assert pin.current(client) == "step-0-ab12"  # asked once per sync
    pin.synced()
    assert pin.current(client) == "step-1-ab12"
    pin.synced()
    with pytest.raises(ac_sync.WeightSyncError, match="step-2-ab12"):
        pin.current(client)  # another run's version
    assert ac_sync.parse_version("step-12-a-b") == (12, "a-b")
    assert ac_sync.parse_version("base") is None


def test_the_documented_launch(orl, monkeypatch):
    """docs/trainers/openrlhf.md: OpenRLHF's parser takes the command; the runtime env names
    the setup hook and settings this adapter reads."""
    doc = (Path(__file__).parents[3] / "docs" / "trainers" / "openrlhf.md").read_text()
    block = doc.split("```bash\n", 1)[1].split("```", 1)[0]
    env_json = block.split("--runtime-env-json '", 1)[1].split("'", 1)[0]
    command = block.split("-- python -m openrlhf.cli.train_ppo_ray", 1)[1]
    argv = shlex.split(command.replace("\\\n", " "))
    args = parse_cli(argv)
    assert args.algo.advantage.estimator == "group_norm"
    assert args.ds.zero_stage == 3 and args.vllm.num_engines == 2
    runtime_env = json.loads(env_json)
    module, name = runtime_env["worker_process_setup_hook"].rsplit(".", 1)
    assert getattr(importlib.import_module(module), name) is ac_orl.install_from_env
    for key, value in runtime_env["env_vars"].items():
        assert f"`{key}`" in doc  # every variable is in the table
        monkeypatch.setenv(key, value)
    for var in ("POLICY_VERSION", "PINNED_VERSION", "RUN_ID", "WEIGHT_DTYPE"):
        monkeypatch.delenv(f"ANCHORCREDIT_{var}", raising=False)
    assert ac_orl._sync_from_env() == ("grpc", "auto", None)
    monkeypatch.setattr(ac_orl, "CreditClient", lambda config: config)
    config, params = ac_orl._client_from_env()
    assert config.targets == ("credit-svc:50051",) and config.cache == "redis://redis:6379/0"
    assert params == {"q": 0.4, "gamma_amp": 1.5, "strategy": "coupled_rhythm", "sign": "both"}


def test_explicit_settings_beat_the_environment_when_the_client_comes_from_it(monkeypatch):
    """install(None, sign=..., q=...) builds its client from ANCHORCREDIT_* on first use; the
    settings passed in code must still apply (they were replaced by the env's defaults)."""
    monkeypatch.setenv("ANCHORCREDIT_TARGETS", "127.0.0.1:1")
    monkeypatch.delenv("ANCHORCREDIT_PARAMS", raising=False)
    monkeypatch.delenv("ANCHORCREDIT_SIGN", raising=False)
    monkeypatch.setenv("ANCHORCREDIT_STRATEGY", "coupled_rhythm")
    seen = []
    monkeypatch.setattr(ac_orl, "apply_credit", lambda exp, client, summary, **kw: seen.append(kw))

    class Base:
        def compute_advantages_and_returns(self, experiences):
            return experiences

    cls = ac_orl.experience_maker_class(None, Base, weight_sync=False, sign="positive_only", q=0.7)
    cls().compute_advantages_and_returns([object()])
    cls._ac_client.close()
    assert seen == [{"strategy": "coupled_rhythm", "sign": "positive_only", "q": 0.7}]


def test_client_from_env_sends_the_tokens(monkeypatch):
    """A service started with --auth-token / --admin-token refuses calls without them: the
    env-built client (every Ray worker's) must carry ANCHORCREDIT_TOKEN / _ADMIN_TOKEN."""
    monkeypatch.setenv("ANCHORCREDIT_TARGETS", "127.0.0.1:1")
    monkeypatch.setenv("ANCHORCREDIT_TOKEN", "score-secret")
    monkeypatch.setenv("ANCHORCREDIT_ADMIN_TOKEN", "admin-secret")
    client, _ = ac_orl._client_from_env()
    try:
        assert ("authorization", "Bearer score-secret") in client.transport.metadata
        assert ("authorization", "Bearer admin-secret") in client.transport.admin_metadata
    finally:
        client.close()


def _adapter_log(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "anchorcredit.adapters"]


def test_install_from_env_says_when_openrlhf_does_not_import(monkeypatch, caplog):
    """A failed import in the setup hook is raised, never swallowed (it patched nothing,
    silently)."""
    monkeypatch.setenv("ANCHORCREDIT_TARGETS", "127.0.0.1:1")
    monkeypatch.setitem(sys.modules, "openrlhf.trainer.ppo_trainer", None)  # import fails
    caplog.set_level("INFO", logger="anchorcredit.adapters")
    ac_orl.install_from_env()
    [line] = _adapter_log(caplog)
    assert "did not patch this process" in line and "OpenRLHF does not import here" in line
    assert "openrlhf.trainer.ppo_trainer" in line  # the reason, from the ImportError
    assert caplog.records[-1].levelname == "WARNING"
    assert not ac_orl._ORIGINALS


def test_install_logs_what_it_patched(orl, monkeypatch, caplog):
    caplog.set_level("INFO", logger="anchorcredit.adapters")
    monkeypatch.setitem(sys.modules, "openrlhf.trainer.ray.ppo_actor", None)  # no deepspeed
    with CreditClient("127.0.0.1:1") as client:
        try:
            ac_orl.install(client)
        finally:
            ac_orl.uninstall()
    lines = _adapter_log(caplog)
    assert any("patched openrlhf.trainer.ppo_trainer.RemoteExperienceMaker" in x for x in lines)
    assert any(
        "patched openrlhf.trainer.ppo_trainer.BasePPOTrainer.broadcast_to_vllm" in x for x in lines
    )
    assert any("patched openrlhf.trainer.ppo_trainer.BasePPOTrainer.train_step" in x for x in lines)
    [missing] = [x for x in lines if "did not patch" in x]
    assert "ActorPPOTrainer" in missing and "the actor ranks must install too" in missing


def _stub_gpu_packages_then_install() -> None:
    """The Ray worker setup hook of the Ray test: the GPU packages stubbed as in this module
    (deepspeed, vllm and flash_attn do not install here), then the real hook."""
    sys.meta_path.insert(0, _StubFinder())
    ac_orl.install_from_env()


@pytest.mark.slow
def test_the_setup_hook_installs_in_a_ray_worker_and_scales_there(orl, target):
    """The Ray route runs for real, not only as configuration. A real local Ray (1 CPU,
    no dashboard): the worker process runs the setup hook, OpenRLHF's experience maker is
    the anchorcredit one there, and the advantages it computes in that process are
    OpenRLHF's x gamma."""
    import os

    import ray
    import ray.cloudpickle

    args = cli_args(orl, "group_norm")
    raw = rollouts(seed=21)
    exps, strategy, tokenizer = experiences(orl, args, raw)
    kl = orl.FixedKLController(args.algo.kl.init_coef)
    ref = orl.experience_maker.RemoteExperienceMaker(
        None, None, None, None, kl, strategy, tokenizer
    ).compute_advantages_and_returns(copy.deepcopy(exps))
    # the hook travels by value: the worker cannot import this test module
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(
        num_cpus=1,
        include_dashboard=False,
        object_store_memory=100 * 1024 * 1024,
        runtime_env={
            "worker_process_setup_hook": _stub_gpu_packages_then_install,
            "env_vars": {
                "ANCHORCREDIT_TARGETS": target,
                "ANCHORCREDIT_WEIGHT_SYNC": "off",
                "ANCHORCREDIT_STALE_POLICY": "frozen",
            },
        },
    )
    try:

        @ray.remote(num_cpus=1)
        class Controller:  # stands in for OpenRLHF's PPOTrainer actor
            def run(self, experiences, args, init_coef):
                import os
                import types

                import openrlhf.trainer.ppo_trainer as ppo_trainer
                from openrlhf.trainer.ppo_utils.kl_controller import FixedKLController

                maker = ppo_trainer.RemoteExperienceMaker(  # the name OpenRLHF builds it by
                    None,
                    None,
                    None,
                    None,
                    FixedKLController(init_coef),
                    types.SimpleNamespace(args=args),
                    types.SimpleNamespace(pad_token_id=0),
                )
                out = maker.compute_advantages_and_returns(experiences)
                return os.getpid(), type(maker).__name__, out

        pid, name, got = ray.get(
            Controller.remote().run.remote(copy.deepcopy(exps), args, args.algo.kl.init_coef),
            timeout=300,
        )
    finally:
        ray.shutdown()
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert pid != os.getpid() and name == "AnchorCreditExperienceMaker"
    with CreditClient([target]) as client:
        gammas = expected_gamma(client, raw)
    assert check_reweighted(ref, got, raw, gammas) > 0
    assert any(not torch.equal(g.advantages, r.advantages) for g, r in zip(got, ref, strict=True))
    assert any((g != 1).any() for _, g in gammas)
