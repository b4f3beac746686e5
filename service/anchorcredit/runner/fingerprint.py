"""The weights digest: it changes whenever the served weights do, whatever their version
label, and is the same for the same weights on every replica (on the same kind of device),
so a cache keyed on it can never return numbers computed from other weights
(docs/SERVICE.md "What a version label guarantees").

The digest is sha256 over one record per tensor (name, dtype, shape, fingerprint of the
values) in name order. The scorer keeps the records of its live tensors: a weight change
computes the records of the tensors it sent (off the device thread) and replaces those, so
the digest after any sequence of changes depends only on the weights held, never on the
path that led there. CPU tensors are hashed byte for byte (sha256); device tensors are
fingerprinted on the device (two 64-bit position-mixing sums of their bit patterns), so
nothing is copied off it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import torch

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_CHUNK = 1 << 24  # elements per step on the device (bounded temporaries)
# Odd 64-bit mixing constants (splitmix64), as signed int64.
_M1 = 0x9E3779B97F4A7C15 - (1 << 64)
_M2 = 0xBF58476D1CE4E5B9 - (1 << 64)
_M3 = 0x94D049BB133111EB - (1 << 64)


def _device_fingerprint(flat: torch.Tensor) -> bytes:
    """Two wrapping 64-bit sums over the bit patterns mixed with their positions; integer
    addition mod 2**64 is order-free, so the answer does not depend on the reduction."""
    words = flat.view(_INT_OF_SIZE[flat.element_size()])
    acc = torch.zeros(2, dtype=torch.int64, device=flat.device)
    for start in range(0, words.numel(), _CHUNK):
        w = words[start : start + _CHUNK].to(torch.int64)
        idx = torch.arange(start, start + w.numel(), dtype=torch.int64, device=flat.device)
        x = (w + 1) * _M1 + idx * _M2
        x = (x ^ (x >> 31)) * _M3
        acc[0] += x.sum()
        acc[1] += ((x ^ (x >> 29)) * _M1).sum()
    return acc.cpu().numpy().tobytes()


def tensor_fingerprint(t: torch.Tensor) -> bytes:
    """The fingerprint of one tensor's values (its dtype and shape are hashed beside it)."""
    flat = t.detach().contiguous().reshape(-1)
    if flat.device.type == "cpu":
        return hashlib.sha256(flat.view(torch.uint8).numpy()).digest()
    return _device_fingerprint(flat)


def records(tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, bytes]:
    """{name: record} of each tensor: its dtype, shape and fingerprint."""
    out = {}
    for name, t in tensors:
        head = f"{str(t.dtype).removeprefix('torch.')}\0{tuple(t.shape)}\0".encode()
        out[name] = head + tensor_fingerprint(t)
    return out


def combine(recs: Mapping[str, bytes]) -> str:
    """Hex sha256 over the records in name order: the weights digest."""
    h = hashlib.sha256(b"anchorcredit-weights-v1\0")
    for name in sorted(recs):
        rec = recs[name]
        h.update(f"{name}\0{len(rec)}\0".encode())
        h.update(rec)
    return h.hexdigest()
