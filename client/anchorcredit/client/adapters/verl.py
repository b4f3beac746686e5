"""verl hook: reweight `data.batch["advantages"]` [bs, response_length] by gamma_t.

Usage with verl's PPO/GRPO trainer (verl 0.9; the `RayPPOTrainer` fit loop calls the module
global `verl.trainer.ppo.ray_trainer.compute_advantage`, which `install` wraps):

    from anchorcredit.client import CreditClient
    from anchorcredit.client.adapters import verl as ac_verl

    client = CreditClient(["credit-svc:50051"], cache="redis://redis:6379/0")
    ac_verl.install(client, strategy="coupled_rhythm", sign="both", q=0.4)
    trainer = RayPPOTrainer(config, ...)      # in the driver process, after install
    trainer.fit()

Or call it yourself right after computing advantages, in any loop holding a DataProto:

    data = compute_advantage(data, adv_estimator=..., ...)
    data = ac_verl.apply_credit(data, client, strategy="coupled_rhythm")

Layout read from `data.batch` (verl's): `prompts` [bs, P] left-padded, `responses` [bs, T]
right-padded, `attention_mask` [bs, P + T], `response_mask` [bs, T], `advantages` [bs, T].
The response sent to the service is every real response token (attention mask), so in
multi-turn rollouts tool output stays in place; advantages there are masked out by verl.
verl's v1 trainer (`trainer.use_v1=True`) fetches only a few fields from its TransferQueue
in `_compute_advantage` (no token ids): subclass it to also fetch `prompts`, `responses` and
`attention_mask` and call `apply_credit` on the DataProto it builds there.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from anchorcredit.client.adapters.common import credit_for_batch
from anchorcredit.client.client import CreditClient
from anchorcredit.contract import DEFAULT_STRATEGY

__all__ = ["apply_credit", "install", "wrap_compute_advantage"]


def apply_credit(
    data: Any,
    client: CreditClient,
    *,
    strategy: str = DEFAULT_STRATEGY,
    policy_version: str | None = None,
    sign: str = "both",
    **credit_params: Any,
) -> Any:
    """Replace data.batch["advantages"] with gamma * advantages; returns `data`.

    `data` is a verl DataProto (or anything with a `.batch` mapping of tensors).
    """
    batch = data.batch
    responses = batch["responses"]
    t = responses.shape[-1]
    attention = batch["attention_mask"]
    prompts = batch["prompts"] if "prompts" in batch.keys() else batch["input_ids"][:, :-t]
    new_adv, gamma = credit_for_batch(
        client,
        batch["advantages"],
        prompts,
        attention[:, :-t],
        responses,
        attention[:, -t:],
        strategy=strategy,
        policy_version=policy_version,
        sign=sign,
        credit_params=credit_params,
    )
    batch["advantages"] = new_adv
    meta = getattr(data, "meta_info", None)
    if isinstance(meta, dict):  # verl logs what it finds in meta_info["metrics"]
        mask = attention[:, -t:].bool().cpu().numpy()
        if mask.any():
            meta.setdefault("metrics", {})["anchorcredit/gamma_mean"] = float(gamma[mask].mean())
    return data


def wrap_compute_advantage(fn: Callable[..., Any], client: CreditClient, **kwargs: Any):
    """verl's `compute_advantage(data, adv_estimator, ...)` followed by `apply_credit`."""

    @functools.wraps(fn)
    def compute_advantage(data: Any, *args: Any, **fn_kwargs: Any) -> Any:
        return apply_credit(fn(data, *args, **fn_kwargs), client, **kwargs)

    compute_advantage.__anchorcredit_wrapped__ = fn  # type: ignore[attr-defined]
    return compute_advantage


def install(client: CreditClient, **kwargs: Any) -> Callable[[], None]:
    """Wrap verl's ray_trainer.compute_advantage in this process; returns an undo function.

    kwargs: strategy, policy_version, sign and credit parameters (see apply_credit).
    """
    from verl.trainer.ppo import ray_trainer

    original = getattr(
        ray_trainer.compute_advantage, "__anchorcredit_wrapped__", ray_trainer.compute_advantage
    )
    ray_trainer.compute_advantage = wrap_compute_advantage(original, client, **kwargs)

    def undo() -> None:
        ray_trainer.compute_advantage = original

    return undo
