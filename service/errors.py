"""Errors the runner raises and the server maps onto gRPC status codes (torch-free)."""

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
