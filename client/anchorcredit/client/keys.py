"""Cache keys: namespace + schema version + sha256 of a length-prefixed canonical encoding.

Everything that changes the numbers goes into the digest: the model (id, revision, dtype,
layers), the policy version, the statistic version, the strategy with every parameter sent,
the prompt length and the prompt/response ids as little-endian uint32 bytes. The dtype the
values are stored in (float32/float16) is part of the key too: a float32 client must never
read float16-rounded values. Each field is
prefixed by its byte length (8-byte little-endian) so no two different inputs encode the
same (a plain concatenation of "ab"+"c" and "a"+"bc" would collide). Python's hash() is
salted per process and never used.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

SCHEMA_VERSION = 2  # 2: the stored value dtype joined the digest
DEFAULT_NAMESPACE = "anchorcredit"

# Proto type of every CreditParams field (credit.proto): parameters are coerced to it, so
# q=0.4 and q=0.40, or k=3 and k=3.0, give one key, as they give one request.
PARAM_TYPES: dict[str, type] = {
    "q": float,
    "gamma_amp": float,
    "alpha": float,
    "k": int,
    "tau_waad": float,
    "tau_delta": float,
    "seed": int,
    "window": int,
    "h_lo": int,
    "h_hi": int,
    "h_hi_to_end": bool,
    "head_quantile": float,
}
# Exclusive upper bound of each int field: uint32 in the proto, seed uint64.
_INT_LIMIT: dict[str, int] = {"seed": 2**64}
_UINT32 = 2**32


def canonical_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Validate and coerce credit parameters to their proto types; None values are dropped
    (the server's SPEC default applies), except h_hi: `h_hi=None` or `h_hi="end"` (SPEC.md's
    analysis variant, the runner's None) becomes `h_hi_to_end=True`.
    """
    out: dict[str, Any] = {}
    for name, value in params.items():
        if name == "h_hi" and (value is None or isinstance(value, str)):
            # The runner's h_hi=None and SPEC.md's "end" both mean: to the end of the response.
            if value not in (None, "end"):
                raise ValueError(f"h_hi must be an int or 'end', got {value!r}")
            out["h_hi_to_end"] = True
            continue
        if value is None:
            continue
        kind = PARAM_TYPES.get(name)
        if kind is None:
            raise ValueError(f"unknown credit parameter {name!r}; known: {', '.join(PARAM_TYPES)}")
        if kind is bool:
            out[name] = bool(value)
        elif kind is int:
            if isinstance(value, bool) or int(value) != value or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
            limit = _INT_LIMIT.get(name, _UINT32)
            if int(value) >= limit:
                raise ValueError(f"{name} must be < 2**{limit.bit_length() - 1}, got {value!r}")
            out[name] = int(value)
        else:
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value!r}")
            out[name] = value
    if out.get("h_hi_to_end") is False:
        del out["h_hi_to_end"]  # false is the proto default: same request, same key
    return out


@dataclass(frozen=True)
class ModelKey:
    """What identifies the numbers a server computes, from GetModelInfo."""

    model_id: str
    revision: str
    dtype: str
    layers: tuple[int, ...]
    stat_version: str

    def encode(self) -> bytes:
        layers = ",".join(str(x) for x in self.layers)
        return _fields(
            self.model_id.encode(),
            self.revision.encode(),
            self.dtype.encode(),
            layers.encode(),
            self.stat_version.encode(),
        )


def _fields(*parts: bytes) -> bytes:
    return b"".join(struct.pack("<Q", len(p)) + p for p in parts)


def _params_bytes(strategy: str, params: Mapping[str, Any]) -> bytes:
    # Sorted names; floats by their exact IEEE bits (repr-free), ints/bools as uint64 (the
    # same bytes int64 gave for every value below 2**63, so those keys did not change).
    items = []
    for name in sorted(params):
        v = params[name]
        if isinstance(v, float):
            enc = b"f" + struct.pack("<d", v)
        else:
            v = int(v)
            if not 0 <= v < 2**64:
                raise ValueError(f"{name} must be in [0, 2**64), got {v!r}")
            enc = b"i" + struct.pack("<Q", v)
        items.append(_fields(name.encode(), enc))
    return _fields(strategy.encode(), b"".join(items))


class KeyBuilder:
    """Builds keys for one (model, policy version, strategy, params); ids vary per sequence.

    The shared prefix is hashed once and copied per sequence (hashlib's copy is cheap).
    """

    def __init__(
        self,
        model: ModelKey,
        policy_version: str,
        strategy: str,
        params: Mapping[str, Any],
        outputs: tuple[str, ...] = (),
        namespace: str = DEFAULT_NAMESPACE,
        *,
        value_dtype: str = "float32",
    ):
        self.prefix = f"{namespace}:v{SCHEMA_VERSION}:"
        h = hashlib.sha256()
        h.update(
            _fields(
                model.encode(),
                policy_version.encode(),
                _params_bytes(strategy, params),
                # entropy is only computed on request; the other arrays always come together
                ",".join(sorted(outputs)).encode(),
                value_dtype.encode(),
            )
        )
        self._base = h

    def key(self, prompt_ids: np.ndarray, response_ids: np.ndarray) -> str:
        """Key of one sequence (ids as uint32 arrays)."""
        h = self._base.copy()
        p = np.ascontiguousarray(prompt_ids, dtype="<u4").tobytes()
        r = np.ascontiguousarray(response_ids, dtype="<u4").tobytes()
        h.update(_fields(struct.pack("<Q", len(prompt_ids)), p, r))
        return self.prefix + h.hexdigest()
