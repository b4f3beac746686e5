"""TRL GRPOTrainer hook: per-token advantages A~_t = gamma_t * A from a CreditService.

Usage (TRL >= 1.0; tested with TRL 1.16.0 on CPU):

    from trl import GRPOConfig
    from anchorcredit.client import CreditClient
    from anchorcredit.client.adapters.trl import AnchorCreditGRPOTrainer, WeightSyncCallback

    client = CreditClient(["credit-svc:50051"], cache="redis://redis:6379/0")
    trainer = AnchorCreditGRPOTrainer(
        model=model_dir, reward_funcs=reward_fn, args=GRPOConfig(...), train_dataset=ds,
        credit_client=client, credit_strategy="coupled_rhythm", credit_sign="both",
        credit_params={"q": 0.4, "gamma_amp": 1.5},
        # keep the service on the current policy: save + UpdateWeights every 10 steps
        callbacks=[WeightSyncCallback(client, "/shared/policy", every_n_steps=10)],
    )
    trainer.train()

Where it hooks: `_generate_and_score_completions` returns the batch the loss consumes, with
[B] sequence advantages, left-padded `prompt_ids`/`prompt_mask` and right-padded
`completion_ids`/`completion_mask`. The hook sends the unpadded (prompt, completion) pairs to
the service and replaces `advantages` with the [B, T] product. TRL's `_compute_loss` already
accepts [B, T] advantages (it unsqueezes only 1-D ones), so the loss needs no change.
`make_trainer_class(base)` applies the same hook to a GRPOTrainer subclass of your own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from anchorcredit.client.adapters.common import credit_for_batch
from anchorcredit.client.client import CreditClient
from anchorcredit.contract import DEFAULT_STRATEGY

# AnchorCreditGRPOTrainer is provided lazily by __getattr__ (it needs TRL at import).
__all__ = ["WeightSyncCallback", "make_trainer_class"]

_CLASSES: dict[type, type] = {}


def make_trainer_class(base: type | None = None) -> type:
    """A subclass of `base` (default trl.GRPOTrainer) whose advantages carry gamma_t.

    Extra constructor keywords: credit_client (required), credit_strategy, credit_params,
    credit_sign ("both" | "positive_only"), credit_policy_version (None: what the service
    holds).
    """
    if base is None:
        from trl import GRPOTrainer

        base = GRPOTrainer
    if base in _CLASSES:
        return _CLASSES[base]

    class AnchorCreditTrainer(base):  # type: ignore[misc, valid-type]
        """GRPO with anchorcredit per-token credit (see the module docstring)."""

        def __init__(
            self,
            *args: Any,
            credit_client: CreditClient,
            credit_strategy: str = DEFAULT_STRATEGY,
            credit_params: dict[str, Any] | None = None,
            credit_sign: str = "both",
            credit_policy_version: str | None = None,
            **kwargs: Any,
        ) -> None:
            super().__init__(*args, **kwargs)
            self.credit_client = credit_client
            self.credit_strategy = credit_strategy
            self.credit_params = dict(credit_params or {})
            self.credit_sign = credit_sign
            self.credit_policy_version = credit_policy_version

        def _generate_and_score_completions(self, inputs: Any) -> dict[str, Any]:
            out = super()._generate_and_score_completions(inputs)
            adv = out["advantages"]
            new_adv, gamma = credit_for_batch(
                self.credit_client,
                adv,
                out["prompt_ids"],
                out["prompt_mask"],
                out["completion_ids"],
                out["completion_mask"],
                strategy=self.credit_strategy,
                policy_version=self.credit_policy_version,
                sign=self.credit_sign,
                credit_params=self.credit_params,
            )
            out["advantages"] = new_adv
            metrics = getattr(self, "_metrics", None)
            if metrics is not None:  # TRL's per-mode metric lists, logged with the rest
                mode = "train" if self.model.training else "eval"
                mask = out["completion_mask"].bool().cpu().numpy()
                if mask.any():
                    metrics[mode]["anchorcredit/gamma_mean"].append(float(gamma[mask].mean()))
            return out

    AnchorCreditTrainer.__name__ = f"AnchorCredit{base.__name__}"
    AnchorCreditTrainer.__qualname__ = AnchorCreditTrainer.__name__
    _CLASSES[base] = AnchorCreditTrainer
    return AnchorCreditTrainer


def _weight_sync_callback_class() -> type:
    from transformers import TrainerCallback

    class _WeightSync(TrainerCallback):
        def __init__(self, client: CreditClient, path: str | Path, every_n_steps: int = 1):
            self.client = client
            self.path = Path(path)
            self.every_n_steps = max(1, int(every_n_steps))

        def on_step_end(
            self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any
        ) -> None:
            if model is None or state.global_step % self.every_n_steps:
                return
            if getattr(state, "is_world_process_zero", True):
                # The service reads this folder: it must be on storage both can see.
                model.save_pretrained(self.path, safe_serialization=True)
                self.client.update_weights(str(self.path), str(state.global_step))

    return _WeightSync


def WeightSyncCallback(client: CreditClient, path: str | Path, every_n_steps: int = 1) -> Any:
    """A TrainerCallback: every n steps save the policy to `path` (safetensors) and have each
    service target load it as policy version str(global_step)."""
    return _weight_sync_callback_class()(client, path, every_n_steps)


def __getattr__(name: str) -> Any:
    # Lazy: importing this module must not import TRL (or torch).
    if name == "AnchorCreditGRPOTrainer":
        return make_trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
