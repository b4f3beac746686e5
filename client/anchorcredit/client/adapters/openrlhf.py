"""OpenRLHF hook: gamma_t on OpenRLHF's advantages, and the service kept on its policy.

Tested against OpenRLHF 0.11.2 (docs/trainers/openrlhf.md). Two hooks:

- advantages: a subclass of `RemoteExperienceMaker` whose `compute_advantages_and_returns`
  runs OpenRLHF's own (rewards, baselines, returns, normalisation), then scales each
  response action by gamma (`apply_credit`);
- weights (openrlhf_sync): after each of OpenRLHF's vLLM weight broadcasts the actor ranks
  push the same weights to the service as `step-<n>-<run>`, and the experience maker scores
  the next batch with exactly that version: an answer from other weights is refused.

The step's credit summary (summary.py: `anchorcredit/gamma_mean`, ...) goes into the status
dict `BasePPOTrainer.train_step` returns, which OpenRLHF's fit loop logs (its "Global step"
log line, wandb and TensorBoard as `train/anchorcredit/...`).

OpenRLHF builds both inside Ray actors (the PPOTrainer controller and the PolicyModelActor
ranks), so the hook has to be installed in their processes. A Ray worker setup hook does it
from the environment:

    ray job submit --runtime-env-json '{
      "worker_process_setup_hook": "anchorcredit.client.adapters.openrlhf.install_from_env",
      "env_vars": {"ANCHORCREDIT_TARGETS": "credit-svc:50051",
                   "ANCHORCREDIT_CACHE": "redis://redis:6379/0",
                   "ANCHORCREDIT_STRATEGY": "coupled_rhythm",
                   "ANCHORCREDIT_SIGN": "both",
                   "ANCHORCREDIT_PARAMS": "{\\"q\\": 0.4}"}}' \\
      -- python -m openrlhf.cli.train_ppo_ray ...

ANCHORCREDIT_WEIGHT_SYNC: grpc (default), collective, or off (the service keeps its
weights; also the default when ANCHORCREDIT_PINNED_VERSION pins a fixed version);
ANCHORCREDIT_WEIGHT_DTYPE (default auto: the serving dtype); ANCHORCREDIT_RUN_ID (default
random). In a single process, `install(client, ...)` does the same without Ray.

Layout (OpenRLHF's Experience): `sequences` [B, L] = prompt + response, right-padded,
`attention_mask` [B, L], `action_mask` [B, L-1] where action position j is the token at
sequence index j + 1, `advantages` [B, L-1]. The response sent is the span from the first to
the last action token (multi-turn observations inside it stay in place, masked out by
OpenRLHF, their advantages untouched); the prompt is every attended token before it.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from anchorcredit.client.adapters import install_log
from anchorcredit.client.adapters.common import credit_for_shifted_batch
from anchorcredit.client.adapters.openrlhf_sync import (
    SYNC_TRANSPORTS,
    ActorWeightSync,
    VersionPin,
    actor_trainer_class,
    unwrap_controller_broadcast,
    wrap_controller_broadcast,
)
from anchorcredit.client.adapters.settings import (
    PINNED_VERSION_ENV,
    credit_settings_from_env,
    pinned_version_from_env,
)
from anchorcredit.client.adapters.summary import StepSummary, log_version
from anchorcredit.client.client import CreditClient
from anchorcredit.client.config import ClientConfig
from anchorcredit.contract import DEFAULT_STRATEGY

__all__ = [
    "apply_credit",
    "experience_maker_class",
    "install",
    "install_from_env",
    "uninstall",
]


def apply_credit(
    experience: Any,
    client: CreditClient,
    *,
    strategy: str = DEFAULT_STRATEGY,
    policy_version: str | None = None,
    sign: str = "both",
    stale_policy: str | None = None,
    summary: StepSummary | None = None,
    **credit_params: Any,
) -> Any:
    """Replace experience.advantages with gamma * advantages; returns `experience`.

    stale_policy: what an unpinned score does when the service holds weights this run did
    not push ("warn" | "error" | "frozen"; None: ANCHORCREDIT_STALE_POLICY, policy_check.py).
    summary: collects the step's credit summary (summary.py) over every experience given it.
    """
    experience.advantages, _ = credit_for_shifted_batch(
        client,
        experience.advantages,
        experience.sequences,
        experience.attention_mask,
        experience.action_mask,
        strategy=strategy,
        policy_version=policy_version,
        sign=sign,
        credit_params=credit_params,
        stale_policy=stale_policy,
        summary=summary,
    )
    return experience


def experience_maker_class(
    client: CreditClient | None = None,
    base: type | None = None,
    *,
    weight_sync: bool | None = None,
    run_id: str | None = None,
    **kwargs: Any,
) -> type:
    """A subclass of OpenRLHF's RemoteExperienceMaker (or `base`) that applies gamma after
    OpenRLHF's own advantages (and their normalisation).

    client None: from the environment (see install_from_env), created on first use in the
    process that runs it. weight_sync True: score with the version the weight sync put on
    the service (`anchorcredit_pin`, see openrlhf_sync); None: True when the environment
    turns the sync on (client None) else False. kwargs: apply_credit's.
    """
    if base is None:
        from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker

        base = RemoteExperienceMaker

    class AnchorCreditExperienceMaker(base):  # type: ignore[misc, valid-type]
        _ac_client = client
        _ac_kwargs = kwargs
        # None: from the environment with the client, or off with a client of yours
        _ac_sync = weight_sync if weight_sync is not None or client is None else False

        @property
        def anchorcredit_pin(self) -> VersionPin:
            """Counts OpenRLHF's weight syncs (wrap_controller_broadcast) and names the
            version the next batch must be scored with."""
            pin = self.__dict__.get("_ac_pin")
            if pin is None:
                pin = self.__dict__["_ac_pin"] = VersionPin(run_id)
            return pin

        def compute_advantages_and_returns(self, experiences: list[Any]) -> list[Any]:
            experiences = super().compute_advantages_and_returns(experiences)
            cls = type(self)
            if cls._ac_client is None:
                cls._ac_client, env_kwargs = _client_from_env()
                # settings given in code win over the environment's (and its defaults)
                cls._ac_kwargs = {**env_kwargs, **cls._ac_kwargs}
                if cls._ac_sync is None:
                    cls._ac_sync = _sync_from_env()[0] is not None
            params = dict(cls._ac_kwargs)
            if cls._ac_sync and params.get("policy_version") is None:
                params["policy_version"] = self.anchorcredit_pin.current(cls._ac_client)
            summary = StepSummary()  # one per step: every micro-batch of this rollout
            for exp in experiences:
                apply_credit(exp, cls._ac_client, summary=summary, **params)
            # train_step (wrap_train_step) moves it into the step's status
            self.anchorcredit_summary = summary.metrics()
            log_version("openrlhf", summary.version)
            return experiences

    return AnchorCreditExperienceMaker


# What install() replaced, for uninstall(): (module or class, attribute) -> original.
_ORIGINALS: dict[tuple[Any, str], Any] = {}


def install(
    client: CreditClient | None = None,
    *,
    weight_sync: str | None = "grpc",
    dtype: str | None = "auto",
    run_id: str | None = None,
    **kwargs: Any,
) -> None:
    """Hook OpenRLHF in this process (call it in every Ray worker: install_from_env).

    - OpenRLHF's PPO trainers build the anchorcredit experience maker;
    - weight_sync "grpc" / "collective" (None: off, the service keeps its weights): the
      actor ranks push their weights after each vLLM weight broadcast as step-<n>-<run>,
      and the experience maker scores with exactly that version (openrlhf_sync).

    client None: each process creates its own from ANCHORCREDIT_* (on first use);
    dtype: cast before sending ("auto": the serving dtype); run_id: names the versions
    (default: random on actor rank 0); kwargs: apply_credit's (strategy, sign, q, ...).
    """
    import openrlhf.trainer.ppo_trainer as ppo_trainer

    if weight_sync is not None and weight_sync not in SYNC_TRANSPORTS:
        raise ValueError(f"weight_sync must be None or one of {SYNC_TRANSPORTS}")
    if weight_sync is not None and kwargs.get("policy_version") is not None:
        raise ValueError("a fixed policy_version and weight_sync exclude each other")
    _ORIGINALS.setdefault((ppo_trainer, "RemoteExperienceMaker"), ppo_trainer.RemoteExperienceMaker)
    maker = experience_maker_class(
        client,
        _ORIGINALS[(ppo_trainer, "RemoteExperienceMaker")],
        weight_sync=weight_sync is not None,
        run_id=run_id,
        **kwargs,
    )
    _install_credit(ppo_trainer, maker)
    if weight_sync is None:
        install_log.note(
            "openrlhf",
            "no weight sync (weight_sync=None): the served version is checked before "
            "scoring (policy_check.py)",
        )
        return
    _install_weight_sync(ppo_trainer, client, weight_sync, dtype, run_id)


def _install_credit(ppo_trainer: Any, maker: type) -> None:
    """The experience makers (sync and async trainers) and the step summary."""
    ppo_trainer.RemoteExperienceMaker = maker
    install_log.patched(
        "openrlhf", "openrlhf.trainer.ppo_trainer.RemoteExperienceMaker", "advantages x gamma"
    )
    key = (ppo_trainer.BasePPOTrainer, "train_step")
    _ORIGINALS.setdefault(key, ppo_trainer.BasePPOTrainer.train_step)
    ppo_trainer.BasePPOTrainer.train_step = wrap_train_step(_ORIGINALS[key])
    install_log.patched(
        "openrlhf",
        "openrlhf.trainer.ppo_trainer.BasePPOTrainer.train_step",
        "the credit summary joins the step's status",
    )
    try:
        import openrlhf.trainer.ppo_trainer_async as ppo_trainer_async
    except ImportError as e:
        install_log.not_patched(
            "openrlhf", "openrlhf.trainer.ppo_trainer_async", f"it does not import here ({e})"
        )
        return
    if hasattr(ppo_trainer_async, "RemoteExperienceMaker"):
        key = (ppo_trainer_async, "RemoteExperienceMaker")
        _ORIGINALS.setdefault(key, ppo_trainer_async.RemoteExperienceMaker)
        ppo_trainer_async.RemoteExperienceMaker = maker
        install_log.patched(
            "openrlhf",
            "openrlhf.trainer.ppo_trainer_async.RemoteExperienceMaker",
            "advantages x gamma",
        )


def _install_weight_sync(
    ppo_trainer: Any,
    client: CreditClient | None,
    weight_sync: str,
    dtype: str | None,
    run_id: str | None,
) -> None:
    """The controller counts vLLM broadcasts; the actor ranks push after each one."""
    wrap_controller_broadcast(ppo_trainer.BasePPOTrainer)
    install_log.patched(
        "openrlhf",
        "openrlhf.trainer.ppo_trainer.BasePPOTrainer.broadcast_to_vllm",
        "counts weight syncs, pins scoring to step-<n>-<run>",
    )
    try:
        # imports deepspeed; a controller-only process without it still gets its half
        import openrlhf.trainer.ray.ppo_actor as ppo_actor
    except ImportError as e:
        install_log.not_patched(
            "openrlhf",
            "openrlhf.trainer.ray.ppo_actor.ActorPPOTrainer",
            f"it does not import in this process ({e}); the actor ranks must install too",
        )
        return

    def new_sync() -> ActorWeightSync:
        factory = (lambda: client) if client is not None else (lambda: _client_from_env()[0])
        return ActorWeightSync(factory, weight_sync, dtype, run_id)

    key = (ppo_actor, "ActorPPOTrainer")
    _ORIGINALS.setdefault(key, ppo_actor.ActorPPOTrainer)
    # PolicyModelActor.init_model_from_pretrained builds the trainer by this global name.
    ppo_actor.ActorPPOTrainer = actor_trainer_class(new_sync, _ORIGINALS[key])
    install_log.patched(
        "openrlhf",
        "openrlhf.trainer.ray.ppo_actor.ActorPPOTrainer",
        f"pushes the weights after each vLLM broadcast ({weight_sync})",
    )


def wrap_train_step(original: Any) -> Any:
    """OpenRLHF's `BasePPOTrainer.train_step` (sync and async trainers), then the credit
    summary its experience maker left for this step added to the status it returns."""

    @functools.wraps(original)
    def train_step(self: Any, *args: Any, **kwargs: Any) -> Any:
        status, global_step = original(self, *args, **kwargs)
        maker = getattr(self, "experience_maker", None)
        summary = getattr(maker, "__dict__", {}).pop("anchorcredit_summary", None)
        if summary and isinstance(status, dict):
            status.update(summary)
        return status, global_step

    return train_step


def uninstall() -> None:
    """Undo install() in this process."""
    import openrlhf.trainer.ppo_trainer as ppo_trainer

    for (module, name), value in _ORIGINALS.items():
        setattr(module, name, value)
    _ORIGINALS.clear()
    unwrap_controller_broadcast(ppo_trainer.BasePPOTrainer)


def _client_from_env() -> tuple[CreditClient, dict[str, Any]]:
    """The client (ClientConfig.from_env) and the credit settings (settings.py)."""
    kwargs = credit_settings_from_env()
    pinned = pinned_version_from_env()
    if pinned:
        kwargs["policy_version"] = pinned
    return CreditClient(config=ClientConfig.from_env()), kwargs


def _sync_from_env() -> tuple[str | None, str | None, str | None]:
    """(transport or None, dtype, run_id) from ANCHORCREDIT_WEIGHT_SYNC (grpc by default;
    off when ANCHORCREDIT_PINNED_VERSION pins a fixed version, which excludes a sync),
    ANCHORCREDIT_WEIGHT_DTYPE and ANCHORCREDIT_RUN_ID."""
    env = os.environ
    pinned = bool(pinned_version_from_env())
    transport = env.get("ANCHORCREDIT_WEIGHT_SYNC", "off" if pinned else "grpc").strip().lower()
    if transport in ("off", "none", ""):
        return None, None, None
    if transport not in SYNC_TRANSPORTS:
        raise ValueError(
            f"ANCHORCREDIT_WEIGHT_SYNC must be off or one of {SYNC_TRANSPORTS}, got {transport!r}"
        )
    if pinned:
        raise ValueError(
            f"{PINNED_VERSION_ENV} pins one version, which the weight sync would replace "
            "after the first step: unset it or set ANCHORCREDIT_WEIGHT_SYNC=off"
        )
    dtype = env.get("ANCHORCREDIT_WEIGHT_DTYPE", "auto")
    return transport, None if dtype in ("", "none") else dtype, env.get("ANCHORCREDIT_RUN_ID")


def install_from_env() -> None:
    """Ray `worker_process_setup_hook`: install with settings from ANCHORCREDIT_* env vars.

    A worker without OpenRLHF gets nothing patched, and says so in its log (with the
    import error); the client is created lazily on first use.
    """
    transport, dtype, run_id = _sync_from_env()
    try:
        import openrlhf.trainer.ppo_trainer  # noqa: F401
    except ImportError as e:
        install_log.not_patched(
            "openrlhf", "this process", f"OpenRLHF does not import here ({e}): nothing patched"
        )
        return
    install(None, weight_sync=transport, dtype=dtype, run_id=run_id)
