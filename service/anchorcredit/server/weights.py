"""Weight changes on the server: UpdateWeights (a path), PushWeights (a stream of bytes) and
the collective group (JoinWeightGroup / ReceiveWeights / LeaveWeightGroup).

Every change follows one path (docs/SERVICE.md "Changing the weights"):

    stage = backend.stage_weights(update)       version rules checked at once
    fill the stage in a worker thread            scoring goes on from the old weights
    stage.finish()                               nothing cut short or (unless partial) missing
    batcher.run_exclusive(commit_weights)        device thread, between batches: version
                                                 rules again, staged -> live, new version

Changes run one at a time (an asyncio lock), so at most one staged copy of the weights
exists. Torch-free: the backend owns the tensors and the group handles; this module keeps
the groups by name and maps nothing to status codes (the servicer does).
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

from anchorcredit.backend import TruncatedWeights, WeightGroupHandle, WeightStage
from anchorcredit.errors import DeviceOutOfMemory, InputError, WeightVersionConflict, is_oom
from anchorcredit.server import convert
from anchorcredit.v1 import credit_pb2 as pb
from anchorcredit.weight_wire import WeightUpdateSpec

log = logging.getLogger(__name__)
TRANSPORTS = ("path", "stream", "collective")


class GroupError(Exception):
    """A collective-group request that cannot be served; `code` is its gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class WeightChanges:
    """The weight-changing RPCs' logic over a ServerState (backend, batcher, metrics)."""

    def __init__(self, state: Any) -> None:
        self.state = state
        self.groups: dict[str, WeightGroupHandle] = {}
        self._joining: set[str] = set()
        self._lock = asyncio.Lock()  # one change at a time: one staged copy at most
        # Staging, joins and broadcasts block: their own threads, never the event loop's
        # (health, metrics and scoring stay responsive) nor the device thread.
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="weights")
        for transport in TRANSPORTS:  # every transport's series reads 0 before its first use
            state.metrics.weight_updates_by_transport.labels(transport)
            state.metrics.weight_bytes.labels(transport)

    # -- helpers ------------------------------------------------------------------------
    async def _off_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) in a worker thread. A thread cannot be interrupted: if the RPC is
        cancelled meanwhile, wait for it to end before the caller releases the lock."""
        fut = asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            try:
                await fut
            except BaseException:  # noqa: S110 - cancelled anyway; the caller re-raises
                pass
            raise
        except Exception as exc:
            if is_oom(exc):
                raise DeviceOutOfMemory(
                    "not enough device memory to stage the new weights (a weight change "
                    "needs one more copy of the weights it replaces)"
                ) from exc
            raise

    async def _stage(self, spec: WeightUpdateSpec) -> WeightStage:
        return await self._off_loop(self.state.backend.stage_weights, spec)

    async def _commit(
        self, stage: WeightStage, transport: str, t0: float
    ) -> pb.UpdateWeightsResponse:
        backend, batcher = self.state.backend, self.state.batcher
        await self._off_loop(stage.finish)
        await batcher.run_exclusive(lambda: backend.commit_weights(stage))
        seconds = time.perf_counter() - t0
        info = self.state.refresh_info()
        m = self.state.metrics
        m.weight_updates.inc()
        m.weight_updates_by_transport.labels(transport).inc()
        log.info(
            "policy weights now at version %r via %s (%d tensors, %.1f MB, %.2f s)",
            info.policy_version,
            transport,
            stage.tensors,
            stage.bytes / 1e6,
            seconds,
        )
        return pb.UpdateWeightsResponse(
            policy_version=info.policy_version,
            load_seconds=seconds,
            tensors=stage.tensors,
            bytes=stage.bytes,
        )

    def _count_bytes(self, transport: str, stage: WeightStage | None) -> None:
        if stage is not None and stage.bytes:
            self.state.metrics.weight_bytes.labels(transport).inc(stage.bytes)

    # -- UpdateWeights(path) -------------------------------------------------------------
    async def from_path(self, request: pb.UpdateWeightsRequest) -> pb.UpdateWeightsResponse:
        if not request.path:
            raise InputError("a checkpoint path is required", field="path")
        spec = WeightUpdateSpec(request.version, request.replaces)
        path = request.path
        cfg = self.state.config
        checked = await self._off_loop(
            checked_weights_path, path, cfg.weights_dir, cfg.allow_unauthenticated_weights
        )
        async with self._lock:
            t0 = time.perf_counter()
            stage = await self._stage(spec)
            try:
                try:
                    await self._off_loop(stage.load, str(checked))
                    await self._off_loop(stage.finish)
                except (WeightVersionConflict, DeviceOutOfMemory):
                    raise
                except Exception as exc:
                    # Missing file, garbled or truncated safetensors (SafetensorError), wrong
                    # shapes, missing tensors: the caller's checkpoint, with the loader's words.
                    message = " ".join(str(exc).split()) or type(exc).__name__
                    raise InputError(
                        f"cannot load weights from {path!r}: {message}", field="path"
                    ) from exc
                return await self._commit(stage, "path", t0)
            finally:
                self._count_bytes("path", stage)
                stage.discard()

    # -- PushWeights(stream WeightChunk) -------------------------------------------------
    async def from_stream(self, chunks: AsyncIterator[pb.WeightChunk]) -> pb.UpdateWeightsResponse:
        async with self._lock:
            stage: WeightStage | None = None
            t0 = time.perf_counter()
            try:
                async for chunk in chunks:
                    if stage is None:
                        t0 = time.perf_counter()  # the first byte received
                        if not chunk.HasField("update"):
                            raise InputError(
                                "the first WeightChunk must carry `update` (version, replaces, "
                                "partial)",
                                field="update",
                            )
                        stage = await self._stage(convert.weight_update(chunk.update))
                    elif chunk.HasField("update"):
                        raise InputError("only the first WeightChunk carries `update`", "update")
                    if chunk.HasField("tensor"):
                        await self._off_loop(stage.begin, *convert.tensor_header(chunk.tensor))
                    if chunk.data:
                        await self._off_loop(stage.write, chunk.data)
                if stage is None:
                    raise InputError("the stream carried no WeightChunk", field="update")
                return await self._commit(stage, "stream", t0)
            finally:
                self._count_bytes("stream", stage)
                if stage is not None:
                    stage.discard()

    # -- the collective group ------------------------------------------------------------
    async def join(self, request: pb.JoinWeightGroupRequest) -> pb.JoinWeightGroupResponse:
        name = request.group
        if not name:
            raise InputError("name the group", field="group")
        if not request.address:
            raise InputError("the trainer's store address is required", field="address")
        if not 0 < request.port < 65536:
            raise InputError(f"port {request.port} is not in [1, 65535]", field="port")
        if request.world_size < 2:
            raise InputError("world_size counts the trainer and every server: >= 2", "world_size")
        if not 0 < request.rank < request.world_size:
            raise InputError(
                f"rank {request.rank} is not in [1, {request.world_size - 1}] (rank 0 is the "
                "trainer)",
                field="rank",
            )
        if request.backend not in ("", "nccl", "gloo"):
            raise InputError(f"backend {request.backend!r} is not nccl or gloo", "backend")
        if request.timeout_s < 0:
            raise InputError("timeout_s must be >= 0 (0 = 600 s)", field="timeout_s")
        if name in self.groups or name in self._joining:
            raise GroupError(
                grpc.StatusCode.ALREADY_EXISTS,
                f"group {name!r} is already joined; LeaveWeightGroup it first",
            )
        backend = self.state.backend
        args = (
            request.address,
            int(request.port),
            int(request.world_size),
            int(request.rank),
            request.backend,
            float(request.timeout_s),
        )
        self._joining.add(name)
        fut = asyncio.get_running_loop().run_in_executor(
            self._pool, lambda: backend.join_weight_group(*args)
        )
        try:
            handle = await asyncio.shield(fut)
        except asyncio.CancelledError:
            # The rendezvous cannot be interrupted: close the group if it completes anyway.
            fut.add_done_callback(_close_if_joined)
            raise
        except ValueError as exc:
            raise InputError(str(exc), field="backend") from exc
        except Exception as exc:
            raise GroupError(
                grpc.StatusCode.UNAVAILABLE,
                f"cannot join group {name!r} at {request.address}:{request.port} as rank "
                f"{request.rank} of {request.world_size}: {' '.join(str(exc).split())[:300]}",
            ) from exc
        finally:
            self._joining.discard(name)
        self.groups[name] = handle
        log.info(
            "joined weight group %r (%s, rank %d of %d, tensors arrive on %s)",
            name,
            handle.backend,
            request.rank,
            request.world_size,
            handle.device,
        )
        return pb.JoinWeightGroupResponse(
            group=name, backend=handle.backend, device=str(handle.device)
        )

    def _group(self, name: str) -> WeightGroupHandle:
        handle = self.groups.get(name)
        if handle is None:
            known = ", ".join(repr(g) for g in sorted(self.groups)) or "none"
            raise GroupError(
                grpc.StatusCode.NOT_FOUND,
                f"no weight group {name!r} is joined (joined: {known}); call JoinWeightGroup",
            )
        return handle

    async def receive(self, request: pb.ReceiveWeightsRequest) -> pb.UpdateWeightsResponse:
        handle = self._group(request.group)
        headers = [convert.tensor_header(t) for t in request.tensors]
        async with self._lock:
            t0 = time.perf_counter()
            stage = await self._stage(convert.weight_update(request.update))
            try:
                try:
                    await self._off_loop(stage.receive, handle, headers)
                except TruncatedWeights:
                    # A broadcast that failed part way leaves the group out of step with the
                    # trainer: close it (the trainer opens a new one and we join again).
                    await self._drop(request.group)
                    raise
                return await self._commit(stage, "collective", t0)
            finally:
                self._count_bytes("collective", stage)
                stage.discard()

    async def leave(self, request: pb.LeaveWeightGroupRequest) -> pb.LeaveWeightGroupResponse:
        self._group(request.group)
        await self._drop(request.group)
        return pb.LeaveWeightGroupResponse()

    async def _drop(self, name: str) -> None:
        handle = self.groups.pop(name, None)
        if handle is not None:
            try:
                await self._off_loop(handle.close)
            except Exception as exc:  # closing a broken group may fail: it is gone anyway
                log.warning("closing weight group %r: %s", name, exc)
            log.info("left weight group %r", name)

    def close(self) -> None:
        """Server shutdown: close every group, stop the worker threads."""
        for name in list(self.groups):
            try:
                self.groups.pop(name).close()
            except Exception as exc:
                log.warning("closing weight group %r: %s", name, exc)
        self._pool.shutdown(wait=False, cancel_futures=True)


def require_regular_file(path: Path) -> None:
    """InputError unless `path` is a regular file. Opened non-blocking and checked with
    fstat, so a FIFO, device or socket is refused at once instead of blocking a reader."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise InputError(f"cannot open {str(path)!r}: {exc.strerror}", field="path") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InputError(
                f"{str(path)!r} is not a regular file (a FIFO, device or socket is refused)",
                field="path",
            )
    finally:
        os.close(fd)


def checked_weights_path(raw: str, weights_dir: str | None, allow_anywhere: bool) -> Path:
    """The checkpoint an UpdateWeights path names, resolved, after the security checks:

    - inside `weights_dir` once every symlink is resolved (a relative path is taken from
      it); without `weights_dir` only when `allow_anywhere` (the development flag);
    - a regular *.safetensors file, or a directory whose *.safetensors are regular files
      that also resolve inside `weights_dir`.
    PERMISSION_DENIED (GroupError) for a path outside, InputError for the rest. Blocking
    (filesystem calls): run it off the event loop."""
    if weights_dir:
        root = Path(weights_dir).resolve()
        target = (root / raw).resolve()  # an absolute `raw` replaces root

        def inside(p: Path) -> bool:
            return p == root or root in p.parents

        if not inside(target):
            raise GroupError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"path {raw!r} is outside the server's --weights-dir (symlinks resolved)",
            )
    elif allow_anywhere:
        target = Path(raw).resolve()

        def inside(p: Path) -> bool:
            return True

    else:
        raise GroupError(
            grpc.StatusCode.PERMISSION_DENIED,
            "this server loads no paths: start it with --weights-dir (or push the weights "
            "with PushWeights)",
        )
    if target.is_dir():
        files = sorted(target.glob("*.safetensors"))
        if not files:
            raise InputError(f"no .safetensors weights in {raw!r}", field="path")
        for f in files:
            if not inside(f.resolve()):
                raise GroupError(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{f.name} in {raw!r} links outside the server's --weights-dir",
                )
            require_regular_file(f)
    else:
        require_regular_file(target)
    return target


def _close_if_joined(fut: Any) -> None:
    if not fut.cancelled() and fut.exception() is None:
        try:
            fut.result().close()
        except Exception as exc:
            log.warning("closing an abandoned weight group: %s", exc)
