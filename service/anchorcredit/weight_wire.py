"""How weights travel (torch-free): dtype names, chunk sizes, and version rules every
weight change shares (UpdateWeights, PushWeights, ReceiveWeights; proto WeightUpdate).

A tensor is its C-contiguous little-endian values, numel * itemsize bytes, named as the
model's state_dict key. bfloat16 has no numpy dtype: its bytes are those of a uint16 view.
"""

from __future__ import annotations

from dataclasses import dataclass

from anchorcredit.errors import InputError, WeightVersionConflict

# dtype name on the wire -> bytes per element
DTYPE_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
# Largest `data` payload of one WeightChunk: far below gRPC's default 4 MiB receive limit
# once framing is added, big enough that per-message overhead is noise.
CHUNK_BYTES = 2 * 1024 * 1024


@dataclass(frozen=True)
class WeightUpdateSpec:
    """What a weight change names: the new version, the one it replaces, partial or whole."""

    version: str
    replaces: str = ""
    partial: bool = False

    def check(self, served: str) -> None:
        """Refuse an empty label (InputError), a `replaces` that is not served, or a reuse
        of the served label (WeightVersionConflict: a version names one set of weights, and
        results cached under it rely on that)."""
        if not self.version:
            raise InputError("the new policy version must be non-empty", field="version")
        if self.replaces and self.replaces != served:
            raise WeightVersionConflict(
                f"this update replaces version {self.replaces!r} but {served!r} is served"
            )
        if self.version == served:
            raise WeightVersionConflict(
                f"version {served!r} is already served; name new weights with a new version"
            )


def tensor_nbytes(dtype: str, shape: tuple[int, ...], name: str = "") -> int:
    """Bytes of one tensor on the wire; InputError for a dtype the wire does not carry."""
    size = DTYPE_ITEMSIZE.get(dtype)
    if size is None:
        raise InputError(
            f"tensor {name!r}: dtype {dtype!r} is not one of {', '.join(DTYPE_ITEMSIZE)}",
            field="tensor.dtype",
        )
    n = 1
    for d in shape:
        n *= int(d)
    return n * size
