"""Weight changes on the server: UpdateWeights (a path), PushWeights (a stream of bytes) and
the collective group (JoinWeightGroup / ReceiveWeights / LeaveWeightGroup).

Every change follows one path (docs/SERVICE.md "Changing the weights"):

    stage = backend.stage_weights(update)       version rules checked at once
    fill the stage in a worker thread            scoring goes on from the old weights
    stage.finish()                               nothing cut short or (unless partial) missing
    stage.records()                              the new weights digest, in a worker thread
                                                 (scoring goes on meanwhile)
    batcher.run_exclusive(commit_weights)        device thread, between batches: version
                                                 rules again, staged -> live, new version

Changes run one at a time (an asyncio lock), so at most one staged copy of the weights
exists. The collective's blocking steps (join, receive, close) run in bounded threads
(server/bounded.py): under the caller's timeout_s and the RPC deadline, abandoned past
them, never holding the lock or a pool worker for longer. Torch-free: the backend owns the
tensors and the group handles; this module keeps the groups by name and raises the errors
the status table maps (anchorcredit.status).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import stat
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from anchorcredit.backend import TruncatedWeights, WeightGroupHandle, WeightStage
from anchorcredit.errors import (
    DeviceOutOfMemory,
    InputError,
    PathRefused,
    WeightGroupExists,
    WeightGroupNotFound,
    WeightGroupUnreachable,
    WeightVersionConflict,
    clip,
    is_oom,
)
from anchorcredit.server import convert
from anchorcredit.server.bounded import run_bounded
from anchorcredit.server.state import ServerState
from anchorcredit.v1 import credit_pb2 as pb
from anchorcredit.weight_wire import WeightUpdateSpec

log = logging.getLogger(__name__)
TRANSPORTS = ("path", "stream", "collective")
# JoinWeightGroup's timeout_s: 0 means the default; more than the maximum is refused.
DEFAULT_GROUP_TIMEOUT_S = 600.0
MAX_GROUP_TIMEOUT_S = 3600.0
MAX_GROUP_SIZE = 1 << 16  # world_size: the trainer's rank 0 and every server


class WeightChanges:
    """The weight-changing RPCs' logic over a ServerState (backend, batcher, metrics)."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.groups: dict[str, WeightGroupHandle] = {}
        self._joining: set[str] = set()
        self._lock = asyncio.Lock()  # one change at a time: one staged copy at most
        # Staging and loads block, for a bounded time: worker threads, never the event
        # loop's (health, metrics and scoring stay responsive) nor the device thread. The
        # collective steps, which may never return, get threads of their own (bounded.py).
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
        self, stage: WeightStage, transport: str, t0: float, staging_s: float | None = None
    ) -> pb.UpdateWeightsResponse:
        backend, batcher = self.state.backend, self.state.batcher
        t1 = time.perf_counter()
        await self._off_loop(stage.finish)
        t2 = time.perf_counter()
        records = getattr(stage, "records", None)
        if callable(records):  # the digest, off the device thread (commit reuses it)
            await self._off_loop(records)
        t3 = time.perf_counter()
        await batcher.run_exclusive(lambda: backend.commit_weights(stage))
        t4 = time.perf_counter()
        seconds = t4 - t0
        info = self.state.refresh_info()
        m = self.state.metrics
        m.weight_updates.inc()
        m.weight_updates_by_transport.labels(transport).inc()
        staged = "" if staging_s is None else f" (staging {staging_s:.3f} s)"
        log.info(
            "policy weights now at version %r via %s (%d tensors, %.1f MB, %.2f s; stages: "
            "receive %.3f s%s, finish %.3f s, digest %.3f s, commit %.3f s)",
            info.policy_version,
            transport,
            stage.tensors,
            stage.bytes / 1e6,
            seconds,
            t1 - t0,
            staged,
            t2 - t1,
            t3 - t2,
            t4 - t3,
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
                        f"cannot load weights from {clip(path)}: {message[:500]}", field="path"
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
                staging_s = 0.0  # in begin/write: the rest of the stream is the network
                async for chunk in _frames(chunks):
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
                    ts = time.perf_counter()
                    if chunk.HasField("tensor"):
                        await self._off_loop(stage.begin, *convert.tensor_header(chunk.tensor))
                    if chunk.data:
                        await self._off_loop(stage.write, chunk.data)
                    staging_s += time.perf_counter() - ts
                if stage is None:
                    raise InputError("the stream carried no WeightChunk", field="update")
                return await self._commit(stage, "stream", t0, staging_s)
            finally:
                self._count_bytes("stream", stage)
                if stage is not None:
                    stage.discard()

    # -- the collective group ------------------------------------------------------------
    async def join(
        self, request: pb.JoinWeightGroupRequest, deadline_s: float | None = None
    ) -> pb.JoinWeightGroupResponse:
        """Join the trainer's group. Every blocking step (store, group) runs in a bounded
        thread (server/bounded.py) under timeout_s and the RPC deadline (`deadline_s`
        seconds left), whichever is first; it holds no lock and no pool worker."""
        name = request.group
        timeout_s = _check_join(request)
        if deadline_s is not None:
            timeout_s = max(0.0, min(timeout_s, deadline_s))
        if name in self.groups or name in self._joining:
            raise WeightGroupExists(
                f"group {clip(name)} is already joined; LeaveWeightGroup it first"
            )
        backend = self.state.backend
        args = (
            request.address,
            int(request.port),
            int(request.world_size),
            int(request.rank),
            request.backend,
            timeout_s,
        )
        where = (
            f"group {clip(name)} at {clip(request.address)}:{request.port} as rank "
            f"{request.rank} of {request.world_size}"
        )
        self._joining.add(name)
        try:
            handle = await run_bounded(
                lambda: backend.join_weight_group(*args),
                timeout_s,
                f"joining {where}",
                on_late=_close_group,
            )
        except ValueError as exc:
            raise InputError(str(exc), field="backend") from exc
        except Exception as exc:
            if isinstance(exc, TimeoutError):
                raise
            raise WeightGroupUnreachable(
                f"cannot join {where}: {' '.join(str(exc).split())[:300]}"
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
            known = ", ".join(clip(g) for g in sorted(self.groups)[:20]) or "none"
            raise WeightGroupNotFound(
                f"no weight group {clip(name)} is joined (joined: {known}); call JoinWeightGroup"
            )
        return handle

    async def receive(
        self, request: pb.ReceiveWeightsRequest, deadline_s: float | None = None
    ) -> pb.UpdateWeightsResponse:
        """ReceiveWeights: the broadcasts run in a bounded thread (each under the group's
        timeout, all of them under the RPC deadline); past it the group is dropped."""
        handle = self._group(request.group)
        headers = [convert.tensor_header(t) for t in request.tensors]
        spec = convert.weight_update(request.update)
        async with self._lock:
            t0 = time.perf_counter()
            stage = await self._stage(spec)
            try:
                try:
                    await run_bounded(
                        lambda: stage.receive(handle, headers),
                        deadline_s,
                        f"receiving {len(headers)} tensors from group {clip(request.group)}",
                    )
                except (TruncatedWeights, TimeoutError, asyncio.CancelledError):
                    # A broadcast that failed or hangs part way leaves the group out of step
                    # with the trainer: drop it (the trainer opens a new one, we join again).
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
            try:  # closing a broken group may fail or block: it is gone for us anyway
                await run_bounded(handle.close, 10.0, f"closing weight group {clip(name)}")
            except Exception as exc:
                log.warning("closing weight group %r: %s", name, exc)
            log.info("left weight group %r", name)

    def close(self) -> None:
        """Server shutdown: close every group (each in a daemon thread: a broken group's
        close may block), stop the worker threads."""
        for name in list(self.groups):
            handle = self.groups.pop(name)
            threading.Thread(target=_close_group, args=(handle,), daemon=True).start()
        self._pool.shutdown(wait=False, cancel_futures=True)


async def _frames(chunks: AsyncIterator[Any]) -> AsyncIterator[pb.WeightChunk]:
    """The stream's WeightChunks; a frame that does not parse is bad input, naming it."""
    it = aiter(chunks)
    frame = 0
    while True:
        try:
            chunk = await anext(it)
        except StopAsyncIteration:
            return
        except Exception as exc:  # DecodeError from grpc's deserializer: the caller's bytes
            raise InputError(
                f"PushWeights frame {frame} could not be parsed as a WeightChunk "
                f"({type(exc).__name__}); nothing was changed"
            ) from None
        yield chunk
        frame += 1


def _check_join(request: pb.JoinWeightGroupRequest) -> float:
    """InputError naming the first bad field of a JoinWeightGroup; the timeout in seconds
    (0 -> DEFAULT_GROUP_TIMEOUT_S)."""
    if not request.group:
        raise InputError("name the group", field="group")
    if not request.address:
        raise InputError("the trainer's store address is required", field="address")
    if not 0 < request.port < 65536:
        raise InputError(f"port {request.port} is not in [1, 65535]", field="port")
    if not 2 <= request.world_size <= MAX_GROUP_SIZE:
        raise InputError(
            f"world_size {request.world_size} is not in [2, {MAX_GROUP_SIZE}] (the trainer "
            "and every server)",
            field="world_size",
        )
    if not 0 < request.rank < request.world_size:
        raise InputError(
            f"rank {request.rank} is not in [1, {request.world_size - 1}] (rank 0 is the trainer)",
            field="rank",
        )
    if request.backend not in ("", "nccl", "gloo"):
        raise InputError(f"backend {clip(request.backend)} is not nccl or gloo", "backend")
    t = request.timeout_s
    if not math.isfinite(t) or not 0 <= t <= MAX_GROUP_TIMEOUT_S:
        raise InputError(
            f"timeout_s must be a finite number of seconds in (0, {MAX_GROUP_TIMEOUT_S:g}] "
            f"(0 = {DEFAULT_GROUP_TIMEOUT_S:g}), got {t!r}",
            field="timeout_s",
        )
    return float(t) if t > 0 else DEFAULT_GROUP_TIMEOUT_S


def require_regular_file(path: Path) -> None:
    """InputError unless `path` is a regular file. Opened non-blocking and checked with
    fstat, so a FIFO, device or socket is refused at once instead of blocking a reader."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise InputError(f"cannot open {clip(str(path))}: {exc.strerror}", field="path") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InputError(
                f"{clip(str(path))} is not a regular file (a FIFO, device or socket is refused)",
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
    PathRefused (PERMISSION_DENIED) for a path outside, InputError for the rest. Blocking
    (filesystem calls): run it off the event loop."""
    if weights_dir:
        root = Path(weights_dir).resolve()
        target = (root / raw).resolve()  # an absolute `raw` replaces root

        def inside(p: Path) -> bool:
            return p == root or root in p.parents

        if not inside(target):
            raise PathRefused(
                f"path {clip(raw)} is outside the server's --weights-dir (symlinks resolved)"
            )
    elif allow_anywhere:
        target = Path(raw).resolve()

        def inside(p: Path) -> bool:
            return True

    else:
        raise PathRefused(
            "this server loads no paths: start it with --weights-dir (or push the weights "
            "with PushWeights)",
        )
    if target.is_dir():
        files = sorted(target.glob("*.safetensors"))
        if not files:
            raise InputError(f"no .safetensors weights in {clip(raw)}", field="path")
        for f in files:
            if not inside(f.resolve()):
                raise PathRefused(
                    f"{clip(f.name)} in {clip(raw)} links outside the server's --weights-dir"
                )
            require_regular_file(f)
    else:
        require_regular_file(target)
    return target


def _close_group(handle: Any) -> None:
    """Close a group handle nobody uses (joined too late, or at shutdown)."""
    try:
        handle.close()
    except Exception as exc:
        log.warning("closing an abandoned weight group: %s", exc)
