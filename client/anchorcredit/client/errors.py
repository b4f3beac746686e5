"""What a failed call raises, and how a server's gRPC status becomes it.

`CreditServiceError` carries the gRPC status code and whether the status table
(anchorcredit.status) calls it retryable; FAILED_PRECONDITION (the server holds
another policy version) is its subclass `StalePolicyVersionError`. Bad-input errors name
the caller's sequence index: the server names the index within the request it got, which
`caller_index_error` maps back.
"""

from __future__ import annotations

import re

import grpc

from anchorcredit import status

# Where the server's INVALID_ARGUMENT names a sequence: "sequences[3].response_ids / ...".
_SEQ_INDEX = re.compile(r"sequences\[(\d+)\]")


class CreditServiceError(RuntimeError):
    """A call the client could not complete; `code` is the gRPC status code.

    `index`: the caller's index of the sequence at fault (bad input), None when unknown.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        target: str | None = None,
        index: int | None = None,
    ):
        where = f" from {target}" if target else ""
        super().__init__(f"{code.name}{where}: {details}")
        self.code = code
        self.details = details
        self.target = target
        self.index = index
        # may the same call succeed later (the status table's default for the code)
        self.retryable = code in status.RETRYABLE_CODES


class StalePolicyVersionError(CreditServiceError):
    """FAILED_PRECONDITION: the server holds another policy version than the one asked for."""


def from_rpc(err: grpc.RpcError, target: str) -> CreditServiceError:
    """The error to raise for a non-retried gRPC failure from `target`; `.retryable` is the
    status table's verdict (anchorcredit.status: the server's trailer, else the code's)."""
    code = err.code()
    stale = code == grpc.StatusCode.FAILED_PRECONDITION
    cls = StalePolicyVersionError if stale else CreditServiceError
    out = cls(code, err.details() or "", target)
    try:
        trailers = err.trailing_metadata() or ()
    except Exception:  # a locally raised error has none
        trailers = ()
    out.retryable = status.retryable(code, trailers)
    return out


def caller_index_error(err: CreditServiceError, sent: list[int]) -> CreditServiceError:
    """The server names the index within the request it got (cache hits removed, batches
    split); `sent[j]` is the caller's index of the request's sequence j. Returns the error
    naming the caller's index instead, as `.index` and in the message (or `err` unchanged
    when it names no sequence of the request)."""
    m = _SEQ_INDEX.search(err.details) if err.code == grpc.StatusCode.INVALID_ARGUMENT else None
    if m is None or int(m.group(1)) >= len(sent):
        return err
    j = int(m.group(1))
    caller = sent[j]
    return CreditServiceError(
        err.code, f"sequence {caller} (sent as {j}): {err.details}", err.target, caller
    )
