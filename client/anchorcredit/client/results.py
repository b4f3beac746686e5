"""CreditResult, and reading one from a cache value or from the server's SequenceResult."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import numpy as np

from anchorcredit.client import codec
from anchorcredit.client.errors import CreditServiceError
from anchorcredit.v1 import credit_pb2 as pb

BASE_ARRAYS = ("waad", "fai", "gamma")
_LE_F32 = np.dtype("<f4")


@dataclass
class CreditResult:
    """Per-token credit of one (prompt, response): float32 arrays of len(response).

    Arrays are read-only views of the wire/cache bytes (zero-copy); `np.array(x)` for a copy.
    """

    waad: np.ndarray
    fai: np.ndarray
    gamma: np.ndarray
    policy_version: str
    entropy: np.ndarray | None = None
    cached: bool = False


def arrays_wanted(with_entropy: bool) -> tuple[str, ...]:
    return BASE_ARRAYS + ("entropy",) if with_entropy else BASE_ARRAYS


def from_cache(
    value: bytes | None, n_tokens: int, need: tuple[str, ...], dtype: str, version: str
) -> CreditResult | None:
    """The result stored in a cache value; None (a miss) if absent or unusable."""
    arrays = codec.decode(value, n_tokens, need, dtype)
    if arrays is None:
        return None
    return CreditResult(
        arrays["waad"], arrays["fai"], arrays["gamma"], version, arrays.get("entropy"), cached=True
    )


def wire_arrays(
    r: pb.SequenceResult, n_tokens: int, names: tuple[str, ...], index: int
) -> dict[str, np.ndarray]:
    """The float32 arrays of one SequenceResult, checked against the response length
    (`index`, the caller's, names the sequence in the error)."""
    arrays = {}
    for name in names:
        raw = getattr(r, name)
        if len(raw) != 4 * n_tokens or r.response_len != n_tokens:
            raise CreditServiceError(
                grpc.StatusCode.INTERNAL,
                f"sequence {index}: {name} has {len(raw)} bytes for {n_tokens} tokens",
            )
        arrays[name] = np.frombuffer(raw, dtype=_LE_F32)
    return arrays


def from_arrays(arrays: dict[str, np.ndarray], version: str) -> CreditResult:
    return CreditResult(
        arrays["waad"], arrays["fai"], arrays["gamma"], version, arrays.get("entropy")
    )
