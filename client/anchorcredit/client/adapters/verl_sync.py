"""Keep the service on verl's current policy: push the actor's weights at verl's own sync step.

verl (0.9) syncs weights trainer -> rollout with `CheckpointEngineManager.update_weights
(global_steps)` in the trainer process, which calls `ActorRolloutRefWorker.update_weights
(global_steps, mode)` on every actor rank (Ray workers holding the FSDP/Megatron shards).

- Actor side (`push_from_actor`, run first inside that worker method): every rank iterates
  the engine's `get_per_tensor_param()` (full HF-named tensors; gathering a shard is
  collective), rank 0 copies each to the CPU and pushes them all to the service as version
  `step-<global_steps>-<run id>`.
- Trainer side (`record_sync`, after the manager call returns): checks the service now
  serves that version and makes it the version every later score() pins, so an answer from
  other weights is refused (FAILED_PRECONDITION), never used.

Both sides name the version from the same `global_steps` argument and run id (env
ANCHORCREDIT_RUN_ID, else the Ray job id and the cluster's session name, which every
process of one job shares; job ids alone restart at 01000000 on each fresh cluster).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from anchorcredit.client.adapters.versions import note_run, ray_job_run_id, version_name
from anchorcredit.client.client import CreditClient

log = logging.getLogger("anchorcredit.verl")

SYNC_TRANSPORTS = ("grpc", "collective")


@dataclass
class SyncState:
    """What this process knows of the served policy version."""

    version: str | None = None  # trainer side: pinned by score()
    pushed: str | None = None  # actor side: last version this process pushed
    seconds: list[float] = field(default_factory=list)  # wall time of each push (rank 0)
    _run_id: str | None = None

    def run_id(self) -> str:
        if self._run_id is None:
            self._run_id = os.environ.get("ANCHORCREDIT_RUN_ID") or ray_job_run_id()
            note_run(self._run_id)
        return self._run_id

    def version_for(self, global_steps: int) -> str:
        return version_name(global_steps, self.run_id())


STATE = SyncState()


def _rank() -> int:
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return 0
    return dist.get_rank()


def push_from_actor(
    worker: Any,
    global_steps: int | None,
    client: CreditClient,
    *,
    transport: str = "grpc",
    dtype: str | None = "auto",
) -> str | None:
    """Push the actor's current weights as `step-<global_steps>-<run id>`; returns the version
    (None when there is nothing to push: no step number, or not an actor worker)."""
    if global_steps is None or "actor" not in str(getattr(worker, "role", "actor")):
        return None
    version = STATE.version_for(global_steps)
    if version == STATE.pushed:  # two managers syncing one step (separate-async trainer)
        return version
    params, peft_config = worker.actor.engine.get_per_tensor_param()
    if peft_config is not None:
        raise RuntimeError(
            "anchorcredit weight sync needs full weights; verl gives LoRA adapters only. "
            "Set actor_rollout_ref.model.lora.merge=True, or ANCHORCREDIT_SYNC=0"
        )
    t0 = time.perf_counter()
    if _rank() == 0:
        # Copied to the CPU one at a time: the full model never sits twice on the device.
        items = [(name, t.detach().to("cpu")) for name, t in params]
        client.push_weights(items, version, transport=transport, dtype=dtype)
        STATE.seconds.append(time.perf_counter() - t0)
        log.info("pushed %s to the credit service in %.2f s", version, STATE.seconds[-1])
    else:
        for _ in params:  # every rank takes part in each gather
            pass
    STATE.pushed = version
    return version


def record_sync(global_steps: int | None, client: CreditClient) -> str | None:
    """After verl's weight sync: the version the service must now serve becomes the pin."""
    if global_steps is None:
        return None
    version = STATE.version_for(global_steps)
    served = client.served_version()  # every replica, or an error naming the odd ones
    if served != version:
        raise RuntimeError(
            f"the credit service serves {served!r}, not {version!r}, after verl's weight sync: "
            "is the anchorcredit hook installed in the actor workers too (Ray "
            "worker_process_setup_hook), with the same ANCHORCREDIT_RUN_ID?"
        )
    STATE.version = version
    return version
