"""Weights on the wire (torch-free at import): checking, casting and chunking named tensors.

    items = prepare_weights(model.state_dict(), dtype="bfloat16")   # checked, nothing copied
    for msg in weight_chunks(items, pb.WeightUpdate(version="7")): ...

A tensor travels as its C-contiguous little-endian values (anchorcredit.weight_wire):
"float32", "bfloat16" (the bytes of a uint16 view) or "float16". `prepare_weights` takes a
Mapping[str, tensor] or an iterable of (name, tensor) pairs (torch tensors on any device, or
numpy arrays), materialises it once as references (no copies), and refuses, before any RPC,
what the wire cannot carry (naming the tensor). Casting, the move to the CPU and the byte
view happen one tensor at a time while sending, so a push never holds a second copy of the
model. torch is imported only when a torch tensor is given.

`full_state_items(model)` / `full_state(model)` (gather.py) give a trained model's full
tensors under the names the served checkpoint uses (FSDP, ZeRO-3, PEFT/LoRA, wrappers).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from anchorcredit.client.gather import full_state, full_state_items
from anchorcredit.v1 import credit_pb2 as pb
from anchorcredit.weight_wire import CHUNK_BYTES, DTYPE_ITEMSIZE

__all__ = [
    "CHUNK_BYTES",
    "WIRE_DTYPES",
    "WeightItem",
    "auto_wire_dtypes",
    "decode_chunks",
    "full_state",
    "full_state_items",
    "prepare_weights",
    "tensor_bytes",
    "weight_chunk_bytes",
    "weight_chunks",
]

WIRE_DTYPES = tuple(DTYPE_ITEMSIZE)  # ("float32", "bfloat16", "float16")
_NUMPY_WIRE = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}
_LITTLE = sys.byteorder == "little"


@dataclass(frozen=True)
class WeightItem:
    """One named tensor to send: the caller's object (a reference), its dtype on the wire
    (after the cast) and shape."""

    name: str
    value: Any
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * DTYPE_ITEMSIZE[self.dtype]

    def header(self) -> pb.TensorHeader:
        return pb.TensorHeader(name=self.name, dtype=self.dtype, shape=self.shape)


def _is_torch(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _source_dtype(name: str, value: Any) -> str:
    """The value's dtype name ("float32", "float64", "int64", "bfloat16", ...)."""
    if _is_torch(value):
        return str(value.dtype).removeprefix("torch.")
    if isinstance(value, np.ndarray):
        if value.dtype.name == "bfloat16":  # ml_dtypes' bfloat16
            return "bfloat16"
        return value.dtype.name
    raise TypeError(
        f"tensor {name!r}: expected a torch.Tensor or numpy.ndarray, got {type(value).__name__}"
    )


def _wire_dtype(name: str, src: str, dtype: str | None) -> str:
    floating = src in ("float64", "float32", "bfloat16", "float16")
    if not floating:
        raise ValueError(
            f"tensor {name!r}: dtype {src} cannot travel; the wire carries "
            f"{', '.join(WIRE_DTYPES)} (integer and boolean buffers are not weights: "
            "leave them out)"
        )
    if dtype is None:
        if src not in DTYPE_ITEMSIZE:
            raise ValueError(
                f"tensor {name!r}: dtype {src} cannot travel; pass dtype= one of "
                f"{', '.join(WIRE_DTYPES)} (or 'auto') to cast it"
            )
        return src
    return dtype


def prepare_weights(
    weights: Mapping[str, Any] | Iterable[tuple[str, Any]], dtype: str | None = None
) -> list[WeightItem]:
    """Check and materialise `weights` once (references, not copies).

    dtype: None sends each tensor as it is (it must be float32, bfloat16 or float16); a wire
    dtype name casts every tensor to it while sending. ValueError/TypeError name the tensor.
    """
    if dtype is not None and dtype not in DTYPE_ITEMSIZE:
        raise ValueError(f"dtype must be one of {', '.join(WIRE_DTYPES)} or None, got {dtype!r}")
    pairs = weights.items() if isinstance(weights, Mapping) else weights
    if isinstance(pairs, (str, bytes)) or _is_torch(pairs) or isinstance(pairs, np.ndarray):
        raise TypeError("weights must be a mapping name -> tensor or (name, tensor) pairs")
    items: list[WeightItem] = []
    seen: set[str] = set()
    for pair in pairs:
        try:
            name, value = pair
        except (TypeError, ValueError):
            raise TypeError(
                f"weights must yield (name, tensor) pairs, got {type(pair).__name__}"
            ) from None
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor names must be non-empty strings, got {name!r}")
        if name in seen:
            raise ValueError(f"tensor {name!r} is given twice")
        seen.add(name)
        src = _source_dtype(name, value)
        wire = _wire_dtype(name, src, dtype)
        items.append(WeightItem(name, value, wire, tuple(int(d) for d in value.shape)))
    if not items:
        raise ValueError("no tensors to send")
    return items


def auto_wire_dtypes(items: list[WeightItem], served: str) -> list[WeightItem]:
    """Each item's wire dtype for a server computing in `served` ("send what it serves"):

    - a 16-bit server (bfloat16, float16) gets its own dtype: the server would round to it
      anyway, and rounding here (round to nearest even, as the server's cast) halves the
      bytes of a float32 trainer;
    - a float32 server gets float32, except a tensor already in bfloat16 or float16, which
      travels as it is (the server widens it exactly: half the bytes, the same values).
    ValueError when the server reports a dtype the wire does not carry."""
    if served not in DTYPE_ITEMSIZE:
        raise ValueError(f"the service reports dtype {served!r}, not one of {WIRE_DTYPES}")
    out = []
    for item in items:
        src = _source_dtype(item.name, item.value)
        wire = src if served == "float32" and src in ("bfloat16", "float16") else served
        out.append(item if wire == item.dtype else replace(item, dtype=wire))
    return out


def _f32_to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16 bits (uint16), NaN kept a quiet NaN."""
    u = np.ascontiguousarray(a, dtype="<f4").view(np.uint32)
    rounded = ((u + (((u >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)
    nan = np.isnan(a)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


def _torch_bytes(t: Any, dtype: str) -> np.ndarray:
    import torch

    target = getattr(torch, dtype)
    t = t.detach()
    if t.dtype != target:
        t = t.to(target)
    t = t.to("cpu").contiguous()
    if dtype == "bfloat16":
        t = t.view(torch.int16)
    return t.numpy()


def _numpy_bytes(a: np.ndarray, dtype: str) -> np.ndarray:
    if a.dtype.name == "bfloat16":  # ml_dtypes: already the right bits
        if dtype == "bfloat16":
            return np.ascontiguousarray(a).view(np.uint16)
        a = a.astype(np.float32)
    if dtype == "bfloat16":
        return _f32_to_bf16_bits(a.astype(np.float32, copy=False))
    want = np.dtype(dtype).newbyteorder("<")
    return np.ascontiguousarray(a, dtype=want)


def tensor_bytes(item: WeightItem) -> memoryview:
    """The item's wire bytes as a flat memoryview (cast, on the CPU, C-contiguous, little
    endian); a view of the caller's memory when nothing had to change."""
    if _is_torch(item.value):
        arr = _torch_bytes(item.value, item.dtype)
    else:
        arr = _numpy_bytes(item.value, item.dtype)
    if not _LITTLE and arr.dtype.byteorder in ("=", ">"):  # pragma: no cover - big endian
        arr = arr.byteswap()
    return memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))


def weight_chunks(
    items: Iterable[WeightItem], update: pb.WeightUpdate, chunk_bytes: int = CHUNK_BYTES
) -> Iterator[pb.WeightChunk]:
    """The PushWeights stream: `update` first, then per tensor its header and its bytes in
    `data` pieces of at most chunk_bytes. Each tensor is cast / copied to the CPU only when
    its turn comes (one tensor's bytes alive at a time)."""
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be positive")
    yield pb.WeightChunk(update=update)
    for item in items:
        data = tensor_bytes(item)
        if len(data) != item.nbytes:
            raise AssertionError(f"{item.name}: {len(data)} bytes, expected {item.nbytes}")
        # The header rides with the tensor's first bytes: one message per small tensor.
        first = data[:chunk_bytes].tobytes()
        yield pb.WeightChunk(tensor=item.header(), data=first)
        for start in range(len(first), len(data), chunk_bytes):
            yield pb.WeightChunk(data=data[start : start + chunk_bytes].tobytes())


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


_DATA_TAG = b"\x1a"  # WeightChunk.data: field 3, length-delimited


def weight_chunk_bytes(
    items: Iterable[WeightItem], update: pb.WeightUpdate, chunk_bytes: int = CHUNK_BYTES
) -> Iterator[bytes]:
    """weight_chunks, serialized: the same messages as bytes, built with one copy of the
    tensor bytes (a message's fields are its serialized fields concatenated) instead of a
    copy to bytes, one into the message and one to serialize it."""
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be positive")
    yield pb.WeightChunk(update=update).SerializeToString()
    for item in items:
        data = tensor_bytes(item)
        if len(data) != item.nbytes:
            raise AssertionError(f"{item.name}: {len(data)} bytes, expected {item.nbytes}")
        header = pb.WeightChunk(tensor=item.header()).SerializeToString()
        first = data[:chunk_bytes]
        yield b"".join((header, _DATA_TAG, _varint(len(first)), first) if first else (header,))
        for start in range(len(first), len(data), chunk_bytes):
            piece = data[start : start + chunk_bytes]
            yield b"".join((_DATA_TAG, _varint(len(piece)), piece))


def decode_chunks(
    chunks: Iterable[pb.WeightChunk],
) -> tuple[pb.WeightUpdate, dict[str, tuple[str, tuple[int, ...], bytes]]]:
    """The inverse of weight_chunks (tests and fake servers): (update, {name: (dtype, shape,
    bytes)}). ValueError on a malformed stream."""
    it = iter(chunks)
    first = next(it, None)
    if first is None or not first.HasField("update"):
        raise ValueError("the first message must carry the update")
    out: dict[str, tuple[str, tuple[int, ...], bytes]] = {}
    current: pb.TensorHeader | None = None
    parts: list[bytes] = []

    def finish() -> None:
        if current is None:
            return
        data = b"".join(parts)
        want = int(np.prod(current.shape, dtype=np.int64)) * DTYPE_ITEMSIZE[current.dtype]
        if len(data) != want:
            raise ValueError(f"tensor {current.name!r}: {len(data)} bytes, expected {want}")
        out[current.name] = (current.dtype, tuple(current.shape), data)

    for msg in it:
        if msg.HasField("update"):
            raise ValueError("update may only come first")
        if msg.HasField("tensor"):
            finish()
            current, parts = msg.tensor, []
        if msg.data:
            if current is None:
                raise ValueError("data before any tensor header")
            parts.append(msg.data)
    finish()
    return first.update, out


def to_numpy(dtype: str, shape: tuple[int, ...], data: bytes) -> np.ndarray:
    """Wire bytes -> a float32 numpy array (bfloat16 widened exactly)."""
    if dtype == "bfloat16":
        bits = np.frombuffer(data, "<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    return np.frombuffer(data, np.dtype(dtype).newbyteorder("<")).astype(np.float32).reshape(shape)
