"""SkyRL hook (skyrl 0.3.0, the skyrl-train backend): gamma_t on SkyRL's advantages, and the
service kept on the policy SkyRL's inference engines follow.

Where it hooks (docs/trainers/skyrl.md):

- advantages: `skyrl.train.trainer.RayPPOTrainer.compute_advantages_and_returns(data)`
  calls the estimator SkyRL's `AdvantageEstimatorRegistry` holds for
  `trainer.algorithm.advantage_estimator` (grpo, gae, rloo, reinforce++, maxrl, or one
  registered with `register_advantage_estimator`). Registry estimators get rewards, masks
  and uids but not the token ids the service scores, and in step-wise training SkyRL
  broadcasts their output to each step afterwards; so the hook wraps that trainer method
  and scales `data["advantages"]` right after SkyRL's own step, whichever estimator the
  registry returned. The fully-async trainer inherits the method.
- weights (skyrl_sync.py): after each policy-worker `broadcast_to_inference_engines` the
  worker ranks push the same weights (SkyRL's own weight extractor: full tensors under the
  names vLLM loads) as `step-<n>-<run>`, and after `WorkerDispatch.save_weights_for_sampler`
  the trainer pins scoring to exactly that version.

SkyRL runs the trainer in its `skyrl_entrypoint` Ray task and the policy in Ray worker
actors; a Ray worker setup hook installs both halves in every process of the job:

    ray job submit --runtime-env-json '{
      "worker_process_setup_hook": "anchorcredit.client.adapters.skyrl.install_from_env",
      "env_vars": {"ANCHORCREDIT_TARGETS": "credit-svc:50051",
                   "ANCHORCREDIT_STRATEGY": "coupled_rhythm"}}' \\
      -- python -m skyrl.train.entrypoints.main_base trainer.algorithm.advantage_estimator=grpo ...

(Ray merges this job runtime env with the one SkyRL's own `ray.init` passes.) In a custom
entrypoint, `install(client, ...)` in the process that runs the trainer does the same.

Layout (SkyRL's `convert_prompts_responses_to_batch_tensors`): `sequences` [B, L] left-padded
prompt + response; response-level tensors [B, R] right-aligned (`response_mask` marks the
last n_i positions: row i's response, tool observations included; `loss_mask` the tokens
trained on). The response sent is those n_i tokens, the prompt every attended token before;
advantages change only where `loss_mask` is set.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from anchorcredit.client.adapters import install_log, skyrl_sync
from anchorcredit.client.adapters.common import gammas_for_rows
from anchorcredit.client.adapters.policy_check import stale_policy_mode
from anchorcredit.client.adapters.settings import (
    client_from_env,
    credit_settings_from_env,
    pinned_version_from_env,
)
from anchorcredit.client.adapters.summary import StepSummary, log_version
from anchorcredit.client.adapters.verl_imports import PostImportHooks
from anchorcredit.client.client import CreditClient
from anchorcredit.client.reweight import _to_numpy, gamma_matrix, reweight
from anchorcredit.contract import DEFAULT_STRATEGY

__all__ = ["apply_credit", "install", "install_from_env", "response_rows"]


def response_rows(
    sequences: Any, attention_mask: Any, response_mask: Any, rows: int | None = None
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(prompts, responses) of SkyRL's layout for the first `rows` rows (all: None)."""
    ids = _to_numpy(sequences)
    attn = _to_numpy(attention_mask).astype(bool)
    resp = _to_numpy(response_mask).astype(bool)
    prompts, responses = [], []
    for b in range(ids.shape[0] if rows is None else rows):
        real = ids[b][attn[b]]  # left padding dropped: prompt + response
        n = int(resp[b].sum())
        prompts.append(real[: len(real) - n])
        responses.append(real[len(real) - n :])
    return prompts, responses


def apply_credit(
    data: Any,
    client: CreditClient,
    *,
    strategy: str = DEFAULT_STRATEGY,
    policy_version: str | None = None,
    sign: str = "both",
    stale_policy: str | None = None,
    **credit_params: Any,
) -> dict[str, float]:
    """Replace data["advantages"] with gamma * advantages where `loss_mask` is set; returns
    the step's credit summary over those tokens (summary.py: `anchorcredit/gamma_mean`, ...).

    data: SkyRL's TrainingInputBatch after its `compute_advantages_and_returns`. Padding rows
    (`metadata["pad_size"]`, added for data-parallel divisibility) are not sent.
    policy_version: the version the scores must come from (else refused); None: the served
    version is checked first (stale_policy, policy_check.py).
    """
    adv = data["advantages"]
    response_mask, loss_mask = data["response_mask"], data["loss_mask"]
    pad = int((getattr(data, "metadata", None) or {}).get("pad_size", 0) or 0)
    rows = adv.shape[0] - pad
    prompts, responses = response_rows(
        data["sequences"], data["attention_mask"], response_mask, rows
    )
    summary = StepSummary()
    gammas = gammas_for_rows(
        client,
        prompts,
        responses,
        strategy=strategy,
        policy_version=policy_version,
        credit_params=credit_params,
        stale_policy=stale_policy,
        summary=summary,
    )
    gammas += [np.ones(int(m.sum()), np.float32) for m in _to_numpy(response_mask)[rows:]]
    dense = gamma_matrix(gammas, response_mask)
    data["advantages"] = reweight(adv, dense, loss_mask, sign=sign)
    summary.add_gammas(dense[:rows], _to_numpy(loss_mask)[:rows])  # dp padding rows: not data
    log_version("skyrl", summary.version)
    return summary.metrics()


@dataclass
class _Config:
    client: CreditClient | None = None  # None: from the environment, on first use
    kwargs: dict[str, Any] = field(default_factory=dict)  # apply_credit's
    sync: bool = True
    built_client: bool = False

    def get_client(self) -> CreditClient:
        if self.client is None:
            self.client = client_from_env()
            self.built_client = True
        return self.client

    def close_built_client(self) -> None:
        if self.built_client and self.client is not None:
            client, self.client, self.built_client = self.client, None, False
            client.close()


_CONFIG = _Config()
_HOOKS: PostImportHooks | None = None


def _compute_advantages(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def compute_advantages_and_returns(self: Any, data: Any) -> Any:
        data = original(self, data)  # SkyRL's estimator, from its registry
        kwargs = dict(_CONFIG.kwargs)
        if kwargs.get("policy_version") is None and _CONFIG.sync:
            kwargs["policy_version"] = skyrl_sync.PIN.version
        summary = apply_credit(data, _CONFIG.get_client(), **kwargs)
        metrics = getattr(self, "all_metrics", None)
        if isinstance(metrics, dict):  # SkyRL logs all_metrics once per step
            metrics.update(summary)
        return data

    return compute_advantages_and_returns


def _hooks(sync: bool, transport: str) -> dict[str, Callable[[Any], Callable[[], None]]]:
    hooks: dict[str, tuple[Callable[[Any], Callable[[], None]], str]] = {
        "skyrl.train.trainer": (
            lambda m: _patch(
                m.RayPPOTrainer, "compute_advantages_and_returns", _compute_advantages
            ),
            "RayPPOTrainer.compute_advantages_and_returns x gamma (every registry estimator)",
        ),
    }
    if sync:
        hooks["skyrl.backends.skyrl_train.workers.worker_dispatch"] = (
            lambda m: _patch(
                m.WorkerDispatch,
                "save_weights_for_sampler",
                lambda f: skyrl_sync.pin_after_sync(f, _CONFIG.get_client),
            ),
            "WorkerDispatch.save_weights_for_sampler pins scoring to the pushed version",
        )
        for module, cls in skyrl_sync.POLICY_WORKERS.items():
            hooks[module] = (
                lambda m, cls=cls: _patch(
                    getattr(m, cls),
                    "broadcast_to_inference_engines",
                    lambda f: skyrl_sync.push_after_broadcast(f, _CONFIG.get_client, transport),
                ),
                f"{cls}.broadcast_to_inference_engines also pushes the weights ({transport})",
            )
    return {name: _logged(name, patch, what) for name, (patch, what) in hooks.items()}


def _logged(
    name: str, patch: Callable[[Any], Callable[[], None]], what: str
) -> Callable[[Any], Callable[[], None]]:
    def apply(module: Any) -> Callable[[], None]:
        try:
            undo = patch(module)
        except Exception as e:  # a SkyRL that moved the hook point: say so, loudly
            install_log.not_patched("skyrl", name, f"{type(e).__name__}: {e}")
            raise
        install_log.patched("skyrl", name, what)
        return undo

    return apply


def _patch(owner: type, name: str, make: Callable[[Any], Any]) -> Callable[[], None]:
    """owner.name = make(current), once; returns the undo."""
    current = owner.__dict__[name]
    if getattr(current, "__anchorcredit_patched__", False):
        return lambda: None
    new = make(current)
    new.__anchorcredit_patched__ = True
    setattr(owner, name, new)
    return lambda: setattr(owner, name, current)


def install(
    client: CreditClient | None = None,
    *,
    strategy: str = DEFAULT_STRATEGY,
    sign: str = "both",
    policy_version: str | None = None,
    sync: bool = True,
    sync_transport: str = "grpc",
    stale_policy: str | None = None,
    **credit_params: Any,
) -> Callable[[], None]:
    """Hook SkyRL in this process (now for loaded modules, on import for the others),
    replacing an earlier install; returns an undo function.

    client None: built from ANCHORCREDIT_* on first use (install_from_env). sync: push the
    policy's weights at each SkyRL weight sync and pin scoring to that version (both halves
    must be installed: the trainer's process and the policy workers'); policy_version pins
    a fixed version instead (and excludes sync). stale_policy: what an unpinned score does
    when the service holds weights this run did not push (policy_check.py).
    """
    global _CONFIG, _HOOKS
    if sync_transport not in skyrl_sync.SYNC_TRANSPORTS:
        raise ValueError(f"sync_transport must be one of {skyrl_sync.SYNC_TRANSPORTS}")
    if sync and policy_version is not None:
        raise ValueError("a fixed policy_version and sync exclude each other: pass sync=False")
    if stale_policy is not None:
        stale_policy_mode(stale_policy)
    if _HOOKS is not None:
        _HOOKS.remove()
    _CONFIG.close_built_client()
    kwargs = {"strategy": strategy, "sign": sign, "policy_version": policy_version}
    kwargs |= {"stale_policy": stale_policy, **credit_params}
    _CONFIG = _Config(client, kwargs, sync)
    skyrl_sync.reset()
    hooks = _hooks(sync, sync_transport)
    later = sorted(name for name in hooks if name not in sys.modules)
    _HOOKS = PostImportHooks(hooks)
    _HOOKS.install()
    if later:
        install_log.note("skyrl", f"will patch on import: {', '.join(later)}")

    def undo() -> None:
        global _HOOKS
        if _HOOKS is not None:
            _HOOKS.remove()
            _HOOKS = None
        _CONFIG.close_built_client()

    return undo


def install_from_env() -> None:
    """Ray `worker_process_setup_hook`: `install()` with settings from the environment.

    The client's settings are ClientConfig.from_env()'s (ANCHORCREDIT_TARGETS required,
    _CACHE, _TIMEOUT_S, _TOKEN, _ADMIN_TOKEN, ...: docs/CLIENT.md); the credit settings
    settings.py's (_STRATEGY, _SIGN, _PARAMS, _PINNED_VERSION: a fixed pin, no sync); then
    _SYNC ("0": no weight sync), _SYNC_TRANSPORT ("grpc" | "collective"), _RUN_ID,
    _STALE_POLICY. Nothing of SkyRL is imported here: each module is patched when the
    process imports it.
    """
    env = os.environ
    pinned = pinned_version_from_env()
    install(
        None,
        policy_version=pinned,
        sync=pinned is None and env.get("ANCHORCREDIT_SYNC", "1") not in ("0", "false", "no"),
        sync_transport=env.get("ANCHORCREDIT_SYNC_TRANSPORT", "grpc"),
        **credit_settings_from_env(),
    )
