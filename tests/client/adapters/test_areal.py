"""AReaL adapter against AReaL's real source (areal 1.0.4, installed with --no-deps) and a
real anchorcredit service on the CPU debug model.

Batches come from AReaL's own rollout workflows (RLVRWorkflow, and MultiTurnWorkflow whose
retry turns put user tokens inside the response span) and AReaL's own `concat_batch`; the
advantages are AReaL's real `PPOActor._compute_advantages` (GAE with the KL reward, and a
GRPO-style group normalisation). Stubbed, and only these: the inference engine that
generates tokens (AReaL's remote SGLang/vLLM server: `StubRollout` samples random tokens)
and, in the weight-sync test, the GPU setup of `FSDPEngine.initialize` (FSDP2 sharding on
CUDA): the engine gets a plain Hugging Face module on a one-process gloo group instead, and
then runs AReaL's own `connect_engine` / `update_weights` (disk route) on it.
"""

from __future__ import annotations

import asyncio
import copy
import types
from concurrent.futures import Future

import numpy as np
import pytest

torch = pytest.importorskip("torch")
areal_actor = pytest.importorskip("areal.trainer.ppo.actor")

from areal.api import ModelResponse  # noqa: E402
from areal.api.cli_args import GenerationHyperparameters, NormConfig, PPOActorConfig  # noqa: E402
from areal.utils.data import concat_batch  # noqa: E402
from areal.workflow.multi_turn import MultiTurnWorkflow  # noqa: E402
from areal.workflow.rlvr import RLVRWorkflow  # noqa: E402

from anchorcredit.client import CreditClient  # noqa: E402
from anchorcredit.client.adapters import areal as ac_areal  # noqa: E402
from anchorcredit.client.errors import StalePolicyVersionError  # noqa: E402

VOCAB = 256


@pytest.fixture(autouse=True)
def spmd_mode(monkeypatch):
    """AReaL's SPMD mode (what its launchers set): install() hooks this process. The
    single-controller tests delete it."""
    monkeypatch.setenv("AREAL_SPMD_MODE", "1")


def digit_reward(prompt, completion, prompt_ids, completion_ids, **kw):
    """Module level: AReaL runs reward functions in a process pool."""
    return float(sum(completion_ids) % 3 == 0)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2} | {f"w{i}": i for i in range(3, VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    # role marker, content, and "w5" opening the assistant turn
    out.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}w3 {% else %}w4 {% endif %}"
        "{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w5{% endif %}"
    )
    return out


class StubRollout:
    """Stands in for AReaL's remote inference engine (SGLang/vLLM): random tokens, and the
    weight-update calls AReaL's FSDPEngine makes on it."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.version = 0
        self.loaded: list[str] = []

    async def agenerate(self, req):
        n = int(self.rng.integers(3, 10))
        return ModelResponse(
            input_tokens=list(req.input_ids),
            output_tokens=self.rng.integers(6, VOCAB, n).tolist(),
            output_logprobs=(-self.rng.random(n)).tolist(),
            output_versions=[self.version] * n,
            tokenizer=req.tokenizer,
        )

    def pause_generation(self):
        pass

    def continue_generation(self):
        pass

    def update_weights_from_disk(self, meta):
        self.loaded.append(meta.path)
        done: Future = Future()
        done.set_result(None)
        return done


def _rollout(engine: StubRollout, n_single: int = 3, n_multi: int = 3, seed: int = 0):
    """Trajectories from AReaL's own workflows (dicts of [1, L_i] tensors)."""
    tok = _tokenizer()
    gconfig = GenerationHyperparameters(n_samples=1, max_new_tokens=16)
    rng = np.random.default_rng(seed)

    def prompt():
        n = int(rng.integers(2, 7))
        return {
            "messages": [
                {"role": "user", "content": " ".join(f"w{i}" for i in rng.integers(6, VOCAB, n))}
            ]
        }

    single = RLVRWorkflow(digit_reward, gconfig, tok)
    multi = MultiTurnWorkflow(digit_reward, gconfig, tok, max_turns=3, turn_discount=0.9)

    async def run():
        jobs = [single.arun_episode(engine, prompt()) for _ in range(n_single)]
        jobs += [multi.arun_episode(engine, prompt()) for _ in range(n_multi)]
        return await asyncio.gather(*jobs)

    return asyncio.run(run())


def _actor(group_norm: bool) -> areal_actor.PPOActor:
    cfg = PPOActorConfig(experiment_name="t", trial_name="t", path="unused")
    if group_norm:  # AReaL's GRPO recipe: group mean/std over the samples of a prompt
        cfg.adv_norm = NormConfig(mean_level="group", std_level="group", group_size=3)
        cfg.kl_ctl = 0.0
    return areal_actor.PPOActor(cfg, engine=None)  # the train engine is not used here


def _expected(checker, padded_in, ref_adv, sign="both", **params):
    """AReaL's advantages times gamma at the actions that produced response tokens, found
    here from the un-rolled loss mask: token j (mask 1) was produced at position j - 1."""
    want = ref_adv.clone()
    ids, mask, attn = (
        padded_in["input_ids"],
        padded_in["loss_mask"].bool(),
        padded_in["attention_mask"],
    )
    holes = boosted = 0
    for b in range(ids.shape[0]):
        pos = torch.nonzero(mask[b]).flatten()
        first, last = int(pos[0]), int(pos[-1])
        [res] = checker.score(
            [ids[b, :first].tolist()], [ids[b, first : last + 1].tolist()], **params
        )
        g = torch.from_numpy(np.array(res.gamma))
        assert len(g) == last - first + 1 and attn[b, : last + 1].all()
        for j in range(first, last + 1):
            if not mask[b, j]:
                holes += 1  # a user token inside the span: left as AReaL made it
                continue
            a = ref_adv[b, j - 1]
            if sign == "both" or a >= 0:
                want[b, j - 1] = a * g[j - first]
                boosted += int(g[j - first] != 1 and a != 0)
    assert boosted > 0, "no advantage was scaled by a gamma != 1"
    return want, holes


def _reweighted_gammas(checker, padded_in, **params) -> list[np.ndarray]:
    """The gamma of each response token whose action the adapter scales (loss mask 1),
    asked of the service per row as in `_expected`."""
    ids, mask = padded_in["input_ids"], padded_in["loss_mask"].bool()
    out = []
    for b in range(ids.shape[0]):
        pos = torch.nonzero(mask[b]).flatten()
        if len(pos) == 0:
            continue
        first, last = int(pos[0]), int(pos[-1])
        [res] = checker.score(
            [ids[b, :first].tolist()], [ids[b, first : last + 1].tolist()], **params
        )
        out.append(np.asarray(res.gamma)[mask[b, first : last + 1].numpy()])
    return out


def _f32(value: float) -> float:
    """AReaL's stats_tracker reduces scalars in float32."""
    return float(np.float32(value))


@pytest.mark.parametrize("group_norm", [False, True])
@pytest.mark.parametrize("sign", ["both", "positive_only"])
def test_advantages_are_areal_times_gamma(target, group_norm, sign, check_step_summary):
    from areal.utils import stats_tracker

    trajs = _rollout(StubRollout(seed=1))
    padded, _ = concat_batch(copy.deepcopy(trajs))  # AReaL's own padding (right, zeros)
    assert (padded["attention_mask"] == 0).any()  # there is padding to leave alone
    actor = _actor(group_norm)
    ref = actor._compute_advantages(copy.deepcopy(padded))  # AReaL alone
    stats_tracker.export_all()  # start from an empty tracker
    with (
        CreditClient([target], cache=None) as client,
        CreditClient([target], cache=False) as checker,
    ):
        undo = ac_areal.install(client, strategy="coupled_rhythm", sign=sign, q=0.5)
        exported = []
        try:
            ac_areal.install(client, strategy="coupled_rhythm", sign=sign, q=0.5)  # no double wrap
            out = actor._compute_advantages(copy.deepcopy(padded))
            exported.append(stats_tracker.export_all())  # what the engine's export_stats does
            actor._compute_advantages(copy.deepcopy(padded))  # the same batch again: cached
            exported.append(stats_tracker.export_all())
        finally:
            undo()
        assert not hasattr(areal_actor.PPOActor._compute_advantages, "__anchorcredit_wrapped__")
        want, holes = _expected(checker, padded, ref["advantages"], sign=sign, q=0.5)
        gammas = _reweighted_gammas(checker, padded, q=0.5)
    # the step's credit summary in AReaL's exported statistics (version "0": no step)
    for stats, hits in zip(exported, (0.0, 1.0), strict=True):
        check_step_summary(stats, gammas, hit_ratio=hits, cast=_f32)
    assert holes > 0  # the multi-turn retries put user tokens inside some responses
    assert out["advantages"].dtype == ref["advantages"].dtype
    torch.testing.assert_close(out["advantages"], want, rtol=0, atol=0)
    # everything but the response actions is bit-identical, padding included
    off = ~ref["loss_mask"].bool()
    assert torch.equal(out["advantages"][off], ref["advantages"][off])
    assert not torch.equal(out["advantages"], ref["advantages"])
    for k in ("loss_mask", "returns", "logprobs"):
        assert torch.equal(out[k], ref[k])


def test_public_compute_advantages_per_trajectory(target):
    """AReaL's `compute_advantages(list)` (what the trainer calls) splits the result back per
    trajectory; each gets its gamma."""
    trajs = _rollout(StubRollout(seed=2), n_single=2, n_multi=2, seed=2)
    actor = _actor(group_norm=False)
    ref = actor.compute_advantages(copy.deepcopy(trajs))
    with CreditClient([target]) as client, CreditClient([target], cache=False) as checker:
        undo = ac_areal.install(client)
        try:
            out = actor.compute_advantages(copy.deepcopy(trajs))
        finally:
            undo()
        for t, r, o in zip(trajs, ref, out, strict=True):
            want, _ = _expected(checker, t, r["advantages"])
            torch.testing.assert_close(o["advantages"], want, rtol=0, atol=0)


def test_rows_without_response_are_left_alone(target):
    trajs = _rollout(StubRollout(seed=3), n_single=2, n_multi=0, seed=3)
    trajs[0]["loss_mask"][:] = 0  # e.g. a filtered / aborted sample
    padded, _ = concat_batch(copy.deepcopy(trajs))
    actor = _actor(group_norm=False)
    ref = actor._compute_advantages(copy.deepcopy(padded))
    with CreditClient([target]) as client:
        out = ac_areal.apply_credit(actor._compute_advantages(copy.deepcopy(padded)), client)
    assert torch.equal(out["advantages"][0], ref["advantages"][0])
    assert not torch.equal(out["advantages"][1], ref["advantages"][1])


@pytest.mark.slow
def test_weight_sync_follows_areal_update_weights(tmp_path, model_dir, start_server):
    """AReaL's own loop order: connect_engine at setup; per step compute_advantages ->
    (optimizer step) -> update_weights(meta.with_version(step + 1)) -> set_version. The
    service must serve `step-<n>-<run>` = the weights AReaL just wrote, and every score is
    pinned to it; a service moved to other weights is refused."""
    import torch.distributed as dist
    from areal.api.cli_args import NameResolveConfig
    from areal.api.io_struct import WeightUpdateMeta
    from areal.engine.fsdp_engine import FSDPEngine, FSDPPPOActor
    from areal.utils import name_resolve
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from anchorcredit.client.adapters.areal_sync import install_weight_sync
    from anchorcredit.runner import Scorer

    server = start_server(model_dir)
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group(
            "gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1
        )
    name_resolve.reconfigure(NameResolveConfig(type="nfs", nfs_record_root=str(tmp_path / "nr")))
    client = CreditClient([server.target], cache=None)
    checker = CreditClient([server.target], cache=False)
    sync, undo_sync = install_weight_sync(client, run_id="t1")
    undo_credit = ac_areal.install(client, q=0.5)
    try:
        cfg = PPOActorConfig(experiment_name="t", trial_name="t", path=str(model_dir))
        engine = FSDPPPOActor(cfg)  # AReaL's class; __init__ reads the model config only
        # Stand-in for engine.initialize() (FSDP2 sharding on CUDA): the HF module itself.
        engine.model = AutoModelForCausalLM.from_pretrained(model_dir)
        engine.tokenizer = None
        engine._initialized = True
        engine._cpu_group = dist.group.WORLD
        rollout = StubRollout(seed=4)
        meta = WeightUpdateMeta(type="disk", path=str(tmp_path / "ckpt" / "weight_update"))
        engine.connect_engine(rollout, meta)
        assert checker.model_info(refresh=True).policy_version == "step-0-t1"
        opt = torch.optim.SGD(engine.model.parameters(), lr=0.5)
        for global_step in range(2):
            trajs = _rollout(rollout, n_single=2, n_multi=1, seed=global_step)
            pinned = sync.version
            out = engine.compute_advantages(copy.deepcopy(trajs))
            ref = areal_actor.PPOActor._compute_advantages.__anchorcredit_wrapped__
            for t, o in zip(trajs, out, strict=True):
                raw = ref(engine.actor, copy.deepcopy(t))["advantages"]
                want, _ = _expected(checker, t, raw, policy_version=pinned, q=0.5)
                torch.testing.assert_close(o["advantages"], want, rtol=0, atol=0)
            # stand-in for ppo_update's engine.train_batch: one real optimizer step
            ids = torch.cat([t["input_ids"][0] for t in trajs]).long()[None, :64]
            engine.model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
            new_version = global_step + 1  # AReaL's PPOTrainer.train, verbatim order
            engine.update_weights(meta.with_version(new_version))
            engine.set_version(new_version)
            assert checker.model_info(refresh=True).policy_version == f"step-{new_version}-t1"
        assert rollout.loaded == [str(tmp_path / "ckpt" / f"weight_update_v{n}") for n in (1, 2)]
        assert len(sync.seconds) == 3
        # the service scores exactly like the checkpoint AReaL wrote for its rollout engines
        ids_p, ids_r = [[3, 4, 5, 6]], [[7, 8, 9, 10, 11, 12]]
        ref_scores = Scorer.from_pretrained(rollout.loaded[-1]).score(
            list(zip(ids_p, ids_r, strict=True))
        )
        got = checker.score(ids_p, ids_r, policy_version="step-2-t1")
        np.testing.assert_array_equal(got[0].gamma, ref_scores[0].gamma)
        # another writer moves the service on: the pinned adapter refuses, never uses it
        checker.push_weights(load_file(model_dir / "model.safetensors"), "someone-else")
        with pytest.raises(StalePolicyVersionError):
            engine.compute_advantages(copy.deepcopy(_rollout(rollout, 1, 0, seed=9)))
    finally:
        undo_credit()
        undo_sync()
        assert not hasattr(FSDPEngine.update_weights, "__anchorcredit_wrapped__")
        client.close()
        checker.close()
        if own_group:
            dist.destroy_process_group()
        server.stop()


class _RolloutCallbacks:
    """The controller's callback endpoints AReaL's train workers POST to (pause, load the
    new weights, continue): the inference side, stubbed; records the endpoints called."""

    def __init__(self) -> None:
        import http.server
        import threading

        calls = self.calls = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                calls.append(self.path)
                body = b"{}"
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.addr = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _model_with_tokenizer(path):
    """The debug model plus the test tokenizer (AReaL's engine loads both)."""
    from debug_model import save_debug_model

    model = save_debug_model(path)
    _tokenizer().save_pretrained(model)
    return model


@pytest.mark.slow
def test_single_controller_mode_installs_the_hooks_in_the_actor_workers(
    tmp_path, start_server, monkeypatch, check_step_summary
):
    """With a plain `python train.py` (AREAL_SPMD_MODE unset) the actor is a
    PPOActorController and compute_advantages / update_weights are RPCs to worker processes:
    the hooks ran 0 times. Here AReaL's real LocalScheduler starts a real worker process
    (its RPC server, a real FSDP2 engine on the CPU), and the controller only calls it."""
    from areal.api import FinetuneSpec
    from areal.api.cli_args import SchedulingSpec
    from areal.api.io_struct import WeightUpdateMeta
    from areal.engine.fsdp_engine import FSDPPPOActor
    from areal.infra.rpc.rtensor import RTensor
    from areal.infra.scheduler.local import LocalScheduler

    from anchorcredit.client.adapters.areal_sync import install_weight_sync
    from anchorcredit.runner import Scorer

    monkeypatch.delenv("AREAL_SPMD_MODE", raising=False)
    # the worker inherits this: any score its weight sync did not pin is refused
    monkeypatch.setenv("ANCHORCREDIT_STALE_POLICY", "error")
    model = _model_with_tokenizer(tmp_path / "llama")
    server = start_server(model)
    callbacks = _RolloutCallbacks()
    (tmp_path / "nr").mkdir()
    scheduler = LocalScheduler(
        gpu_devices=[0],
        log_dir=str(tmp_path / "logs"),
        experiment_name="ac",
        trial_name="sc",
        fileroot=str(tmp_path),
        nfs_record_root=str(tmp_path / "nr"),
        startup_timeout=180,
    )
    spec = SchedulingSpec(gpu=0, cpu=1, mem=1, cmd="python -m areal.infra.rpc.rpc_server")
    cfg = PPOActorConfig(
        experiment_name="ac",
        trial_name="sc",
        path=str(model),
        backend="fsdp:d1",
        attn_impl="sdpa",
        scheduling_spec=(spec,),
    )
    client = CreditClient([server.target], cache=None)
    checker = CreditClient([server.target], cache=False)
    undo_credit = ac_areal.install(client, q=0.5)
    sync, undo_sync = install_weight_sync(client, run_id="sc1")
    assert sync is None  # it lives in the worker
    actor = FSDPPPOActor.as_controller(cfg, scheduler)
    try:
        actor.create_process_group(parallel_strategy=actor.train_alloc.parallel)
        actor.initialize(role="actor", addr=None, ft_spec=FinetuneSpec(1, 8, 4))
        assert spec.cmd == "python -m areal.infra.rpc.rpc_server"  # the config is restored
        assert "ANCHORCREDIT_AREAL" not in spec.env_vars
        meta = WeightUpdateMeta(type="disk", path=str(tmp_path / "ckpt" / "weight_update"))
        actor.connect_engine(types.SimpleNamespace(callback_addr=callbacks.addr), meta)
        assert checker.model_info(refresh=True).policy_version == "step-0-sc1"
        alone = areal_actor.PPOActor(cfg, engine=None)  # AReaL's own, in this process
        for step in range(2):
            trajs = _rollout(StubRollout(seed=20 + step), n_single=2, n_multi=1, seed=step)
            out = RTensor.localize(actor.compute_advantages(copy.deepcopy(trajs)))
            boosted, gammas = 0, []
            for t, o in zip(trajs, out, strict=True):
                raw = alone._compute_advantages(copy.deepcopy(t))["advantages"]
                want, _ = _expected(checker, t, raw, policy_version=f"step-{step}-sc1", q=0.5)
                torch.testing.assert_close(o["advantages"], want, rtol=0, atol=0)
                boosted += int((o["advantages"] != raw).sum())
                gammas += _reweighted_gammas(checker, t, policy_version=f"step-{step}-sc1", q=0.5)
            assert boosted > 0  # gamma != 1 reached the worker's advantages
            # the worker's credit summary, in the statistics AReaL's trainer exports and
            # commits each step (the controller's export_stats RPC); new weights: no hits
            stats = actor.export_stats()
            check_step_summary(stats, gammas, hit_ratio=0.0, policy_step=step, cast=_f32)
            # the sync's figures: the pinned push's seconds, the trainer's wait for it
            assert stats["anchorcredit/push_seconds"] > 0
            assert stats["anchorcredit/sync_seconds"] >= 0
            actor.update_weights(meta.with_version(step + 1))  # AReaL's order, over RPC
            actor.set_version(step + 1)
            assert checker.model_info(refresh=True).policy_version == f"step-{step + 1}-sc1"
        assert callbacks.calls.count("/callback/update_weights_disk") == 2
        # what the worker pushed (its FSDP2 gather) scores as the checkpoint AReaL wrote
        ids_p, ids_r = [[3, 4, 5, 6]], [[7, 8, 9, 10, 11, 12]]
        ref = Scorer.from_pretrained(tmp_path / "ckpt" / "weight_update_v2").score(
            list(zip(ids_p, ids_r, strict=True))
        )
        got = checker.score(ids_p, ids_r, policy_version="step-2-sc1")
        np.testing.assert_array_equal(got[0].gamma, ref[0].gamma)
        # nothing was hooked in this (the controller's) process
        assert not hasattr(areal_actor.PPOActor._compute_advantages, "__anchorcredit_wrapped__")
    finally:
        if actor.workers:
            actor.destroy()
        scheduler.delete_workers()
        undo_credit()
        undo_sync()
        client.close()
        checker.close()
        callbacks.stop()
        server.stop()


@pytest.mark.slow
def test_weight_sync_covers_archon(qwen2_model, tmp_path, start_server, monkeypatch, free_port):
    """AReaL's ArchonEngine.update_weights is wrapped (unwrapped, the Archon backend's
    scores came from whatever the service held). A real ArchonPPOActor (AReaL's own
    initialize: Archon's Qwen2 model, FSDP on a one-process gloo group, the HF checkpoint
    loaded through its state-dict adapter) pushes under Hugging Face names; the service
    then scores exactly as the checkpoint AReaL itself writes for its rollout engines."""
    import torch.distributed as dist
    from areal.api import FinetuneSpec
    from areal.api.cli_args import NameResolveConfig
    from areal.api.io_struct import WeightUpdateMeta
    from areal.experimental.engine.archon_engine import ArchonEngine, ArchonPPOActor
    from areal.utils import name_resolve

    from anchorcredit.client.adapters.areal_sync import install_weight_sync
    from anchorcredit.runner import Scorer

    model = qwen2_model
    _tokenizer().save_pretrained(model)
    server = start_server(model)
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    for k, v in (env | {"MASTER_PORT": str(free_port())}).items():
        monkeypatch.setenv(k, v)
    name_resolve.reconfigure(NameResolveConfig(type="nfs", nfs_record_root=str(tmp_path / "nr")))
    client = CreditClient([server.target], cache=None)
    checker = CreditClient([server.target], cache=False)
    sync, undo_sync = install_weight_sync(client, run_id="ar1")
    undo_credit = ac_areal.install(client, q=0.5)
    own_group = not dist.is_initialized()
    engine = ArchonPPOActor(
        PPOActorConfig(
            experiment_name="ac", trial_name="archon", path=str(model), backend="archon:d1"
        )
    )
    try:
        assert hasattr(ArchonEngine.update_weights, "__anchorcredit_wrapped__")
        engine.create_process_group()
        engine.initialize(addr=None, ft_spec=FinetuneSpec(1, 8, 4))
        rollout = StubRollout(seed=5)
        meta = WeightUpdateMeta(type="disk", path=str(tmp_path / "ckpt" / "weight_update"))
        engine.connect_engine(rollout, meta)
        assert checker.model_info(refresh=True).policy_version == "step-0-ar1"
        ids_p, ids_r = [[3, 4, 5, 6]], [[7, 8, 9, 10, 11, 12]]
        got0 = checker.score(ids_p, ids_r, policy_version="step-0-ar1")

        trajs = _rollout(rollout, n_single=2, n_multi=1, seed=3)
        out = engine.compute_advantages(copy.deepcopy(trajs))  # pinned to step-0-ar1
        raw = areal_actor.PPOActor._compute_advantages.__anchorcredit_wrapped__
        for t, o in zip(trajs, out, strict=True):
            want, _ = _expected(
                checker,
                t,
                raw(engine.actor, copy.deepcopy(t))["advantages"],
                policy_version="step-0-ar1",
                q=0.5,
            )
            torch.testing.assert_close(o["advantages"], want, rtol=0, atol=0)

        with torch.no_grad():  # stand-in for an optimizer step on the sharded parameters
            for _, p in engine._get_model_name_parameters():
                p.add_(0.02 * torch.ones_like(p))
        engine.update_weights(meta.with_version(1))  # AReaL's disk route + our push
        engine.set_version(1)
        assert checker.model_info(refresh=True).policy_version == "step-1-ar1"
        written = tmp_path / "ckpt" / "weight_update_v1"
        ref1 = Scorer.from_pretrained(written).score(list(zip(ids_p, ids_r, strict=True)))
        got1 = checker.score(ids_p, ids_r, policy_version="step-1-ar1")
        np.testing.assert_array_equal(got1[0].waad, ref1[0].waad)
        np.testing.assert_array_equal(got1[0].gamma, ref1[0].gamma)
        assert not np.array_equal(got1[0].waad, got0[0].waad)  # the new weights score
        assert sync.version == "step-1-ar1" and len(sync.seconds) == 2
    finally:
        undo_credit()
        undo_sync()
        assert not hasattr(ArchonEngine.update_weights, "__anchorcredit_wrapped__")
        engine.destroy()
        if own_group and dist.is_initialized():
            dist.destroy_process_group()
        client.close()
        checker.close()
        server.stop()


def test_megatron_engine_is_refused_not_left_unsynced(caplog):
    """MegatronEngine (not importable here: no mbridge) is not covered by the weight sync:
    once its module loads, connect_engine refuses with a reason instead of training with
    scores from weights the service never got."""
    from anchorcredit.client.adapters import areal_sync

    assert areal_sync.NOT_COVERED == {"areal.engine.megatron_engine": "MegatronEngine"}

    class MegatronEngine:  # what the refusal wraps: AReaL's class, by name and method
        __module__ = "areal.engine.megatron_engine"

        def connect_engine(self, engine, meta):
            return "connected"

    caplog.set_level("INFO", logger="anchorcredit.adapters")
    undo = areal_sync._refuse_engine(MegatronEngine)
    with pytest.raises(RuntimeError, match="does not cover MegatronEngine.*FSDP or Archon"):
        MegatronEngine().connect_engine(None, None)
    assert any("did not patch" in r.getMessage() for r in caplog.records)
    undo()
    assert MegatronEngine().connect_engine(None, None) == "connected"


def test_single_controller_refusals_name_the_way_out(monkeypatch):
    """Where the workers cannot be started through anchorcredit's entry point, initialize
    refuses (naming AREAL_SPMD_MODE) rather than train with the hooks missing."""
    from areal.infra.scheduler.ray import RayScheduler

    from anchorcredit.client.adapters import areal_controller as ctl

    assert ctl._worker_cmd("python -m areal.infra.rpc.rpc_server --x 1") == (
        "python -m anchorcredit.client.adapters.areal_worker --x 1"
    )
    assert ctl._worker_cmd(None) == "python -m anchorcredit.client.adapters.areal_worker"
    with pytest.raises(RuntimeError, match="my_server.*AREAL_SPMD_MODE=1"):
        ctl._worker_cmd("python -m my_server")
    ray_actor = types.SimpleNamespace(scheduler=object.__new__(RayScheduler))
    with pytest.raises(RuntimeError, match="RayScheduler.*AREAL_SPMD_MODE=1"):
        ctl._check_supported(ray_actor)
    settings = {"targets": ["a:1", "b:2"], "credit": {"params": {"q": 0.4, "k": 3}}}
    encoded = ctl.encode_settings(settings)
    assert "," not in encoded and "=" not in encoded  # AReaL splits env_vars on both
    assert ctl.decode_settings(encoded) == settings
