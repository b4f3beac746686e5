"""AReaL weight sync: the service follows the policy AReaL's rollout engines follow.

AReaL's PPOTrainer (1.0.4) moves the new weights to its inference engines once per step,
after `ppo_update`: `actor.update_weights(meta.with_version(global_step + 1))`, then
`set_version` everywhere; the next batch's advantages are computed after that. At setup it
calls `actor.connect_engine(rollout, meta)` once, on the initialised model.
`install_weight_sync(client)` wraps those two methods of every train engine class AReaL
ships that this sync covers, as its module is imported (or at once, if it is):
FSDPEngine (`areal.engine.fsdp_engine`) and ArchonEngine
(`areal.experimental.engine.archon_engine`); or only `engine_class`, when given:

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

Where the full weights come from: FSDP gathers the engine's Hugging Face module
(`full_state`); Archon gathers each parameter as AReaL's own Archon weight sync does
(`_get_full_tensor`) and renames it with the engine's `state_dict_adapter` to the Hugging
Face names the service loads (pipeline parallelism is refused: no rank holds every stage).
MegatronEngine is not covered (its mcore tensors need AReaL's mbridge conversion, which is
not testable here): its `connect_engine` refuses with an error that says so, rather than
train with scores from weights the service never got.

The run id (`run_id`, else ANCHORCREDIT_RUN_ID, else random on rank 0, shared with every
rank) makes a restarted run's labels new, so cached results from other weights are never
reused. In AReaL's single-controller mode the engines live in worker processes:
`install_weight_sync` there makes AReaL start the actor workers through anchorcredit's
worker entry point, which installs this sync in them (areal_controller.py).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from anchorcredit.client.adapters import install_log
from anchorcredit.client.adapters.areal import VERSION_ATTR
from anchorcredit.client.adapters.verl_imports import PostImportHooks
from anchorcredit.client.adapters.versions import note_run, same_on_every_rank, version_name
from anchorcredit.client.client import CreditClient

__all__ = [
    "SYNC_TRANSPORTS",
    "AReaLWeightSync",
    "install_weight_sync",
    "install_weight_sync_in_process",
    "version_name",
]

SYNC_TRANSPORTS = ("grpc", "collective")

# module -> the engine class in it (covered: synced; not covered: refused at connect_engine)
ENGINES = {
    "areal.engine.fsdp_engine": "FSDPEngine",
    "areal.experimental.engine.archon_engine": "ArchonEngine",
}
NOT_COVERED = {"areal.engine.megatron_engine": "MegatronEngine"}


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
        dist = _dist()
        if self.run_id is None:
            own = os.environ.get("ANCHORCREDIT_RUN_ID") or uuid.uuid4().hex[:8]
            self.run_id = same_on_every_rank(own)
        note_run(self.run_id)
        version = version_name(step, self.run_id)
        t0 = time.perf_counter()
        if version != self.version:
            rank0 = dist is None or dist.get_rank() == 0
            error: BaseException | None = None
            with engine_weights(engine, rank0) as weights:
                if rank0:
                    try:
                        _push_in_line(self.client, weights, version, step, self)
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


def _push_in_line(client: Any, weights: Any, version: str, step: int, sync: Any) -> None:
    """In-line (every rank waits at the barrier after it), through the client's pusher when
    it has one, so the step's credit summary reports the sync's figures."""
    kw = {"transport": sync.transport, "dtype": sync.dtype}
    if getattr(client, "background_pusher", None) is None:  # a client-like object
        client.push_weights(weights, version, **kw)
        return
    client.push_weights_background(weights, version, step=step, **kw)
    client.background_pusher.wait()


@contextlib.contextmanager
def engine_weights(engine: Any, rank0: bool) -> Iterator[list[tuple[str, Any]]]:
    """The engine's full weights under Hugging Face names, as [(name, tensor)] on rank 0
    (empty elsewhere); every rank must enter (gathering is collective)."""
    if hasattr(engine, "state_dict_adapter") and hasattr(engine, "_get_model_name_parameters"):
        yield _archon_weights(engine, rank0)
        return
    from anchorcredit.client.weights import full_state

    with full_state(engine.model) as weights:
        yield weights if rank0 else []


def _archon_weights(engine: Any, rank0: bool) -> list[tuple[str, Any]]:
    """ArchonEngine: each parameter gathered as AReaL's Archon weight sync gathers it, then
    renamed by the engine's state-dict adapter (what `save_model_to_hf` writes)."""
    from areal.experimental.engine.archon_weight_sync import _get_full_tensor

    dims = getattr(engine, "parallel_dims", None)
    if dims is not None and getattr(dims, "pp_enabled", False):
        raise RuntimeError(
            "anchorcredit's AReaL weight sync does not cover Archon with pipeline parallelism "
            "(no rank holds every stage's weights): set pp=1, or ANCHORCREDIT_STALE_POLICY="
            "frozen without a weight sync if a fixed scoring policy is meant"
        )
    adapter = engine.state_dict_adapter
    out: list[tuple[str, Any]] = []
    for name, param in engine._get_model_name_parameters():
        tensor = _get_full_tensor(param)  # a collective for sharded parameters: every rank
        if not rank0:
            continue
        pairs = (
            adapter.convert_single_to_hf(name, tensor) if adapter is not None else [(name, tensor)]
        )
        out.extend((hf_name, t.detach().to("cpu")) for hf_name, t in pairs)
    return out


def install_weight_sync(
    client: CreditClient,
    *,
    transport: str = "grpc",
    dtype: str | None = "auto",
    run_id: str | None = None,
    engine_class: type | None = None,
) -> tuple[AReaLWeightSync | None, Callable[[], None]]:
    """Keep the service on the policy AReaL's rollout engines follow; returns (the sync
    object, an undo function).

    SPMD mode: wraps `connect_engine` / `update_weights` of AReaL's FSDPEngine and
    ArchonEngine in this process (on import), or of `engine_class` alone; MegatronEngine
    refuses at connect_engine (not covered). Single-controller mode (AREAL_SPMD_MODE unset):
    the actor workers install it (areal_controller.py); the sync object then lives there
    and None is returned here.

    transport: "grpc" (stream to every address behind the client's targets) or
    "collective" (the private gloo/NCCL broadcast group). dtype: cast before sending
    ("auto": the serving dtype; None: as trained). run_id: names the versions
    (`step-<n>-<run_id>`); None: ANCHORCREDIT_RUN_ID, else random on rank 0.
    """
    if transport not in SYNC_TRANSPORTS:
        raise ValueError(f"transport must be one of {SYNC_TRANSPORTS}, got {transport!r}")
    if engine_class is None:
        from anchorcredit.client.adapters.areal import single_controller

        if single_controller():
            from anchorcredit.client.adapters import areal_controller

            undo = areal_controller.install_sync(
                client, transport=transport, dtype=dtype, run_id=run_id
            )
            return None, undo
    return install_weight_sync_in_process(
        client, transport=transport, dtype=dtype, run_id=run_id, engine_class=engine_class
    )


def install_weight_sync_in_process(
    client: CreditClient,
    *,
    transport: str = "grpc",
    dtype: str | None = "auto",
    run_id: str | None = None,
    engine_class: type | None = None,
) -> tuple[AReaLWeightSync, Callable[[], None]]:
    """install_weight_sync's SPMD half: this process's engine classes."""
    sync = AReaLWeightSync(client, transport=transport, dtype=dtype, run_id=run_id)
    if engine_class is not None:
        return sync, _wrap_engine(engine_class, sync)

    def covered(name: str) -> Callable[[Any], Callable[[], None]]:
        return lambda module: _wrap_engine(getattr(module, name), sync)

    def refused(name: str) -> Callable[[Any], Callable[[], None]]:
        return lambda module: _refuse_engine(getattr(module, name))

    hooks = PostImportHooks(
        {module: covered(name) for module, name in ENGINES.items()}
        | {module: refused(name) for module, name in NOT_COVERED.items()}
    )
    hooks.install()
    return sync, hooks.remove


def _wrap_engine(engine_class: type, sync: AReaLWeightSync) -> Callable[[], None]:
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
    install_log.patched(
        "areal",
        f"{engine_class.__module__}.{engine_class.__qualname__}.connect_engine/update_weights",
        f"pushes the weights as step-<version>-<run> ({sync.transport})",
    )

    def undo() -> None:
        engine_class.connect_engine = connect
        engine_class.update_weights = update

    return undo


def _refuse_engine(engine_class: type) -> Callable[[], None]:
    connect = _unwrapped(engine_class.connect_engine)
    reason = (
        f"anchorcredit's AReaL weight sync does not cover {engine_class.__name__}: its "
        "weights would need AReaL's mbridge conversion to Hugging Face names, which is not "
        "implemented here. Use the FSDP or Archon backend, or drop install_weight_sync and "
        "declare a fixed scoring policy with ANCHORCREDIT_STALE_POLICY=frozen"
    )

    @functools.wraps(connect)
    def connect_engine(self: Any, engine: Any, meta: Any) -> Any:
        raise RuntimeError(reason)

    connect_engine.__anchorcredit_wrapped__ = connect  # type: ignore[attr-defined]
    engine_class.connect_engine = connect_engine
    install_log.not_patched(
        "areal", f"{engine_class.__module__}.{engine_class.__qualname__} weight sync", reason
    )

    def undo() -> None:
        engine_class.connect_engine = connect

    return undo


def _unwrapped(fn: Any) -> Any:
    return getattr(fn, "__anchorcredit_wrapped__", fn)
