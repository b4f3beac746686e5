"""AReaL weight sync: the service follows the policy AReaL's rollout engines follow.

AReaL's PPOTrainer (1.0.4) moves the new weights to its inference engines once per step,
after `ppo_update`: `actor.update_weights(meta.with_version(global_step + 1))`, then
`set_version` everywhere; the next batch's advantages are computed after that. At setup it
calls `actor.connect_engine(rollout, meta)` once, on the initialised model.
`install_weight_sync(client)` wraps those two methods of the train engine class
(FSDPEngine by default, so FSDPPPOActor):

- `connect_engine`: after AReaL's own, push the starting weights as `step-<v>-<run>`, v the
  engine's version (0 on a fresh run, the restored step on a resumed one);
- `update_weights(meta)`: after AReaL's own (the rollout engines have the new weights), push
  them as `step-<meta.version>-<run>`.

Each push gathers the full weights on every rank (FSDP2 gathers are collectives;
`anchorcredit.client.weights.full_state`), sends them from rank 0 (`client.push_weights`,
gRPC stream or the private collective group), then all ranks wait at a barrier, so no rank
scores the next batch before the service serves the new version. The version is stored on
the engine; the advantage hook (areal.py) passes it as `policy_version=`, so an answer from
any other weights is refused (FAILED_PRECONDITION), never used.

The run id (`run_id`, else random on rank 0, shared with every rank) makes a restarted run's
labels new, so cached results from other weights are never reused. Megatron's parameters
are not under Hugging Face names: this sync covers FSDP (and any engine class whose
`.model` is a Hugging Face module, via `engine_class=`).
"""

from __future__ import annotations

import functools
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

from anchorcredit.client.adapters.areal import VERSION_ATTR
from anchorcredit.client.adapters.trl import _same_on_every_rank
from anchorcredit.client.client import CreditClient

__all__ = ["SYNC_TRANSPORTS", "AReaLWeightSync", "install_weight_sync", "version_name"]

SYNC_TRANSPORTS = ("grpc", "collective")


def version_name(step: int, run_id: str) -> str:
    return f"step-{step}-{run_id}"


def _dist() -> Any:
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return dist


class AReaLWeightSync:
    """Pushes a train engine's weights to the service; `.version` is what it serves now."""

    def __init__(
        self,
        client: CreditClient,
        *,
        transport: str = "grpc",
        dtype: str | None = "auto",
        run_id: str | None = None,
    ):
        if transport not in SYNC_TRANSPORTS:
            raise ValueError(f"transport must be one of {SYNC_TRANSPORTS}, got {transport!r}")
        self.client = client
        self.transport = transport
        self.dtype = dtype
        self.run_id = run_id
        self.version: str | None = None
        self.seconds: list[float] = []  # wall time of each sync (rank 0 includes the push)

    def push(self, engine: Any, step: int) -> str:
        """Every rank calls this; rank 0 sends. Sets the engine's pinned version."""
        from anchorcredit.client.weights import full_state

        dist = _dist()
        if self.run_id is None:
            self.run_id = _same_on_every_rank(uuid.uuid4().hex[:8])
        version = version_name(step, self.run_id)
        t0 = time.perf_counter()
        if version != self.version:
            rank0 = dist is None or dist.get_rank() == 0
            error: BaseException | None = None
            with full_state(engine.model) as weights:
                if rank0:
                    try:
                        self.client.push_weights(
                            weights, version, transport=self.transport, dtype=self.dtype
                        )
                    except Exception as e:  # every rank must hear of it, not wait forever
                        error = e
            failure = f"{type(error).__name__}: {error}" if error is not None else None
            if dist is not None:
                # Rank 0's outcome reaches every rank (a barrier too): no rank scores the next
                # batch before the service serves `version`, none waits on a failed push.
                box = [failure]
                dist.broadcast_object_list(box, src=0, group=getattr(engine, "_cpu_group", None))
                failure = box[0]
            if error is not None:
                raise error
            if failure is not None:
                raise RuntimeError(f"rank 0 could not push policy {version!r}: {failure}")
            self.version = version
        setattr(engine, VERSION_ATTR, version)
        self.seconds.append(time.perf_counter() - t0)
        return version


def install_weight_sync(
    client: CreditClient,
    *,
    transport: str = "grpc",
    dtype: str | None = "auto",
    run_id: str | None = None,
    engine_class: type | None = None,
) -> tuple[AReaLWeightSync, Callable[[], None]]:
    """Wrap `connect_engine` and `update_weights` of AReaL's FSDPEngine (or `engine_class`)
    in this process; returns (the sync object, an undo function).

    transport: "grpc" (stream to every address behind the client's targets) or
    "collective" (the private gloo/NCCL broadcast group). dtype: cast before sending
    ("auto": the serving dtype; None: as trained). run_id: names the versions
    (`step-<n>-<run_id>`); None: random on rank 0.
    """
    if engine_class is None:
        from areal.engine.fsdp_engine import FSDPEngine

        engine_class = FSDPEngine
    sync = AReaLWeightSync(client, transport=transport, dtype=dtype, run_id=run_id)
    connect = _unwrapped(engine_class.connect_engine)
    update = _unwrapped(engine_class.update_weights)

    @functools.wraps(connect)
    def connect_engine(self: Any, engine: Any, meta: Any) -> Any:
        out = connect(self, engine, meta)
        sync.push(self, int(self.get_version()))
        return out

    @functools.wraps(update)
    def update_weights(self: Any, meta: Any) -> Any:
        out = update(self, meta)
        step = meta.version if meta.version is not None else self.get_version() + 1
        sync.push(self, int(step))
        return out

    connect_engine.__anchorcredit_wrapped__ = connect  # type: ignore[attr-defined]
    update_weights.__anchorcredit_wrapped__ = update  # type: ignore[attr-defined]
    engine_class.connect_engine = connect_engine
    engine_class.update_weights = update_weights

    def undo() -> None:
        engine_class.connect_engine = connect
        engine_class.update_weights = update

    return sync, undo


def _unwrapped(fn: Any) -> Any:
    return getattr(fn, "__anchorcredit_wrapped__", fn)
