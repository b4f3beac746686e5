"""AReaL hook: gamma_t on the advantages AReaL's PPOActor computes (tested with AReaL 1.0.4).

Usage, in the training script AReaL's launcher runs on every rank (SPMD mode,
`python -m areal.infra.launcher.local train.py --config ...`), before the trainer is built:

    from anchorcredit.client import CreditClient
    from anchorcredit.client.adapters import areal as ac_areal
    from anchorcredit.client.adapters.areal_sync import install_weight_sync

    client = CreditClient(["credit-svc:50051"], cache="redis://redis:6379/0")
    ac_areal.install(client, strategy="coupled_rhythm", sign="both", q=0.4)
    install_weight_sync(client)          # the service follows the policy (areal_sync.py)
    with PPOTrainer(config, train_dataset=..., valid_dataset=...) as trainer:
        trainer.train(workflow=..., ...)

Where it hooks: every AReaL actor engine (FSDPPPOActor, MegatronPPOActor, ArchonPPOActor)
delegates `compute_advantages` to `areal.trainer.ppo.actor.PPOActor`, whose
`_compute_advantages(data)` turns one padded batch into advantages. `install` wraps that
method on the class, so the actors of this process apply gamma right after AReaL's own
advantages (GAE/GRPO, after AReaL's normalisation) and before `ppo_update` reads them.

Layout after `_compute_advantages` (AReaL's): `input_ids`, `attention_mask` [B, L]
right-padded; `loss_mask` [B, L] already rolled by -1, so position j is the action that
produced token j + 1; `advantages` [B, L] on the same positions. The response sent to the
service is the span from the first to the last response token: in multi-turn rollouts the
observation / user tokens inside it stay in place (their loss_mask is 0, so their advantages
are left as AReaL made them); the prompt is every attended token before it.

The step's credit summary (summary.py) goes to AReaL's `stats_tracker` under the scope
`anchorcredit` (`anchorcredit/gamma_mean`, ...), exported with the step's other statistics
by the engine's `export_stats()` to AReaL's stats logger.

AReaL's default single-controller mode (a plain `python train.py`; AREAL_SPMD_MODE unset)
runs the engines in worker processes the script does not reach: there `install` (and
`install_weight_sync`) make AReaL start the actor workers through anchorcredit's worker
entry point, which installs the same hooks in them (areal_controller.py, areal_worker.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from anchorcredit.client.adapters import install_log
from anchorcredit.client.adapters.common import credit_for_shifted_batch
from anchorcredit.client.adapters.policy_check import stale_policy_mode
from anchorcredit.client.adapters.summary import StepSummary, log_version
from anchorcredit.client.client import CreditClient
from anchorcredit.contract import DEFAULT_STRATEGY

__all__ = ["apply_credit", "install", "install_in_process"]

# The attribute a weight sync (areal_sync.py) sets on the train engine: the version the
# service serves for this engine's current weights.
VERSION_ATTR = "_anchorcredit_policy_version"


def apply_credit(
    data: dict[str, Any],
    client: CreditClient,
    *,
    strategy: str = DEFAULT_STRATEGY,
    policy_version: str | None = None,
    sign: str = "both",
    stale_policy: str | None = None,
    **credit_params: Any,
) -> dict[str, Any]:
    """Replace data["advantages"] with gamma * advantages on the response actions; returns
    `data` (the batch dict `PPOActor._compute_advantages` returned).

    Positions where the rolled loss mask is 0 (prompt, padding, tool/user tokens) keep their
    values exactly. policy_version: the version the scores must come from (else refused);
    None: the served version is checked first (stale_policy, policy_check.py). The step's
    credit summary goes to AReaL's stats_tracker (`anchorcredit/gamma_mean`, ...).
    """
    summary = StepSummary()
    data["advantages"], _ = credit_for_shifted_batch(
        client,
        data["advantages"],
        data["input_ids"],
        data["attention_mask"],
        data["loss_mask"],
        strategy=strategy,
        policy_version=policy_version,
        sign=sign,
        credit_params=credit_params,
        stale_policy=stale_policy,
        summary=summary,
    )
    _log_summary(summary)
    return data


def _log_summary(summary: StepSummary) -> None:
    log_version("areal", summary.version)
    try:  # AReaL's own tracker, exported with the step's other statistics
        from areal.utils import stats_tracker
    except ImportError:
        return
    with stats_tracker.scope("anchorcredit"):  # AReaL joins scope and name with "/"
        stats_tracker.scalar(**summary.metrics(prefix=""))


def install(
    client: CreditClient,
    *,
    policy_version: str | None = None,
    actor_class: type | None = None,
    **kwargs: Any,
) -> Callable[[], None]:
    """Hook AReaL's advantages; returns an undo function. Installing again replaces the
    previous settings (never wraps twice).

    SPMD mode (AREAL_SPMD_MODE=1, AReaL's launchers): wraps `PPOActor._compute_advantages`
    (or `actor_class`'s) in this process, where the engines run. AReaL's default
    single-controller mode runs the engines in worker processes: the actor workers are then
    started through anchorcredit's worker entry point, which installs the same hook there
    (areal_controller.py; the workers build their own client from `client.targets` and
    their ANCHORCREDIT_* environment).

    kwargs: strategy, sign, stale_policy and credit parameters (see apply_credit).
    policy_version: pin every score to this version; None: the version the weight sync of
    the actor's engine put on the service (areal_sync.py), else whatever the service holds
    (checked first: policy_check.py).
    """
    if actor_class is None and single_controller():
        from anchorcredit.client.adapters import areal_controller

        return areal_controller.install_credit(client, policy_version=policy_version, **kwargs)
    return install_in_process(
        client, policy_version=policy_version, actor_class=actor_class, **kwargs
    )


def single_controller() -> bool:
    """True in AReaL's single-controller mode (the actor workers are separate processes)."""
    from areal.utils.environ import is_single_controller

    return bool(is_single_controller())


def install_in_process(
    client: CreditClient,
    *,
    policy_version: str | None = None,
    actor_class: type | None = None,
    **kwargs: Any,
) -> Callable[[], None]:
    """Wrap `PPOActor._compute_advantages` (or `actor_class`'s) in this process; returns an
    undo function. See install()."""
    if "stale_policy" in kwargs and kwargs["stale_policy"] is not None:
        stale_policy_mode(kwargs["stale_policy"])
    if actor_class is None:
        from areal.trainer.ppo.actor import PPOActor

        actor_class = PPOActor
    original = getattr(
        actor_class._compute_advantages,
        "__anchorcredit_wrapped__",
        actor_class._compute_advantages,
    )

    @functools.wraps(original)
    def _compute_advantages(self: Any, data: dict[str, Any]) -> dict[str, Any]:
        data = original(self, data)
        version = policy_version or getattr(getattr(self, "engine", None), VERSION_ATTR, None)
        return apply_credit(data, client, policy_version=version, **kwargs)

    _compute_advantages.__anchorcredit_wrapped__ = original  # type: ignore[attr-defined]
    actor_class._compute_advantages = _compute_advantages
    install_log.patched(
        "areal",
        f"{actor_class.__module__}.{actor_class.__qualname__}._compute_advantages",
        "advantages x gamma",
    )

    def undo() -> None:
        actor_class._compute_advantages = original

    return undo
