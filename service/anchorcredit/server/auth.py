"""Bearer-token authentication of the CreditService methods, as a grpc.aio interceptor.

Two roles (docs/SERVICE.md "Security"):
- scoring (`--auth-token`): Score, ScoreStream, GetModelInfo. Unset: those are open.
- admin (`--admin-token`): the weight-changing RPCs (WEIGHT_METHODS). Unset: they answer
  PERMISSION_DENIED, unless the server runs with `--allow-unauthenticated-weights`
  (development only), where they need what scoring needs.
The admin token is accepted on scoring calls too. Health and reflection stay open
(Kubernetes probes cannot send metadata).

The check runs on the call's metadata, before the payload is read: a denied call gets a
handler whose deserializer ignores the bytes, so unauthenticated garbage is never parsed
(nor logged). The metrics interceptor around this one still times denied calls.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from anchorcredit import status

PROTECTED_PREFIX = "/anchorcredit.v1.CreditService/"
WEIGHT_METHODS = frozenset(
    PROTECTED_PREFIX + m
    for m in (
        "UpdateWeights",
        "PushWeights",
        "JoinWeightGroup",
        "ReceiveWeights",
        "LeaveWeightGroup",
    )
)
DENIED_MESSAGE = "missing or wrong `authorization: Bearer <token>` metadata"
ADMIN_DENIED_MESSAGE = (
    "weight changes need the admin token (`authorization: Bearer <admin token>`; "
    "CreditClient(..., admin_token=...))"
)
NO_ADMIN_MESSAGE = (
    "weight changes are disabled on this server: start it with --admin-token "
    "(or ANCHORCREDIT_ADMIN_TOKEN[_FILE]) and call with that token"
)


def bearer_token(metadata: Any) -> bytes | None:
    """The token of the call's `authorization: Bearer <token>` metadata, else None."""
    for key, value in metadata or ():
        if key == "authorization":
            raw = value.encode() if isinstance(value, str) else value
            scheme, _, given = raw.partition(b" ")
            return given.strip() if scheme.lower() == b"bearer" else None
    return None


def _matches(given: bytes | None, *tokens: bytes | None) -> bool:
    """Constant time per token; every configured token is compared."""
    ok = False
    for token in tokens:
        if token is not None and given is not None:
            ok |= hmac.compare_digest(given, token)
    return ok


def bearer_token_matches(metadata: Any, token: bytes) -> bool:
    """True when the call's `authorization` metadata is `Bearer <token>` (constant time)."""
    return _matches(bearer_token(metadata), token)


def _ignore_payload(_: bytes) -> None:
    """The deserializer of a denied call: the bytes are never parsed."""
    return None


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Scoring token on CreditService calls, admin token on the weight-changing ones."""

    def __init__(
        self,
        token: str | None,
        *,
        admin_token: str | None = None,
        allow_unauthenticated_weights: bool = False,
        protected_prefix: str = PROTECTED_PREFIX,
        on_denied: Callable[[], None] | None = None,
        on_forbidden: Callable[[], None] | None = None,
    ) -> None:
        self._token = token.encode() if token else None
        self._admin = admin_token.encode() if admin_token else None
        self._open_weights = allow_unauthenticated_weights and self._admin is None
        self._prefix = protected_prefix
        self._on_denied = on_denied
        self._on_forbidden = on_forbidden

    def check(self, method: str, metadata: Any) -> tuple[grpc.StatusCode, str] | None:
        """None when the call may proceed, else the status to refuse it with."""
        if not method.startswith(self._prefix):
            return None  # health, reflection
        given = bearer_token(metadata)
        if method in WEIGHT_METHODS and not self._open_weights:
            if self._admin is None:
                return status.PERMISSION_DENIED.code, NO_ADMIN_MESSAGE
            if _matches(given, self._admin):
                return None
            if given is None:
                return status.UNAUTHENTICATED.code, ADMIN_DENIED_MESSAGE
            return status.PERMISSION_DENIED.code, ADMIN_DENIED_MESSAGE
        if self._token is None or _matches(given, self._token, self._admin):
            return None
        return status.UNAUTHENTICATED.code, DENIED_MESSAGE

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        refusal = self.check(details.method, details.invocation_metadata)
        handler = await continuation(details)
        if handler is None or refusal is None:
            return handler
        return self._denying(handler, *refusal)

    def _denying(
        self, handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str
    ) -> grpc.RpcMethodHandler:
        async def deny(context: grpc.aio.ServicerContext) -> None:
            hook = self._on_forbidden if code == status.PERMISSION_DENIED.code else None
            hook = hook or self._on_denied
            if hook is not None:
                hook()
            await context.abort(code, message)

        if handler.unary_unary is not None:

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await deny(context)

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=_ignore_payload,
                response_serializer=handler.response_serializer,
            )

        if handler.stream_unary is not None:

            async def client_stream(requests: Any, context: grpc.aio.ServicerContext) -> Any:
                await deny(context)

            return grpc.stream_unary_rpc_method_handler(
                client_stream,
                request_deserializer=_ignore_payload,
                response_serializer=handler.response_serializer,
            )

        async def stream(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
            await deny(context)
            yield  # pragma: no cover - abort raises; this makes it an async generator

        return grpc.stream_stream_rpc_method_handler(
            stream,
            request_deserializer=_ignore_payload,
            response_serializer=handler.response_serializer,
        )
