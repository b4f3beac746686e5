"""Bearer-token authentication of the CreditService methods, as a grpc.aio interceptor.

Health and reflection stay open (Kubernetes probes cannot send metadata). A call without
the token gets UNAUTHENTICATED; the metrics interceptor around this one still times it.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

PROTECTED_PREFIX = "/anchorcredit.v1.CreditService/"
DENIED_MESSAGE = "missing or wrong `authorization: Bearer <token>` metadata"


def bearer_token_matches(metadata: Any, token: bytes) -> bool:
    """True when the call's `authorization` metadata is `Bearer <token>` (constant time)."""
    for key, value in metadata or ():
        if key == "authorization":
            raw = value.encode() if isinstance(value, str) else value
            scheme, _, given = raw.partition(b" ")
            return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), token)
    return False


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses CreditService calls without `authorization: Bearer <token>`; no token, no check."""

    def __init__(
        self,
        token: str | None,
        *,
        protected_prefix: str = PROTECTED_PREFIX,
        on_denied: Callable[[], None] | None = None,
    ) -> None:
        self._token = token.encode() if token else None
        self._prefix = protected_prefix
        self._on_denied = on_denied

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if (
            handler is None
            or self._token is None
            or not details.method.startswith(self._prefix)
            or bearer_token_matches(details.invocation_metadata, self._token)
        ):
            return handler
        return self._denying(handler)

    def _denying(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        async def deny(context: grpc.aio.ServicerContext) -> None:
            if self._on_denied is not None:
                self._on_denied()
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, DENIED_MESSAGE)

        if handler.unary_unary is not None:

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await deny(context)

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )

        if handler.stream_unary is not None:

            async def client_stream(requests: Any, context: grpc.aio.ServicerContext) -> Any:
                await deny(context)

            return grpc.stream_unary_rpc_method_handler(
                client_stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )

        async def stream(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
            await deny(context)
            yield  # pragma: no cover - abort raises; this makes it an async generator

        return grpc.stream_stream_rpc_method_handler(
            stream,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
