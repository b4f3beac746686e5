"""verl hook (verl 0.9.1): per-token advantages A~_t = gamma_t * A_t, and weight sync.

verl runs `fit()` inside its TaskRunner Ray actor and the actor weights inside worker
actors, so the hook must be installed in those processes: a Ray worker setup hook does it,
set through verl's own `ray_kwargs.ray_init.runtime_env` config (docs/trainers/verl.md):

    ENV=ray_kwargs.ray_init.runtime_env
    python -m verl.trainer.main_ppo ... \
      +$ENV.worker_process_setup_hook=anchorcredit.client.adapters.verl.install_from_env \
      +$ENV.env_vars.ANCHORCREDIT_TARGETS=credit-svc:50051

`install_from_env` registers post-import hooks (cheap: nothing of verl is imported until
the process itself imports it; already imported modules are patched at once, so the order
never matters). What gets patched when its module loads:

- v1 trainer (`trainer.use_v1=true`, the default; sync, colocate_async, separate_async
  modes): `PPOTrainer._compute_advantage`. After verl's own step (GRPO included, whose
  per-session re-broadcast would flatten any earlier per-token scaling) the advantages are
  read back from TransferQueue with the token ids, scaled, and written back; gamma
  statistics go into the fit loop's `metrics` dict.
- legacy trainer (`trainer.use_v1=false`, main_ppo_v0's RayPPOTrainer) and the
  experimental one-step-off / fully-async trainers: the module global `compute_advantage`
  of `verl.trainer.ppo.ray_trainer` and `verl.experimental.separation.ray_trainer`; the
  statistics ride on `_update_actor`'s output metrics, which those fit loops reduce and log.
- weight sync (ANCHORCREDIT_SYNC, on by default): `ActorRolloutRefWorker.update_weights`
  pushes the actor's weights before verl's own rollout sync, and
  `CheckpointEngineManager.update_weights` then pins scoring to that version (verl_sync.py).

In your own loop holding a padded DataProto, `apply_credit(data, client)` right after
`compute_advantage` does the scaling alone.
"""

from __future__ import annotations

import contextvars
import functools
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from anchorcredit.client.adapters import install_log, verl_sync
from anchorcredit.client.adapters.policy_check import stale_policy_mode
from anchorcredit.client.adapters.settings import (
    client_from_env,
    credit_settings_from_env,
    pinned_version_from_env,
)
from anchorcredit.client.adapters.verl_credit import credit_padded, credit_transfer_queue
from anchorcredit.client.adapters.verl_imports import PostImportHooks
from anchorcredit.client.client import CreditClient
from anchorcredit.contract import DEFAULT_STRATEGY

__all__ = ["apply_credit", "install", "install_from_env", "wrap_compute_advantage"]

META_KEY = "anchorcredit_metrics"  # DataProto.meta_info key holding this batch's gamma stats


def _publish(data: Any, stats: dict[str, float], metrics: dict | None) -> None:
    meta = getattr(data, "meta_info", None)
    if isinstance(meta, dict):
        meta[META_KEY] = dict(stats)
        # A dict of metrics (your own loop) gets them too; verl's agent loop leaves a list of
        # per-sample dicts there, which is not ours to change.
        if isinstance(meta.get("metrics"), dict):
            meta["metrics"].update(stats)
    if metrics is not None:
        metrics.update(stats)


def apply_credit(
    data: Any,
    client: CreditClient,
    *,
    strategy: str = DEFAULT_STRATEGY,
    policy_version: str | None = None,
    sign: str = "both",
    metrics: dict | None = None,
    stale_policy: str | None = None,
    **credit_params: Any,
) -> Any:
    """Replace data.batch["advantages"] with gamma * advantages (response_mask positions
    only); returns `data`. data: a verl DataProto in the padded layout (left-padded
    `prompts`, right-padded `responses`, `attention_mask`, `response_mask`). Gamma stats go
    to data.meta_info["anchorcredit_metrics"] and to `metrics` when given."""
    stats = credit_padded(
        client,
        data.batch,
        strategy=strategy,
        policy_version=policy_version,
        sign=sign,
        credit_params=credit_params,
        stale_policy=stale_policy,
    )
    _publish(data, stats, metrics)
    return data


@dataclass
class _Config:
    client: CreditClient | None = None  # None: built from the environment on first use
    strategy: str = DEFAULT_STRATEGY
    sign: str = "both"
    policy_version: str | None = None  # None: the synced version, else whatever is served
    params: dict[str, Any] = field(default_factory=dict)
    sync: bool = True
    sync_transport: str = "grpc"
    stale_policy: str | None = None  # unpinned scores: policy_check.py (None: the env's)
    built_client: bool = False  # the client came from the environment: ours to close

    def get_client(self) -> CreditClient:
        if self.client is None:
            self.client = client_from_env()
            self.built_client = True
        return self.client

    def close_built_client(self) -> None:
        """Close the client this install built (never one the user passed)."""
        if self.built_client and self.client is not None:
            client, self.client, self.built_client = self.client, None, False
            client.close()

    def score_kwargs(self) -> dict[str, Any]:
        version = self.policy_version
        if version is None and self.sync:
            version = verl_sync.STATE.version
        return {
            "strategy": self.strategy,
            "policy_version": version,
            "sign": self.sign,
            "credit_params": self.params,
            "stale_policy": self.stale_policy,
        }


_CONFIG = _Config()
_HOOKS: PostImportHooks | None = None
# Set while verl's v1 `_compute_advantage` runs: the compute_advantage it calls inside
# (possibly our wrapper, when v1 imported it after install) must leave gamma to the v1 hook.
_IN_V1 = contextvars.ContextVar("anchorcredit_verl_in_v1", default=False)


def wrap_compute_advantage(fn: Callable[..., Any], client: CreditClient | None = None, **kwargs):
    """verl's `compute_advantage(data, adv_estimator, ...)` followed by the credit step
    (client/kwargs: as apply_credit; none: the installed configuration)."""
    if getattr(fn, "__anchorcredit_wrapped__", None) is not None:
        return fn

    @functools.wraps(fn)
    def compute_advantage(data: Any, *args: Any, **fn_kwargs: Any) -> Any:
        out = fn(data, *args, **fn_kwargs)
        if _IN_V1.get() or (client is None and _HOOKS is None):
            return out  # v1 scales later; or uninstalled while a module still holds this
        if client is not None:
            return apply_credit(out, client, **kwargs)
        stats = credit_padded(_CONFIG.get_client(), out.batch, **_CONFIG.score_kwargs())
        _publish(out, stats, None)
        return out

    compute_advantage.__anchorcredit_wrapped__ = fn  # type: ignore[attr-defined]
    return compute_advantage


def _v1_compute_advantage(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def _compute_advantage(self: Any, batch: Any, metrics: dict) -> Any:
        token = _IN_V1.set(True)
        try:
            batch = original(self, batch, metrics=metrics)
        finally:
            _IN_V1.reset(token)
        stats = credit_transfer_queue(
            _CONFIG.get_client(), list(batch.keys), batch.partition_id, **_CONFIG.score_kwargs()
        )
        metrics.update(stats)
        return batch

    return _compute_advantage


def _legacy_update_actor(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def _update_actor(self: Any, batch: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(self, batch, *args, **kwargs)
        stats = getattr(batch, "meta_info", {}).get(META_KEY)
        meta = getattr(out, "meta_info", None)
        if stats and isinstance(meta, dict):
            reduced = meta.setdefault("metrics", {})  # the fit loop reduce_metrics() these
            if isinstance(reduced, dict):
                reduced.update({k: [v] for k, v in stats.items()})
        return out

    return _update_actor


def _actor_update_weights(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    async def update_weights(self: Any, global_steps: int | None = None, mode: str = "auto"):
        # Before verl's own sync: in colocated mode the rollout is still asleep, so the
        # gather has the device memory to itself.
        verl_sync.push_from_actor(
            self, global_steps, _CONFIG.get_client(), transport=_CONFIG.sync_transport
        )
        return await original(self, global_steps=global_steps, mode=mode)

    return update_weights


def _manager_update_weights(decorated: Callable[..., Any]) -> Callable[..., Any]:
    # verl decorates it with auto_await (sync or awaited call, decided from the caller's
    # frame), so wrap the coroutine function inside and decorate the wrapper the same way.
    from verl.utils.ray_utils import auto_await

    inner = getattr(decorated, "__wrapped__", decorated)

    @functools.wraps(inner)
    async def update_weights(self: Any, global_steps: int | None = None):
        result = await inner(self, global_steps=global_steps)
        verl_sync.record_sync(global_steps, _CONFIG.get_client())
        return result

    wrapped = auto_await(update_weights)
    wrapped.__anchorcredit_original__ = decorated  # type: ignore[attr-defined]
    return wrapped


def _patch_attr(owner: Any, name: str, make: Callable[[Any], Any]) -> Callable[[], None]:
    """owner.name = make(current), once; returns the undo."""
    current = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
    if getattr(current, "__anchorcredit_patched__", False):
        return lambda: None
    new = make(current)
    new.__anchorcredit_patched__ = True
    setattr(owner, name, new)
    return lambda: setattr(owner, name, current)


def _hooks(sync: bool) -> dict[str, Callable[[Any], Callable[[], None]]]:
    def global_compute_advantage(module: Any) -> Callable[[], None]:
        return _patch_attr(module, "compute_advantage", wrap_compute_advantage)

    def legacy(module: Any) -> Callable[[], None]:
        undo_fn = global_compute_advantage(module)
        undo_cls = _patch_attr(module.RayPPOTrainer, "_update_actor", _legacy_update_actor)
        return lambda: (undo_cls(), undo_fn())

    hooks = {
        "verl.trainer.ppo.ray_trainer": (
            legacy,
            "compute_advantage x gamma; RayPPOTrainer._update_actor logs gamma",
        ),
        "verl.experimental.separation.ray_trainer": (
            global_compute_advantage,
            "compute_advantage x gamma (one-step-off / fully-async)",
        ),
        "verl.trainer.ppo.v1.trainer_base": (
            lambda m: _patch_attr(m.PPOTrainer, "_compute_advantage", _v1_compute_advantage),
            "PPOTrainer._compute_advantage x gamma (v1)",
        ),
    }
    if sync:
        hooks["verl.workers.engine_workers"] = (
            lambda m: _patch_attr(m.ActorRolloutRefWorker, "update_weights", _actor_update_weights),
            "ActorRolloutRefWorker.update_weights pushes the actor's weights",
        )
        hooks["verl.checkpoint_engine.base"] = (
            lambda m: _patch_attr(
                m.CheckpointEngineManager, "update_weights", _manager_update_weights
            ),
            "CheckpointEngineManager.update_weights pins scoring to the pushed version",
        )
    return {name: _logged(name, patch, what) for name, (patch, what) in hooks.items()}


def _logged(
    name: str, patch: Callable[[Any], Callable[[], None]], what: str
) -> Callable[[Any], Callable[[], None]]:
    """`patch`, with a log line saying it ran (or why it could not)."""

    def apply(module: Any) -> Callable[[], None]:
        try:
            undo = patch(module)
        except Exception as e:  # a verl that moved the hook point: say so, loudly
            install_log.not_patched("verl", name, f"{type(e).__name__}: {e}")
            raise
        install_log.patched("verl", name, what)
        return undo

    return apply


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
    """Hook verl in this process (now for loaded modules, on import for the others),
    replacing an earlier install; returns an undo function. client None: from the
    ANCHORCREDIT_* env vars on first use (see install_from_env); a client built so is
    closed by the next install or the undo (one you pass stays yours to close).
    sync: push the actor weights at each verl weight sync and pin scoring to that version
    (policy_version, if given, pins a fixed version instead). stale_policy: what an
    unpinned score does when the service holds weights this run did not push ("warn" |
    "error" | "frozen"; None: ANCHORCREDIT_STALE_POLICY, policy_check.py)."""
    global _CONFIG, _HOOKS
    if sync_transport not in verl_sync.SYNC_TRANSPORTS:
        raise ValueError(f"sync_transport must be one of {verl_sync.SYNC_TRANSPORTS}")
    if stale_policy is not None:
        stale_policy_mode(stale_policy)
    if _HOOKS is not None:
        _HOOKS.remove()
    _CONFIG.close_built_client()  # the replaced install's own client: its channels, pool
    _CONFIG = _Config(
        client,
        strategy,
        sign,
        policy_version,
        dict(credit_params),
        sync,
        sync_transport,
        stale_policy=stale_policy,
    )
    hooks = _hooks(sync)
    later = sorted(name for name in hooks if name not in sys.modules)
    _HOOKS = PostImportHooks(hooks)
    _HOOKS.install()  # logs each module it patches now, the others when they are imported
    if later:
        install_log.note("verl", f"will patch on import: {', '.join(later)}")

    def undo() -> None:  # removes whichever install is current (a later one replaced this)
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
    settings.py's (_STRATEGY, _SIGN, _PARAMS, _PINNED_VERSION); then _SYNC ("0": no weight
    sync), _SYNC_TRANSPORT ("grpc" | "collective"), _RUN_ID (version names).
    """
    env = os.environ
    install(
        None,
        policy_version=pinned_version_from_env(),
        sync=env.get("ANCHORCREDIT_SYNC", "1") not in ("0", "false", "no"),
        sync_transport=env.get("ANCHORCREDIT_SYNC_TRANSPORT", "grpc"),
        **credit_settings_from_env(),
    )
