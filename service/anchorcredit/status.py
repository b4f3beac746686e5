"""The one status table: every error the service raises -> its gRPC status code, the
failures{reason} it is counted under, whether a caller may retry it, and what to do.

Torch-free, beside the contract: the servicer maps exceptions with `status_of` and sends
`trailers`; the client's transport decides with `retryable` and `retry_hint_s`. Retry
hints travel only as trailing metadata (never parsed from a message). docs/RELIABILITY.md
prints this table (`markdown_table`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import grpc

from anchorcredit import errors as e

# Standard gRPC retry-pushback trailer (honoured by gRPC retry policies) plus a plain one;
# both carry the same milliseconds.
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"
RETRY_AFTER_KEY = "retry-after-ms"
# The server's verdict on retrying ("1" / "0"); the code's default when it is absent.
RETRYABLE_KEY = "anchorcredit-retryable"
# A status message is cut to this many UTF-8 bytes: percent-encoded it stays under 8 KiB,
# gRPC's default metadata limit (a longer one reaches the caller as RESOURCE_EXHAUSTED).
MESSAGE_MAX_BYTES = 2000

Code = grpc.StatusCode


@dataclass(frozen=True)
class Status:
    """How one error class is answered."""

    code: grpc.StatusCode
    reason: str  # the anchorcredit_request_failures_total{reason} label
    retryable: bool  # may the caller try again (the client does, within its budget)
    action: str  # what the caller should do, for the docs' table


# Ordered: an exception takes the first row its class derives from (specific rows first).
TABLE: tuple[tuple[type[BaseException], Status], ...] = (
    (e.InputError, Status(Code.INVALID_ARGUMENT, "invalid_argument", False, "fix the field named")),
    (e.PolicyVersionMismatch, Status(Code.FAILED_PRECONDITION, "policy_version", False,
        "ask for the served version (GetModelInfo) or drop expected_policy_version")),
    (e.WeightVersionConflict, Status(Code.FAILED_PRECONDITION, "weight_version", False,
        "name new weights with a label this server never used; `replaces` the served one")),
    (e.TruncatedWeights, Status(Code.ABORTED, "weights_truncated", False,
        "send the whole update again (nothing was changed)")),
    (e.QueueFull, Status(Code.RESOURCE_EXHAUSTED, "queue_full", True,
        "retry after the `retry-after-ms` hint, with jitter")),
    (e.DeviceOutOfMemory, Status(Code.RESOURCE_EXHAUSTED, "oom", False,
        "one sequence does not fit the device even alone: send it shorter")),
    (e.WeightGroupTimeout, Status(Code.DEADLINE_EXCEEDED, "weight_group_timeout", False,
        "check that the trainer's rank 0 hosts the store and joins; raise timeout_s")),
    (e.DeadlineExpired, Status(Code.DEADLINE_EXCEEDED, "deadline", False,
        "give the call a longer deadline")),
    (TimeoutError, Status(Code.DEADLINE_EXCEEDED, "deadline", False,
        "give the call a longer deadline")),
    (e.ShuttingDown, Status(Code.UNAVAILABLE, "unavailable", True,
        "retry on another replica")),
    (e.ModelLoading, Status(Code.UNAVAILABLE, "unavailable", True, "retry shortly")),
    (e.PathRefused, Status(Code.PERMISSION_DENIED, "permission_denied", False,
        "load from inside --weights-dir, or push the weights (PushWeights)")),
    (e.WeightGroupExists, Status(Code.ALREADY_EXISTS, "weight_group", False,
        "LeaveWeightGroup it first, or pick another name")),
    (e.WeightGroupNotFound, Status(Code.NOT_FOUND, "weight_group", False,
        "JoinWeightGroup first")),
    (e.WeightGroupUnreachable, Status(Code.UNAVAILABLE, "weight_group", False,
        "check the store address the trainer hosts; open a new group")),
    (e.NonFiniteResult, Status(Code.INTERNAL, "non_finite", False,
        "report it with the request_id (a NaN/inf is never sent)")),
    # Last: any other bad value (contract checks raise InputError, which is a ValueError).
    (ValueError, Status(Code.INVALID_ARGUMENT, "invalid_argument", False,
        "fix the field named")),
)  # fmt: skip
INTERNAL = Status(Code.INTERNAL, "internal", False, "report it with the request_id")
# Refusals made before a handler runs (server/auth.py, server/frames.py).
UNAUTHENTICATED = Status(Code.UNAUTHENTICATED, "unauthenticated", False,
    "send `authorization: Bearer <token>`")  # fmt: skip
PERMISSION_DENIED = Status(Code.PERMISSION_DENIED, "permission_denied", False,
    "weight changes need the admin token")  # fmt: skip
# Codes a caller may see that no row of ours sent (grpc's own: connection refused, the
# concurrent-RPC cap, a call that reached a server just as it stopped, CANCELLED there by
# gRPC and never by a caller that sets deadlines, not cancels): retried by default on
# another address. Every other code is final.
RETRYABLE_CODES = frozenset({Code.UNAVAILABLE, Code.RESOURCE_EXHAUSTED, Code.CANCELLED})


def status_of(exc: BaseException) -> Status:
    """The row of `exc`'s class (INTERNAL when none matches)."""
    for cls, status in TABLE:
        if isinstance(exc, cls):
            return status
    return INTERNAL


def trailers(status: Status, exc: BaseException | None = None) -> tuple[tuple[str, str], ...]:
    """Trailing metadata of a refusal: the retry verdict, and QueueFull's drain-time hint."""
    out = [(RETRYABLE_KEY, "1" if status.retryable else "0")]
    after = getattr(exc, "retry_after_s", None)
    if isinstance(after, int | float):
        ms = str(max(1, round(after * 1000)))
        out += [(RETRY_PUSHBACK_KEY, ms), (RETRY_AFTER_KEY, ms)]
    return tuple(out)


def _pairs(metadata: Iterable[tuple[str, str | bytes]] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in metadata or ():
        out[key] = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    return out


def retryable(code: grpc.StatusCode, metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
    """May a call that ended with `code` (and these trailers) be tried again? The server's
    verdict when it sent one, else the code's default (RETRYABLE_CODES)."""
    verdict = _pairs(metadata).get(RETRYABLE_KEY)
    if verdict in ("0", "1"):
        return verdict == "1"
    return code in RETRYABLE_CODES


def retry_hint_s(metadata: Iterable[tuple[str, str | bytes]] | None) -> float | None:
    """Seconds the server asked the caller to wait, if it said (a malformed hint is none)."""
    pairs = _pairs(metadata)
    for key in (RETRY_PUSHBACK_KEY, RETRY_AFTER_KEY):
        if key in pairs:
            try:
                ms = float(pairs[key])
            except ValueError:
                return None
            return max(0.0, ms / 1000.0) if ms == ms and ms != float("inf") else None
    return None


def message(text: str) -> str:
    """`text` cut to MESSAGE_MAX_BYTES of UTF-8, so a status always fits its metadata."""
    raw = text.encode("utf-8", errors="replace")
    if len(raw) <= MESSAGE_MAX_BYTES:
        return text
    cut = raw[: MESSAGE_MAX_BYTES - 40].decode("utf-8", errors="ignore")
    return f"{cut} ... ({len(raw)} bytes, cut)"


def markdown_table() -> str:
    """The table as docs/RELIABILITY.md prints it (a test keeps the two equal)."""
    rows = [
        "| error | status code | retryable | reason label | what to do |",
        "|---|---|---|---|---|",
    ]
    for cls, s in (*TABLE, (Exception, INTERNAL)):
        name = cls.__name__ if cls.__module__ == "builtins" else f"errors.{cls.__name__}"
        if cls is Exception:
            name = "anything else"
        yes = "yes" if s.retryable else "no"
        rows.append(f"| `{name}` | {s.code.name} | {yes} | `{s.reason}` | {s.action} |")
    refusals = (
        ("no or wrong token", UNAUTHENTICATED),
        ("scoring token on a weight change", PERMISSION_DENIED),
    )
    for what, s in refusals:
        rows.append(f"| {what} | {s.code.name} | no | `{s.reason}` | {s.action} |")
    return "\n".join(rows)
