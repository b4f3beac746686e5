"""Cache values: a 12-byte header + raw little-endian float arrays, one after another.

Header ("<4sBBHI"): magic b"ACRD", codec version, dtype code
(0 = float32, 1 = float16), bitmask of the arrays present (waad=1, fai=2, gamma=4,
entropy=8, stored in that order), token count. Decoding checks every one of these and the
exact byte length; anything off (truncated, foreign, another codec version, another response
length) decodes to None and is treated as a cache miss.
"""

from __future__ import annotations

import struct

import numpy as np

MAGIC = b"ACRD"
CODEC_VERSION = 1
_HEADER = struct.Struct("<4sBBHI")
HEADER_BYTES = _HEADER.size
ARRAYS = ("waad", "fai", "gamma", "entropy")  # storage order and bit positions
DTYPES = {"float32": (0, np.dtype("<f4")), "float16": (1, np.dtype("<f2"))}
_BY_CODE = {code: dt for code, dt in DTYPES.values()}


def encode(arrays: dict[str, np.ndarray], n_tokens: int, dtype: str = "float32") -> bytes:
    """Pack the given per-token arrays (each n_tokens long) into one value."""
    code, dt = DTYPES[dtype]
    mask = 0
    parts = []
    for bit, name in enumerate(ARRAYS):
        a = arrays.get(name)
        if a is None:
            continue
        if len(a) != n_tokens:
            raise ValueError(f"{name} has {len(a)} values, expected {n_tokens}")
        mask |= 1 << bit
        parts.append(np.ascontiguousarray(a, dtype=dt).tobytes())
    return _HEADER.pack(MAGIC, CODEC_VERSION, code, mask, n_tokens) + b"".join(parts)


def decode(
    value: bytes | None, n_tokens: int, need: tuple[str, ...], dtype: str | None = None
) -> dict[str, np.ndarray] | None:
    """Unpack a value into float32 arrays; None if absent, corrupt, missing a needed array, or
    (dtype given) stored in another dtype than `dtype`."""
    if value is None or len(value) < HEADER_BYTES:
        return None
    try:
        magic, version, code, mask, n = _HEADER.unpack_from(value)
    except struct.error:
        return None
    dt = _BY_CODE.get(code)
    if magic != MAGIC or version != CODEC_VERSION or dt is None or n != n_tokens:
        return None
    if dtype is not None and DTYPES[dtype][0] != code:
        return None
    names = [name for bit, name in enumerate(ARRAYS) if mask >> bit & 1]
    if mask >> len(ARRAYS) or any(name not in names for name in need):
        return None
    if len(value) != HEADER_BYTES + len(names) * n * dt.itemsize:
        return None
    flat = np.frombuffer(value, dtype=dt, offset=HEADER_BYTES)
    out = {}
    for i, name in enumerate(names):
        a = flat[i * n : (i + 1) * n]
        out[name] = a if dt.itemsize == 4 else a.astype(np.float32)
    if not all(np.isfinite(out[name]).all() for name in need):
        return None  # a NaN/inf gamma can only be corruption; recompute rather than train on it
    return out
