"""Malformed unary frames -> INVALID_ARGUMENT, as a grpc.aio interceptor.

grpc parses a unary request before any handler runs, and a frame that does not parse as the
method's message ends the call with UNKNOWN. Here the CreditService unary methods get a
deserializer that turns a parse failure into a `MalformedFrame` value, and the handler
answers it with INVALID_ARGUMENT naming the expected message. (Streams report their own bad
frames: servicer.ScoreStream ends with INVALID_ARGUMENT naming the frame.)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from anchorcredit import status
from anchorcredit.errors import InputError
from anchorcredit.server.auth import PROTECTED_PREFIX

INVALID = status.status_of(InputError(""))


@dataclass(frozen=True)
class MalformedFrame:
    """What a request frame that does not parse deserialises to."""

    error: str


def tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """`deserialize`, returning a MalformedFrame instead of raising."""
    if deserialize is None:
        return None

    def parse(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except Exception as exc:  # DecodeError and friends: the caller's bytes
            return MalformedFrame(f"{type(exc).__name__}: {exc}"[:200])

    return parse


class MalformedFrameInterceptor(grpc.aio.ServerInterceptor):
    """Unary CreditService calls whose frame does not parse end with INVALID_ARGUMENT."""

    def __init__(
        self, on_malformed: Callable[[], None] | None = None, prefix: str = PROTECTED_PREFIX
    ) -> None:
        self._prefix = prefix
        self._on_malformed = on_malformed

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        if not details.method.startswith(self._prefix):
            return handler
        inner = handler.unary_unary
        method = details.method.rsplit("/", 1)[-1]

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, MalformedFrame):
                if self._on_malformed is not None:
                    self._on_malformed()
                await context.abort(
                    INVALID.code,
                    f"the request frame is not a valid {method} request ({request.error})",
                )
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary,
            request_deserializer=tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
