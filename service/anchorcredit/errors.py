"""Errors the contract, runner and batcher raise; the server maps each onto a gRPC status
(torch-free)."""

from __future__ import annotations


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
            f"expected policy version {expected!r} but the server holds {loaded!r}; "
            "call UpdateWeights first or drop expected_policy_version"
        )
        self.expected = expected
        self.loaded = loaded


class DeviceOutOfMemory(RuntimeError):
    """A single sequence does not fit on the device even alone -> RESOURCE_EXHAUSTED."""


def is_oom(exc: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA or otherwise), recognised without importing torch."""
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


class WeightVersionConflict(RuntimeError):
    """A weight change's version rules are not met (its `replaces` is not served, or it
    reuses the served label) -> FAILED_PRECONDITION; nothing was changed."""


class StartupError(RuntimeError):
    """A server configuration that cannot start (a busy port, an unreadable TLS file); the
    message names the flag and its environment variable. `anchorcredit serve` prints it as
    one line and exits 2."""
