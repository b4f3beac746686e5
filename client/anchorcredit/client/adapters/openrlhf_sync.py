"""OpenRLHF weight sync: the service follows the policy that OpenRLHF's vLLM engines follow.

OpenRLHF (0.11) copies the actor's weights into vLLM after every PPO step: the controller
(`BasePPOTrainer.train_step`, in the PPOTrainer / TrainingActor Ray actor) calls
`BasePPOTrainer.broadcast_to_vllm`, which waits on `ActorPPOTrainer.broadcast_to_vllm` in
every DeepSpeed rank (PolicyModelActor). anchorcredit hooks the same two places:

- actor side, `actor_trainer_class()`: a subclass of `ActorPPOTrainer` whose
  `broadcast_to_vllm` runs OpenRLHF's own, then gathers the full weights on every rank
  (ZeRO-3 gathering is collective; `anchorcredit.client.weights.full_state`) and pushes them
  from rank 0 as `step-<n>-<run>`; its `__init__` pushes the starting weights as `step-0-<run>`.
  n counts the syncs of this run: OpenRLHF's global step on a fresh run.
- controller side, `wrap_controller_broadcast()`: after OpenRLHF's broadcast returns (every
  rank done, so the service already serves the new version: push_weights returns only then)
  the experience maker's `VersionPin` counts one more sync. Before the next batch is scored
  it asks the service once which version it serves, checks that it is `step-<count>-<run>`
  (the run fixed by the first one), and passes it as `policy_version=` to every score() call:
  if the service moves to other weights, scoring is refused (FAILED_PRECONDITION), never used.

The run id is `run_id` / ANCHORCREDIT_RUN_ID, else random on actor rank 0 (the only rank that
names versions), so a restarted run never reuses a label whose cached results came from other
weights.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

from anchorcredit.client.adapters.versions import note_run, parse_version, version_name
from anchorcredit.client.client import CreditClient

__all__ = [
    "SYNC_TRANSPORTS",
    "ActorWeightSync",
    "VersionPin",
    "WeightSyncError",
    "actor_trainer_class",
    "parse_version",
    "version_name",
    "wrap_controller_broadcast",
]

SYNC_TRANSPORTS = ("grpc", "collective")


class WeightSyncError(RuntimeError):
    """The service does not serve the version the weight sync should have put there."""


def _rank() -> int:
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return 0
    return int(dist.get_rank())


class ActorWeightSync:
    """Actor side: each `push(model)` sends the model's full weights as the next version.

    Every rank must call push (the ZeRO-3 / FSDP gather is a collective); only rank 0 creates
    a client (`client_factory()`, on first use) and sends.
    """

    def __init__(
        self,
        client_factory: Callable[[], CreditClient],
        transport: str = "grpc",
        dtype: str | None = "auto",
        run_id: str | None = None,
    ):
        if transport not in SYNC_TRANSPORTS:
            raise ValueError(f"transport must be one of {SYNC_TRANSPORTS}, got {transport!r}")
        self.client_factory = client_factory
        self.transport = transport
        self.dtype = dtype
        self.run_id = run_id or uuid.uuid4().hex[:8]
        note_run(self.run_id)
        self.step = 0  # the step the next push names
        self.version: str | None = None  # the version the service serves (rank 0)
        self.seconds: list[float] = []  # wall time of each push
        self._client: CreditClient | None = None

    def push(self, model: Any) -> str:
        from anchorcredit.client.weights import full_state

        version = version_name(self.step, self.run_id)
        t0 = time.perf_counter()
        with full_state(model) as weights:
            if _rank() == 0:
                if self._client is None:
                    self._client = self.client_factory()
                self._client.push_weights(
                    weights, version, transport=self.transport, dtype=self.dtype
                )
                self.version = version
        self.seconds.append(time.perf_counter() - t0)
        self.step += 1
        return version


def actor_trainer_class(
    sync_factory: Callable[[], ActorWeightSync], base: type | None = None
) -> type:
    """A subclass of OpenRLHF's ActorPPOTrainer (or `base`) that pushes the actor's weights
    to anchorcredit at construction and after each of OpenRLHF's vLLM weight broadcasts."""
    if base is None:
        from openrlhf.trainer.ray.ppo_actor import ActorPPOTrainer

        base = ActorPPOTrainer

    class AnchorCreditActorPPOTrainer(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.anchorcredit_sync = sync_factory()
            self.anchorcredit_sync.push(self.actor.model)  # step 0: the starting weights

        def broadcast_to_vllm(self) -> None:
            super().broadcast_to_vllm()
            # The same point in training as vLLM: after the optimizer step, before the
            # controller generates and scores the next batch.
            self.anchorcredit_sync.push(self.actor.model)

    return AnchorCreditActorPPOTrainer


class VersionPin:
    """Controller side: the version scoring must use, `step-<syncs>-<run>`."""

    def __init__(self, run_id: str | None = None):
        self.syncs = 0  # OpenRLHF broadcasts completed in this process
        self.run_id = run_id  # None: learnt from the first (step-0) version served
        self.version: str | None = None

    def synced(self) -> None:
        self.syncs += 1

    def current(self, client: CreditClient) -> str:
        """The version to pin for the next batch (asks the service once per sync)."""
        if self.version is not None and parse_version(self.version) == (self.syncs, self.run_id):
            return self.version
        served = client.served_version()  # every replica, or an error naming the odd ones
        parsed = parse_version(served)
        if parsed is None or parsed[0] != self.syncs or (self.run_id and parsed[1] != self.run_id):
            want = version_name(self.syncs, self.run_id or "<run>")
            raise WeightSyncError(
                f"the service serves policy version {served!r}, expected {want!r}: is the "
                "anchorcredit hook installed in the actor workers too (the Ray "
                "worker_process_setup_hook of every worker) and did their push succeed?"
            )
        self.run_id = parsed[1]
        note_run(self.run_id)
        self.version = served
        return served


def wrap_controller_broadcast(cls: type) -> None:
    """Make `cls.broadcast_to_vllm` (OpenRLHF's BasePPOTrainer) count each completed sync on
    the anchorcredit experience maker's VersionPin. Idempotent."""
    original = cls.broadcast_to_vllm
    if getattr(original, "_anchorcredit_wrapped", False):
        return

    def broadcast_to_vllm(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(self, *args, **kwargs)
        pin = getattr(getattr(self, "experience_maker", None), "anchorcredit_pin", None)
        if pin is not None:
            pin.synced()
        return out

    broadcast_to_vllm._anchorcredit_wrapped = True  # type: ignore[attr-defined]
    broadcast_to_vllm._anchorcredit_original = original  # type: ignore[attr-defined]
    broadcast_to_vllm.__doc__ = original.__doc__
    cls.broadcast_to_vllm = broadcast_to_vllm


def unwrap_controller_broadcast(cls: type) -> None:
    """Undo wrap_controller_broadcast."""
    original = getattr(cls.broadcast_to_vllm, "_anchorcredit_original", None)
    if original is not None:
        cls.broadcast_to_vllm = original
