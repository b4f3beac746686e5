"""Cache keys: namespace + schema version + sha256 of a length-prefixed canonical encoding.

Everything that changes the numbers goes into the digest: the model (id, revision, dtype,
layers), the statistics version and the weights digest, all from GetModelInfo (the weights
digest changes whenever the weights do, so a version label reused for other weights, on a
restarted server or another deployment sharing the cache, never finds their numbers); the
policy version; the strategy
and every effective parameter of the validated `anchorcredit.contract.CreditParams`
(defaults included, exactly what the request carries), so two calls that mean the same
numbers share a key however the caller spelled them; the prompt length and the
prompt/response ids as little-endian uint32 bytes. The dtype the values are stored in
(float32/float16) is part of the key too: a float32 client must never read float16-rounded
values. Each field is prefixed by its byte length (8-byte little-endian) so no two different
inputs encode the same (a plain concatenation of "ab"+"c" and "a"+"bc" would collide).
Python's hash() is salted per process and never used.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from anchorcredit.contract import UINT64_END, CreditParams

# 2: the stored value dtype joined the digest.
# 3: the digest encodes every effective parameter (CreditParams.proto_fields(): defaults
#    included), not only those the caller gave, so q=0.4 given and q left at its default
#    share one key; the v2 encoding of the same request differs, hence a new schema.
# 4: the served weights' digest (GetModelInfo.weights_digest) joined the model fields.
SCHEMA_VERSION = 4
DEFAULT_NAMESPACE = "anchorcredit"


@dataclass(frozen=True)
class ModelKey:
    """What identifies the numbers a server computes, from GetModelInfo."""

    model_id: str
    revision: str
    dtype: str
    layers: tuple[int, ...]
    stat_version: str
    weights_digest: str = ""  # "" from a server that computes none

    def encode(self) -> bytes:
        layers = ",".join(str(x) for x in self.layers)
        return _fields(
            self.model_id.encode(),
            self.revision.encode(),
            self.dtype.encode(),
            layers.encode(),
            self.stat_version.encode(),
            self.weights_digest.encode(),
        )


def _fields(*parts: bytes) -> bytes:
    return b"".join(struct.pack("<Q", len(p)) + p for p in parts)


def _params_bytes(params: CreditParams) -> bytes:
    return _fields(params.strategy.encode(), _values_bytes(params.proto_fields()))


def _values_bytes(values: Mapping[str, Any]) -> bytes:
    # Sorted names; floats by their exact IEEE bits (repr-free), ints/bools as uint64 (seed
    # reaches 2**64 - 1). The contract has already coerced each value to its proto type.
    items = []
    for name in sorted(values):
        v = values[name]
        if isinstance(v, float):
            enc = b"f" + struct.pack("<d", v)
        else:
            v = int(v)
            if not 0 <= v < UINT64_END:
                raise ValueError(f"{name} must be in [0, 2**64), got {v!r}")
            enc = b"i" + struct.pack("<Q", v)
        items.append(_fields(name.encode(), enc))
    return b"".join(items)


class KeyBuilder:
    """Builds keys for one (model, policy version, params); ids vary per sequence.

    The shared prefix is hashed once and copied per sequence (hashlib's copy is cheap).
    """

    def __init__(
        self,
        model: ModelKey,
        policy_version: str,
        params: CreditParams,
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
                _params_bytes(params),
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
