"""CreditService handlers: parse, queue through the batcher, encode, map errors to status codes.

Every failure becomes a status with a one-line message (the field and sequence index for
bad input); exceptions never reach the client as stack traces, and the server keeps
serving after any bad request. Unexpected errors are logged here with their traceback and
reported as INTERNAL with the request id.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from anchorcredit import __version__, status
from anchorcredit.errors import DeadlineExpired, InputError, ModelLoading, ShuttingDown, clip
from anchorcredit.server import convert
from anchorcredit.server.batcher import Outcome
from anchorcredit.server.state import ServerState
from anchorcredit.server.weights import WeightChanges
from anchorcredit.v1 import credit_pb2 as pb
from anchorcredit.v1 import credit_pb2_grpc

log = logging.getLogger(__name__)


class _Failure(Exception):
    """A status to end the RPC with (used to carry errors out of stream reader tasks)."""

    def __init__(
        self, code: grpc.StatusCode, message: str, trailers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(message)
        self.code, self.message, self.trailers = code, message, trailers


class CreditServicer(credit_pb2_grpc.CreditServiceServicer):
    """grpc.aio implementation of anchorcredit.v1.CreditService."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.weights = WeightChanges(state)

    # -- error mapping (the one table: anchorcredit.status) ---------------------------------
    def _failure(self, exc: BaseException, request_id: str = "") -> _Failure:
        if isinstance(exc, _Failure):
            return exc
        row = status.status_of(exc)
        self.state.metrics.failures.labels(row.reason).inc()
        if row is status.INTERNAL or row.reason == "non_finite":
            log.error("internal error (request_id=%r)", request_id, exc_info=exc)
            text = (
                f"internal error ({type(exc).__name__}); see the server log, "
                f"request_id={clip(request_id)}"
            )
        elif isinstance(exc, DeadlineExpired | TimeoutError) and row.reason == "deadline":
            text = "deadline expired before the request was answered; its work was dropped"
        else:
            text = str(exc) or type(exc).__name__
        return _Failure(row.code, status.message(text), status.trailers(row, exc))

    @staticmethod
    async def _abort(context: grpc.aio.ServicerContext, failure: _Failure) -> None:
        if failure.trailers:
            context.set_trailing_metadata(failure.trailers)
        await context.abort(failure.code, failure.message)

    async def _require_ready(self, context: grpc.aio.ServicerContext) -> None:
        if not self.state.ready:
            await self._abort(
                context, self._failure(ModelLoading("model is loading; retry shortly"))
            )

    # -- scoring ---------------------------------------------------------------------------------
    def _parse(self, request: pb.ScoreRequest) -> convert.ParsedRequest:
        cfg, state = self.state.config, self.state
        assert state.backend is not None and state.info is not None
        parsed = convert.parse_request(
            request, cfg.max_request_sequences, cfg.max_request_tokens, state.info.max_positions
        )
        # The edge: ids are checked once, against the model (names sequences[i]); the
        # TokenPairs it returns are what the batcher hands to the backend.
        parsed.pairs = state.backend.validate(parsed.pairs)
        return parsed

    async def _score_one(
        self, parsed: convert.ParsedRequest, context: grpc.aio.ServicerContext, block: bool = False
    ) -> pb.ScoreResponse:
        assert self.state.batcher is not None
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        # wait_for: the caller's deadline bounds the wait even if the transport is slow to
        # cancel us; the batcher drops the request when it finds it cancelled or expired.
        outcome = await self._within_grace(
            asyncio.wait_for(self.state.batcher.submit(parsed, deadline, block=block), remaining)
        )
        return self._response(parsed, outcome)

    async def _within_grace(self, work: Awaitable[Any]) -> Any:
        """`work`, unless the server's grace period is about to end first: then the work is
        cancelled (the batcher drops it) and the call is refused with ShuttingDown
        (UNAVAILABLE, retried elsewhere) before gRPC would cancel it (CANCELLED)."""
        task = asyncio.ensure_future(work)
        out_of_time = self.state.out_of_time
        try:
            await asyncio.wait({task, out_of_time}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if task.done():
            return task.result()
        task.cancel()
        raise ShuttingDown(
            "server is stopping and this call could not be answered within its grace "
            "period; retry on another replica"
        )

    def _response(self, parsed: convert.ParsedRequest, outcome: Outcome) -> pb.ScoreResponse:
        assert self.state.info is not None
        results = [convert.encode_result(r, parsed.outputs) for r in outcome.results]
        self.state.metrics.credit.observe_later(parsed.params.strategy, outcome.results)
        return pb.ScoreResponse(
            results=results,
            # every result carries the version that produced it; the batcher saw they agree
            policy_version=outcome.results[0].policy_version,
            model_id=self.state.info.model_id,
            request_id=parsed.request_id,
            queue_seconds=outcome.queue_seconds,
            compute_seconds=outcome.compute_seconds,
            stat_version=self.state.info.stat_version,
            weights_digest=self.state.labels.get(outcome.results[0].policy_version, ""),
        )

    async def Score(
        self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> pb.ScoreResponse:
        await self._require_ready(context)
        try:
            parsed = self._parse(request)
            return await self._score_one(parsed, context)
        except Exception as exc:  # every error becomes a status, never a traceback
            await self._abort(context, self._failure(exc, request.request_id))
            raise AssertionError("unreachable") from None

    async def ScoreStream(
        self, request_iterator: AsyncIterator[pb.ScoreRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ScoreResponse]:
        """Responses in request order; up to `stream_window` requests of a stream in flight.

        A stream ends with one status, so the first failing request ends it (its message
        carries the request_id); responses before it have been delivered. A frame that is
        no ScoreRequest ends it with INVALID_ARGUMENT naming the frame; every answer
        carries its request's request_id; a stream never ends OK with answers missing.
        """
        await self._require_ready(context)
        pending: asyncio.Queue = asyncio.Queue(maxsize=self.state.config.stream_window)
        done = object()

        async def reader() -> None:
            frame = 0
            try:
                requests = aiter(request_iterator)
                while True:
                    try:
                        request = await anext(requests)
                    except StopAsyncIteration:
                        return
                    except Exception as exc:  # a frame that is no ScoreRequest (counted)
                        await pending.put(
                            self._failure(
                                InputError(
                                    f"ScoreStream frame {frame} could not be parsed as a "
                                    f"ScoreRequest ({type(exc).__name__}); the stream ends here"
                                )
                            )
                        )
                        return
                    frame += 1
                    try:
                        parsed = self._parse(request)
                    except Exception as exc:
                        await pending.put(
                            self._failure(_with_id(exc, request.request_id), request.request_id)
                        )
                        return
                    # block: a full queue slows the stream down instead of failing it.
                    task = asyncio.ensure_future(self._score_one(parsed, context, block=True))
                    await pending.put((request.request_id, task))
            finally:
                await pending.put(done)

        reading = asyncio.ensure_future(reader())
        try:
            while True:
                item = await pending.get()
                if item is done:
                    # Never OK with answers missing: a reader that died ends the stream
                    # with its error, not with a clean close.
                    await asyncio.wait({reading})
                    if not reading.cancelled() and reading.exception() is not None:
                        await self._abort(context, self._failure(reading.exception()))
                    break
                if isinstance(item, _Failure):
                    await self._abort(context, item)
                request_id, task = item
                try:
                    response = await task
                except Exception as exc:
                    await self._abort(context, self._failure(_with_id(exc, request_id), request_id))
                yield response
        finally:
            reading.cancel()
            while not pending.empty():
                item = pending.get_nowait()
                if isinstance(item, tuple):
                    item[1].cancel()

    # -- model --------------------------------------------------------------------------------
    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        await self._require_ready(context)
        assert self.state.backend is not None
        cfg = self.state.config
        return convert.model_info(
            self.state.backend.info(),
            max_batch_tokens=cfg.max_batch_tokens,
            max_request_sequences=cfg.max_request_sequences,
            server_version=__version__,
            max_request_tokens=cfg.max_request_tokens,
        )

    # -- weights (server/weights.py: stage beside the model, commit on the device thread) ---
    async def _weights_call(
        self, context: grpc.aio.ServicerContext, call: Callable[[], Awaitable[Any]]
    ) -> Any:
        await self._require_ready(context)
        try:
            return await self._within_grace(call())
        except Exception as exc:
            await self._abort(context, self._failure(exc))
            raise AssertionError("unreachable") from None

    async def UpdateWeights(
        self, request: pb.UpdateWeightsRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateWeightsResponse:
        return await self._weights_call(context, lambda: self.weights.from_path(request))

    async def PushWeights(
        self, request_iterator: AsyncIterator[pb.WeightChunk], context: grpc.aio.ServicerContext
    ) -> pb.UpdateWeightsResponse:
        return await self._weights_call(context, lambda: self.weights.from_stream(request_iterator))

    async def JoinWeightGroup(
        self, request: pb.JoinWeightGroupRequest, context: grpc.aio.ServicerContext
    ) -> pb.JoinWeightGroupResponse:
        deadline = context.time_remaining()
        return await self._weights_call(context, lambda: self.weights.join(request, deadline))

    async def ReceiveWeights(
        self, request: pb.ReceiveWeightsRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateWeightsResponse:
        deadline = context.time_remaining()
        return await self._weights_call(context, lambda: self.weights.receive(request, deadline))

    async def LeaveWeightGroup(
        self, request: pb.LeaveWeightGroupRequest, context: grpc.aio.ServicerContext
    ) -> pb.LeaveWeightGroupResponse:
        return await self._weights_call(context, lambda: self.weights.leave(request))


def _with_id(exc: BaseException, request_id: str) -> BaseException:
    """Prefix stream errors with the request id so the caller knows which one failed."""
    if request_id and isinstance(exc, InputError | ValueError):
        return InputError(f"request_id={request_id!r}: {exc}")
    return exc
