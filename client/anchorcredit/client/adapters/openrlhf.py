"""OpenRLHF hook: an experience maker whose `compute_advantages_and_returns` applies gamma_t.

OpenRLHF (0.11) builds `RemoteExperienceMaker` inside its `PPOTrainer` Ray actor, so the hook
has to be installed in that actor's process. A Ray worker setup hook does it from the
environment:

    ray job submit --runtime-env-json '{
      "worker_process_setup_hook": "anchorcredit.client.adapters.openrlhf.install_from_env",
      "env_vars": {"ANCHORCREDIT_TARGETS": "credit-svc:50051",
                   "ANCHORCREDIT_CACHE": "redis://redis:6379/0",
                   "ANCHORCREDIT_STRATEGY": "coupled_rhythm",
                   "ANCHORCREDIT_SIGN": "both",
                   "ANCHORCREDIT_PARAMS": "{\"q\": 0.4}"}}' \
      -- python -m openrlhf.cli.train_ppo_ray ...

In a single process (your own loop), `install(client, ...)` or
`experience_maker_class(client, ...)` do the same without Ray.

Layout (OpenRLHF's Experience): `sequences` [B, L] = prompt + response, right-padded,
`attention_mask` [B, L], `action_mask` [B, L-1] where action position j is the token at
sequence index j + 1, `advantages` [B, L-1]. The response sent is the span from the first to
the last action token (multi-turn observations inside it stay in place, masked out by
OpenRLHF); the prompt is every attended token before it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from anchorcredit.client.client import CreditClient
from anchorcredit.client.reweight import _to_numpy, reweight
from anchorcredit.contract import DEFAULT_STRATEGY

__all__ = ["apply_credit", "experience_maker_class", "install", "install_from_env"]


def apply_credit(
    experience: Any,
    client: CreditClient,
    *,
    strategy: str = DEFAULT_STRATEGY,
    policy_version: str | None = None,
    sign: str = "both",
    **credit_params: Any,
) -> Any:
    """Replace experience.advantages with gamma * advantages; returns `experience`."""
    seqs = _to_numpy(experience.sequences)
    attn = _to_numpy(experience.attention_mask).astype(bool)
    action = _to_numpy(experience.action_mask).astype(bool)
    prompts, responses, spans = [], [], []
    for b in range(seqs.shape[0]):
        pos = np.flatnonzero(action[b])
        if len(pos) == 0:
            continue
        first, last = int(pos[0]) + 1, int(pos[-1]) + 1  # sequence indices of the response
        prompt = seqs[b, :first][attn[b, :first]]
        if len(prompt) == 0:
            continue
        prompts.append(prompt)
        responses.append(seqs[b, first : last + 1])
        spans.append((b, first - 1, last))  # action-index range [first-1, last)
    dense = np.ones(action.shape, np.float32)
    if spans:
        results = client.score(
            prompts, responses, strategy=strategy, policy_version=policy_version, **credit_params
        )
        for (b, lo, hi), res in zip(spans, results, strict=True):
            dense[b, lo:hi] = res.gamma
    experience.advantages = reweight(experience.advantages, dense, action, sign=sign)
    info = getattr(experience, "info", None)
    if isinstance(info, dict) and action.any():
        # per-sample, like OpenRLHF's other info entries
        per = (dense * action).sum(1) / np.maximum(action.sum(1), 1)
        info["anchorcredit_gamma_mean"] = _like(experience.advantages, per)
    return experience


def _like(template: Any, values: np.ndarray) -> Any:
    if hasattr(template, "new_tensor"):
        return template.new_tensor(values.astype(np.float32))
    return values


def experience_maker_class(
    client: CreditClient | None = None, base: type | None = None, **kwargs: Any
) -> type:
    """A subclass of OpenRLHF's RemoteExperienceMaker (or `base`) that applies gamma after
    OpenRLHF's own advantages (and their normalisation). client None: from the environment
    (see install_from_env), created on first use in the process that runs it."""
    if base is None:
        from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker

        base = RemoteExperienceMaker

    class AnchorCreditExperienceMaker(base):  # type: ignore[misc, valid-type]
        _ac_client = client
        _ac_kwargs = kwargs

        def compute_advantages_and_returns(self, experiences: list[Any]) -> list[Any]:
            experiences = super().compute_advantages_and_returns(experiences)
            cls = type(self)
            if cls._ac_client is None:
                cls._ac_client, cls._ac_kwargs = _client_from_env()
            for exp in experiences:
                apply_credit(exp, cls._ac_client, **cls._ac_kwargs)
            return experiences

    return AnchorCreditExperienceMaker


def install(client: CreditClient | None = None, **kwargs: Any) -> None:
    """Make OpenRLHF's PPO trainers in this process build the anchorcredit experience maker."""
    import openrlhf.trainer.ppo_trainer as ppo_trainer

    ppo_trainer.RemoteExperienceMaker = experience_maker_class(client, **kwargs)
    try:
        import openrlhf.trainer.ppo_trainer_async as ppo_trainer_async
    except ImportError:
        return
    if hasattr(ppo_trainer_async, "RemoteExperienceMaker"):
        ppo_trainer_async.RemoteExperienceMaker = ppo_trainer.RemoteExperienceMaker


def _client_from_env() -> tuple[CreditClient, dict[str, Any]]:
    env = os.environ
    targets = [t for t in env.get("ANCHORCREDIT_TARGETS", "").split(",") if t]
    if not targets:
        raise RuntimeError("set ANCHORCREDIT_TARGETS (comma-separated host:port list)")
    client = CreditClient(
        targets,
        cache=env.get("ANCHORCREDIT_CACHE") or None,
        timeout_s=float(env.get("ANCHORCREDIT_TIMEOUT_S", "60")),
    )
    kwargs: dict[str, Any] = dict(json.loads(env.get("ANCHORCREDIT_PARAMS", "{}")))
    kwargs["strategy"] = env.get("ANCHORCREDIT_STRATEGY", DEFAULT_STRATEGY)
    kwargs["sign"] = env.get("ANCHORCREDIT_SIGN", "both")
    if env.get("ANCHORCREDIT_POLICY_VERSION"):
        kwargs["policy_version"] = env["ANCHORCREDIT_POLICY_VERSION"]
    return client, kwargs


def install_from_env() -> None:
    """Ray `worker_process_setup_hook`: install with settings from ANCHORCREDIT_* env vars.

    Does nothing in workers without OpenRLHF; the client is created lazily on first use.
    """
    try:
        install(None)
    except ImportError:
        pass
