"""Errors the contract, runner, batcher and server raise (torch-free). Which gRPC status each
becomes, and whether a caller may retry it, is one table: anchorcredit.status."""

from __future__ import annotations

# Caller-supplied text quoted in an error message is cut to this many characters, so a
# reply's status message always fits gRPC's metadata limit (8 KiB by default).
QUOTE_MAX_CHARS = 200


def clip(value: object, limit: int = QUOTE_MAX_CHARS) -> str:
    """repr() of caller-supplied `value` for an error message, at most about `limit`
    characters (a longer one is cut and says how long it was)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = len(value) if isinstance(value, str | bytes) else len(text)
    return f"{text[:limit]}... ({size} characters)"


class InputError(ValueError):
    """Bad caller input -> INVALID_ARGUMENT. Names the field and, when known, the sequence."""

    def __init__(self, message: str, field: str | None = None, index: int | None = None):
        where = []
        if field is not None:
            where.append(field)
        if index is not None:
            where.append(f"sequence {index}")
        super().__init__(f"{' / '.join(where)}: {message}" if where else message)
        self.field = field
        self.index = index


class PolicyVersionMismatch(RuntimeError):
    """The caller expects another policy version than the one loaded -> FAILED_PRECONDITION."""

    def __init__(self, expected: str, loaded: str):
        super().__init__(
            f"expected policy version {clip(expected)} but the server holds {clip(loaded)}; "
            "call UpdateWeights first or drop expected_policy_version"
        )
        self.expected = expected
        self.loaded = loaded


class DeviceOutOfMemory(RuntimeError):
    """A single sequence does not fit on the device even alone -> RESOURCE_EXHAUSTED, not
    retryable (no split makes it fit; send it shorter or to a larger device)."""


def is_oom(exc: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA or otherwise), recognised without importing torch."""
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


class WeightVersionConflict(RuntimeError):
    """A weight change's version rules are not met (its `replaces` is not served, or it
    names its weights with a label this server has used before) -> FAILED_PRECONDITION;
    nothing was changed."""


class TruncatedWeights(RuntimeError):
    """A tensor's bytes stopped short (the stream ended or the broadcast failed part way)
    -> ABORTED, naming the tensor; nothing was changed."""


class NonFiniteResult(Exception):
    """A NaN/inf came out of the runner: never sent back (INTERNAL)."""


# -- the queue (server/batcher.py) ---------------------------------------------------------
class QueueFull(Exception):
    """The bounded queue is full; `retry_after_s` is an estimate of when it drains."""

    def __init__(self, depth: int, retry_after_s: float) -> None:
        super().__init__(
            f"request queue full ({depth} waiting); retry after ~{retry_after_s * 1000:.0f} ms"
        )
        self.depth = depth
        self.retry_after_s = retry_after_s


class DeadlineExpired(Exception):
    """The request's deadline passed while it waited in the queue."""


class ShuttingDown(Exception):
    """The server no longer accepts work, or stopped work it had accepted before it could
    be answered within the grace period (another replica may answer it)."""


class ModelLoading(Exception):
    """The model is not loaded yet."""


# -- weight changes (server/weights.py) ------------------------------------------------------
class PathRefused(PermissionError):
    """An UpdateWeights path outside --weights-dir, or any path without one."""


class WeightGroupExists(Exception):
    """JoinWeightGroup names a group already joined."""


class WeightGroupNotFound(Exception):
    """ReceiveWeights / LeaveWeightGroup name a group not joined."""


class WeightGroupUnreachable(Exception):
    """The trainer's store or group could not be joined (refused, reset, unknown host)."""


class WeightGroupTimeout(TimeoutError):
    """A collective step (store, group, broadcast) did not finish within the caller's
    timeout_s or the RPC deadline; the thread running it was abandoned."""


class StartupError(RuntimeError):
    """A server configuration that cannot start (a busy port, an unreadable TLS file); the
    message names the flag and its environment variable. `anchorcredit serve` prints it as
    one line and exits 2."""
