"""AReaL's single-controller mode: install the hooks in the actor workers.

In AReaL's default mode (AREAL_SPMD_MODE unset, a plain `python train.py`) the trainer
script is a controller: `PPOActorController.compute_advantages` and `update_weights` are
RPCs to worker processes that the scheduler starts from each `SchedulingSpec.cmd` (AReaL's
RPC server, `python -m areal.infra.rpc.rpc_server`) and `env_vars`. A hook installed in the
controller would never run. So `install` / `install_weight_sync` there wrap
`TrainController.initialize`: when the actor's workers are about to be created, their
command becomes `python -m anchorcredit.client.adapters.areal_worker` (which installs the
hooks from the environment, then runs AReaL's RPC server unchanged) and their environment
carries the settings (ANCHORCREDIT_AREAL, see `encode_settings`). The specs are restored
once the workers exist.

Covered: AReaL's LocalScheduler and SlurmScheduler (they run `cmd`), PPOActorController.
Refused with an error naming the way out: the Ray scheduler (its workers are Ray actors
that ignore `cmd`), the gateway controller (`_version="v2"`), and a custom worker command.

The workers build their own CreditClient: targets from the client given here; cache,
tokens and timeout from their own ANCHORCREDIT_CACHE / _TOKEN / _ADMIN_TOKEN /
_TIMEOUT_S environment (AReaL's local scheduler passes the controller's environment on;
on Slurm, set them in the job's). Secrets never go into the worker command line.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import shlex
import threading
from collections.abc import Callable
from typing import Any

from anchorcredit.client.adapters import install_log
from anchorcredit.client.adapters.policy_check import stale_policy_mode
from anchorcredit.client.client import CreditClient

__all__ = ["SETTINGS_ENV", "WORKER_MODULE", "decode_settings", "install_credit", "install_sync"]

SETTINGS_ENV = "ANCHORCREDIT_AREAL"
WORKER_MODULE = "anchorcredit.client.adapters.areal_worker"
_AREAL_SERVER = "areal.infra.rpc.rpc_server"
_SCHEDULERS_THAT_RUN_CMD = ("LocalScheduler", "SlurmScheduler")

# What the actor workers install: {"credit": {...} | None, "sync": {...} | None, "targets"}
_SETTINGS: dict[str, Any] = {}
_LOCK = threading.Lock()
_WRAPPED: dict[str, Any] = {}


def encode_settings(settings: dict[str, Any]) -> str:
    """One env value without ',' or '=' (AReaL's scheduler splits env_vars on both)."""
    raw = json.dumps(settings, sort_keys=True).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_settings(value: str) -> dict[str, Any]:
    padded = value + "=" * (-len(value) % 4)
    return dict(json.loads(base64.urlsafe_b64decode(padded)))


def install_credit(
    client: CreditClient,
    *,
    policy_version: str | None = None,
    strategy: str | None = None,
    sign: str = "both",
    stale_policy: str | None = None,
    **credit_params: Any,
) -> Callable[[], None]:
    """The credit hook, in the actor workers AReaL creates after this call."""
    if stale_policy is not None:
        stale_policy_mode(stale_policy)
    credit = {
        "strategy": strategy,
        "sign": sign,
        "policy_version": policy_version,
        "stale_policy": stale_policy,
        "params": credit_params,
    }
    return _set("credit", credit, client)


def install_sync(
    client: CreditClient,
    *,
    transport: str = "grpc",
    dtype: str | None = "auto",
    run_id: str | None = None,
) -> Callable[[], None]:
    """The weight sync, in the actor workers AReaL creates after this call."""
    return _set("sync", {"transport": transport, "dtype": dtype, "run_id": run_id}, client)


def _set(part: str, value: dict[str, Any], client: CreditClient) -> Callable[[], None]:
    json.dumps(value)  # settings travel as JSON: fail here, not in the worker
    with _LOCK:
        _SETTINGS[part] = value
        _SETTINGS["targets"] = list(client.targets)
    _wrap_initialize()
    install_log.note(
        "areal",
        f"single-controller mode: the actor workers will install the {part} hook "
        f"(started as `python -m {WORKER_MODULE}`)",
    )

    def undo() -> None:
        with _LOCK:
            _SETTINGS.pop(part, None)
            if "credit" not in _SETTINGS and "sync" not in _SETTINGS:
                _SETTINGS.clear()
                _unwrap_initialize()

    return undo


def _wrap_initialize() -> None:
    from areal.infra.controller.train_controller import TrainController

    if "initialize" in _WRAPPED:
        return
    original = TrainController.initialize

    @functools.wraps(original)
    def initialize(self: Any, role: str, *args: Any, **kwargs: Any) -> Any:
        with _LOCK:
            settings = dict(_SETTINGS)
        if not settings or not _is_actor(self):
            return original(self, role, *args, **kwargs)
        _check_supported(self)
        specs = list(self.config.scheduling_spec)
        saved = [(spec.cmd, dict(spec.env_vars)) for spec in specs]
        for spec in specs:
            spec.cmd = _worker_cmd(spec.cmd)
            spec.env_vars[SETTINGS_ENV] = encode_settings(settings)
        try:
            return original(self, role, *args, **kwargs)
        finally:  # the workers exist now; the config is the user's again
            for spec, (cmd, env) in zip(specs, saved, strict=True):
                spec.cmd, spec.env_vars = cmd, env

    _WRAPPED["initialize"] = original
    TrainController.initialize = initialize
    install_log.patched(
        "areal",
        "areal.infra.controller.train_controller.TrainController.initialize",
        "starts the actor workers through anchorcredit's worker entry point",
    )
    _refuse_gateway()


def _refuse_gateway() -> None:
    """AReaL's gateway controller (`_version="v2"`) starts workers its own way: refuse."""
    try:
        from areal.experimental.training_service.controller.controller import (
            GatewayTrainController,
        )
        from areal.trainer.ppo.actor import PPOActorControllerV2
    except ImportError as e:
        install_log.not_patched("areal", "GatewayTrainController", f"does not import ({e})")
        return
    original = GatewayTrainController.initialize

    @functools.wraps(original)
    def initialize(self: Any, role: str, *args: Any, **kwargs: Any) -> Any:
        with _LOCK:
            active = bool(_SETTINGS)
        if active and isinstance(self, PPOActorControllerV2):
            raise RuntimeError(
                "anchorcredit does not cover AReaL's gateway controller (actor config "
                "_version='v2'): use the default controller, or AReaL's SPMD mode "
                "(AREAL_SPMD_MODE=1)"
            )
        return original(self, role, *args, **kwargs)

    _WRAPPED["gateway"] = original
    GatewayTrainController.initialize = initialize


def _unwrap_initialize() -> None:
    original = _WRAPPED.pop("initialize", None)
    if original is not None:
        from areal.infra.controller.train_controller import TrainController

        TrainController.initialize = original
    gateway = _WRAPPED.pop("gateway", None)
    if gateway is not None:
        from areal.experimental.training_service.controller.controller import (
            GatewayTrainController,
        )

        GatewayTrainController.initialize = gateway


def _is_actor(controller: Any) -> bool:
    from areal.trainer.ppo.actor import PPOActorController

    return isinstance(controller, PPOActorController)


def _check_supported(controller: Any) -> None:
    scheduler = type(controller.scheduler).__name__
    if scheduler not in _SCHEDULERS_THAT_RUN_CMD:
        raise RuntimeError(
            f"anchorcredit cannot install its AReaL hooks in the workers of {scheduler}: "
            "only the local and Slurm schedulers start workers from SchedulingSpec.cmd. "
            "Run in AReaL's SPMD mode instead (AREAL_SPMD_MODE=1, set by "
            "`python -m areal.infra.launcher.local train.py ...`), where install() hooks the "
            "engines of the process it runs in"
        )


def _worker_cmd(cmd: str | None) -> str:
    """AReaL's RPC server command with anchorcredit's worker module in its place."""
    words = shlex.split(cmd or f"python -m {_AREAL_SERVER}")
    if WORKER_MODULE in words:
        return shlex.join(words)
    if _AREAL_SERVER not in words:
        raise RuntimeError(
            f"anchorcredit needs the actor workers to run AReaL's RPC server "
            f"(`python -m {_AREAL_SERVER}`), through `python -m {WORKER_MODULE}`; this "
            f"config starts them with {cmd!r}. Put `-m {WORKER_MODULE}` in place of "
            f"`-m {_AREAL_SERVER}` yourself, or use AReaL's SPMD mode (AREAL_SPMD_MODE=1)"
        )
    return shlex.join([WORKER_MODULE if w == _AREAL_SERVER else w for w in words])


def settings_from_env() -> dict[str, Any] | None:
    value = os.environ.get(SETTINGS_ENV)
    return decode_settings(value) if value else None
