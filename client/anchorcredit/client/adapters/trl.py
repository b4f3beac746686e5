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
        # keep the service on the current policy: push the weights after every step
        callbacks=[WeightSyncCallback(client)],
    )
    trainer.train()

Where it hooks: `_generate_and_score_completions` returns the batch the loss consumes, with
[B] sequence advantages, left-padded `prompt_ids`/`prompt_mask` and right-padded
`completion_ids`/`completion_mask`. The hook sends the unpadded (prompt, completion) pairs to
the service and replaces `advantages` with the [B, T] product. TRL's `_compute_loss` already
accepts [B, T] advantages (it unsqueezes only 1-D ones), so the loss needs no change.
`make_trainer_class(base)` applies the same hook to a GRPOTrainer subclass of your own.

`WeightSyncCallback(client)` pushes the trainer's weights to every service address at the
start and after every optimizer step (gRPC stream by default; the private collective group
or save + UpdateWeights(path) as options) and the trainer then pins score() to that
version: results from any other weights are refused, never used.
"""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path
from typing import Any

from anchorcredit.client.adapters import install_log
from anchorcredit.client.adapters.common import credit_for_batch
from anchorcredit.client.adapters.policy_check import stale_policy_mode
from anchorcredit.client.adapters.summary import StepSummary, log_version
from anchorcredit.client.adapters.versions import note_run, same_on_every_rank, version_name
from anchorcredit.client.client import CreditClient
from anchorcredit.contract import DEFAULT_STRATEGY

# AnchorCreditGRPOTrainer is provided lazily by __getattr__ (it needs TRL at import).
__all__ = ["WeightSyncCallback", "make_trainer_class"]

_CLASSES: dict[type, type] = {}


def make_trainer_class(base: type | None = None) -> type:
    """A subclass of `base` (default trl.GRPOTrainer) whose advantages carry gamma_t.

    Extra constructor keywords: credit_client (required), credit_strategy, credit_params,
    credit_sign ("both" | "positive_only"), credit_policy_version (None: the version a
    WeightSyncCallback of this trainer synced last, else whatever the service holds, checked
    first: policy_check.py), credit_stale_policy ("warn" | "error" | "frozen"; None: the
    ANCHORCREDIT_STALE_POLICY setting, default "warn").
    """
    if base is None:
        from trl import GRPOTrainer

        base = GRPOTrainer
    if base not in _CLASSES:
        name = f"AnchorCredit{base.__name__}"
        cls = type(name, (_CreditTrainerMixin, base), {"__qualname__": name})
        cls.__doc__ = "GRPO with anchorcredit per-token credit (see the module docstring)."
        _CLASSES[base] = cls
    return _CLASSES[base]


class _CreditTrainerMixin:
    """What make_trainer_class adds to a GRPOTrainer (kept out of the factory so it reads
    as one class; TRL is only imported for the base)."""

    def __init__(
        self,
        *args: Any,
        credit_client: CreditClient,
        credit_strategy: str = DEFAULT_STRATEGY,
        credit_params: dict[str, Any] | None = None,
        credit_sign: str = "both",
        credit_policy_version: str | None = None,
        credit_stale_policy: str | None = None,
        **kwargs: Any,
    ) -> None:
        if credit_stale_policy is not None:
            stale_policy_mode(credit_stale_policy)  # a bad value fails here, not mid-run
        super().__init__(*args, **kwargs)
        self.credit_client = credit_client
        self.credit_strategy = credit_strategy
        self.credit_params = dict(credit_params or {})
        self.credit_sign = credit_sign
        self.credit_policy_version = credit_policy_version
        self.credit_stale_policy = credit_stale_policy
        base = type(self).__mro__[type(self).__mro__.index(_CreditTrainerMixin) + 1]
        install_log.patched(
            "trl",
            f"{base.__name__}._generate_and_score_completions",
            f"advantages x gamma; weight sync: {self._credit_pin_source()}",
        )

    def _weight_syncs(self) -> list[Any]:
        handler = getattr(self, "callback_handler", None)
        callbacks = getattr(handler, "callbacks", ())
        return [cb for cb in callbacks if getattr(cb, "is_anchorcredit_weight_sync", False)]

    def _credit_pin_source(self) -> str:
        if self._weight_syncs():
            return "WeightSyncCallback (scores pinned to each pushed version)"
        if self.credit_policy_version is not None:
            return f"none, {self.credit_policy_version!r} pinned by hand"
        return "none (the served version is checked before scoring: policy_check.py)"

    def _credit_version(self) -> str | None:
        """credit_policy_version if given, else the version a WeightSyncCallback of
        this trainer last synced (scores from other weights are refused), else None."""
        if self.credit_policy_version is not None:
            return self.credit_policy_version
        for cb in self._weight_syncs():
            if cb.version:
                return str(cb.version)
        return None

    def _generate_and_score_completions(self, inputs: Any) -> dict[str, Any]:
        out = super()._generate_and_score_completions(inputs)  # type: ignore[misc]
        summary = StepSummary()
        out["advantages"], _ = credit_for_batch(
            self.credit_client,
            out["advantages"],
            out["prompt_ids"],
            out["prompt_mask"],
            out["completion_ids"],
            out["completion_mask"],
            strategy=self.credit_strategy,
            policy_version=self._credit_version(),
            sign=self.credit_sign,
            credit_params=self.credit_params,
            stale_policy=self.credit_stale_policy,
            summary=summary,
        )
        metrics = getattr(self, "_metrics", None)
        if metrics is not None:  # TRL's per-mode metric lists, averaged by its log()
            mode = "train" if self.model.training else "eval"
            for name, value in summary.metrics().items():
                metrics[mode][name].append(value)
        log_version("trl", summary.version)
        return out


SYNC_TRANSPORTS = ("grpc", "collective", "disk")


def _weight_sync_callback_class() -> type:
    from transformers import TrainerCallback

    return type("_WeightSync", (_WeightSyncMixin, TrainerCallback), {})


class _WeightSyncMixin:
    """See WeightSyncCallback (mixed into transformers' TrainerCallback on first use)."""

    is_anchorcredit_weight_sync = True

    def __init__(
        self,
        client: CreditClient,
        path: str | Path | None = None,
        every_n_steps: int = 1,
        *,
        transport: str | None = None,
        dtype: str | None = "auto",
        run_id: str | None = None,
        sync_on_train_begin: bool = True,
        background: bool | None = None,
    ):
        transport = transport or ("disk" if path is not None else "grpc")
        if transport not in SYNC_TRANSPORTS:
            raise ValueError(f"transport must be one of {SYNC_TRANSPORTS}, got {transport!r}")
        if transport == "disk" and path is None:
            raise ValueError("transport='disk' needs a path the service can read")
        self.client = client
        self.path = Path(path) if path is not None else None
        self.every_n_steps = max(1, int(every_n_steps))
        self.transport = transport
        self.dtype = dtype
        self.run_id = run_id or uuid.uuid4().hex[:8]
        self.sync_on_train_begin = sync_on_train_begin
        self.background = background
        # the version pushed last (in the background: maybe still committing; the next
        # score() waits for it and raises if it failed)
        self.version: str | None = None
        self.seconds: list[float] = []  # the trainer's foreground time of each sync

    def in_background(self) -> bool:
        """Push in the background? Default (None): yes for a gRPC or collective push
        from a single process; a distributed run's other ranks score without waiting
        for rank 0's push, and a disk sync writes a folder, so those stay in-line."""
        if self.transport == "disk":
            return False
        if self.background is not None:
            return bool(self.background)
        return _world_size() == 1

    def version_for(self, step: int) -> str:
        return version_name(step, self.run_id)

    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any
    ) -> None:
        self.run_id = same_on_every_rank(self.run_id)
        note_run(self.run_id)
        if self.sync_on_train_begin and model is not None:
            self._sync(state, model)

    def on_step_end(
        self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any
    ) -> None:
        if model is None or state.global_step % self.every_n_steps:
            return
        self._sync(state, model)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # A background push sends the parameters by reference: it must end before the
        # optimizer changes them (it has, unless no score call waited for it).
        self.client.background_pusher.fence()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.client.background_pusher.wait()  # the last push: its failure is not lost

    def _sync(self, state: Any, model: Any) -> None:
        version = self.version_for(state.global_step)
        if version == self.version:
            return
        rank0 = getattr(state, "is_world_process_zero", True)
        t0 = time.perf_counter()
        if self.transport == "disk":
            if rank0:
                # The service reads this folder: it must be on storage both can see.
                model.save_pretrained(self.path, safe_serialization=True)
                self.client.update_weights(str(self.path), version)
        else:
            self._push(model, version, int(state.global_step), rank0, t0)
        self.seconds.append(time.perf_counter() - t0)
        self.version = version

    def _push(self, model: Any, version: str, step: int, rank0: bool, t0: float) -> None:
        from anchorcredit.client.weights import full_state_items

        # Every rank gathers (sharded models need all of them); rank 0 pushes. The items
        # stay valid after the gather: references to a plain model's parameters (fenced
        # before the optimizer step), copies of gathered ones.
        weights = list(full_state_items(model))
        if not rank0:
            return
        pusher = self.client.background_pusher
        pusher.add_blocked(time.perf_counter() - t0)
        self.client.push_weights_background(
            weights, version, step=step, transport=self.transport, dtype=self.dtype
        )
        if not self.in_background():
            pusher.wait()  # in-line: its time is the trainer's, its error now


def _world_size() -> int:
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return int(dist.get_world_size())


def WeightSyncCallback(
    client: CreditClient,
    path: str | Path | None = None,
    every_n_steps: int = 1,
    *,
    transport: str | None = None,
    dtype: str | None = "auto",
    run_id: str | None = None,
    sync_on_train_begin: bool = True,
    background: bool | None = None,
) -> Any:
    """A TrainerCallback that keeps the service on the trainer's current policy.

    Default: at the start of training and after every `every_n_steps` optimizer steps,
    push the model's full weights (gathered, PEFT-merged: `full_state`) to every address
    behind the client's targets over gRPC (`transport="collective"`: over the private
    broadcast group; `"disk"`, or giving `path`: save_pretrained to `path`, which the
    service must be able to read, then UpdateWeights). dtype: cast before sending ("auto":
    the serving dtype; None: as trained). Versions are "step-{global_step}-{run_id}" (a
    random run id unless given, the same on every rank), so a rerun never reuses a label
    whose cached results came from other weights. `.version` is the version the service
    serves; AnchorCreditGRPOTrainer passes it to score(), so a stale answer is refused.

    background (default: on in a single process, for gRPC and collective pushes): the push
    of step n runs in a background thread while the trainer generates step n+1's rollouts;
    the scoring of step n+1 pins step n's version and waits only if that push has not
    committed yet; a push that failed is raised there (BackgroundPushError naming the step),
    never a silent stale score. The optimizer step waits for a push still running
    (on_pre_optimizer_step), since a plain model's parameters are sent by reference.
    Distributed runs push in-line by default (the other ranks would score before rank 0's
    push committed); so does a disk sync.
    """
    return _weight_sync_callback_class()(
        client,
        path,
        every_n_steps,
        transport=transport,
        dtype=dtype,
        run_id=run_id,
        sync_on_train_begin=sync_on_train_begin,
        background=background,
    )


def __getattr__(name: str) -> Any:
    # Lazy: importing this module must not import TRL (or torch).
    if name == "AnchorCreditGRPOTrainer":
        return make_trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
