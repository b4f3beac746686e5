"""New policy weights are staged beside the live model, then committed in one step.

Every way of changing the weights (a checkpoint path or state dict, a gRPC stream of raw
bytes, a collective broadcast) writes into a `WeightStaging` buffer, never into the live
model. Each tensor is checked against the model when it is announced (known name, same
shape, a dtype that casts to the parameter's) and written into a staging tensor allocated
like the parameter (same device, same dtype), lazily, as its header arrives. `finish()`
checks that every tensor arrived (unless the update is partial; keys the model ties to
another key, e.g. lm_head.weight = embed_tokens.weight, may be absent, as save_pretrained
omits them). `commit_into()` then copies staged -> live: the Scorer runs it under its lock
on the device thread, so scoring sees the old weights or the new ones, never a mix.

Peak memory of one change: the live weights plus one staged copy of the tensors sent (tied
names share one buffer) plus one chunk (a stream's `data` bytes, or one tensor received in
another dtype or on another device than the parameter's).

A partly loaded model (loading.py: the first layers, maybe no LM head) is updated with the
whole model's tensors, as a trainer has them: the tensors it did not load (`skipped`, name ->
shape) are checked like the others and then dropped (stream bytes discarded, checkpoint
tensors never read, a broadcast received into one scratch tensor and freed), so an update
fills exactly the loaded layers.
"""

from __future__ import annotations

import os
import stat
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from anchorcredit.backend import TruncatedWeights
from anchorcredit.errors import InputError
from anchorcredit.runner import fingerprint
from anchorcredit.weight_wire import DTYPE_ITEMSIZE, WeightUpdateSpec, tensor_nbytes

WIRE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
assert set(WIRE_DTYPES) == set(DTYPE_ITEMSIZE)
FIELD = "weights"
# write() views the received bytes in place (torch.frombuffer) and only reads them: torch's
# warning about a read-only buffer does not apply.
warnings.filterwarnings("ignore", message="The given buffer is not writable", module=__name__)


class PartialWeightsError(RuntimeError):
    """A commit failed after some tensors were already replaced: the model holds mixed weights."""


def _regular(path: Path) -> Path:
    """`path` when it is a regular file. Checked on a non-blocking descriptor, so a FIFO,
    device or socket named *.safetensors is refused at once instead of blocking the load."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise InputError(f"cannot open {path}: {exc.strerror}", field=FIELD) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InputError(f"{path} is not a regular file", field=FIELD)
    finally:
        os.close(fd)
    return path


def _safetensors_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if files:
            return [_regular(f) for f in files]
    elif path.exists():
        return [_regular(path)]
    raise InputError(f"no .safetensors weights at {path}", field=FIELD)


def _model_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def owned_tensors(
    model: torch.nn.Module, local: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
) -> list[tuple[str, torch.Tensor]]:
    """Every tensor of `model` once, under the first name that owns its storage (tied names
    share one): the names a WeightStaging stages under. `local`: the tensor to look at (a
    tensor-parallel shard)."""
    seen: set[tuple[int, torch.device]] = set()
    out = []
    for name, t in _model_tensors(model):
        view = local(t)
        key = (view.data_ptr(), view.device)
        if key not in seen:
            seen.add(key)
            out.append((name, view))
    return out


def _castable(src: torch.dtype, dst: torch.dtype) -> bool:
    return src == dst or (src.is_floating_point and dst.is_floating_point)


@dataclass
class _Pending:
    """The tensor a stream is writing: its staging buffer (flat) and how far it got."""

    name: str
    flat: torch.Tensor | None  # None: a tensor the model did not load (bytes are dropped)
    numel: int
    wire: torch.dtype
    itemsize: int
    offset: int = 0  # elements written
    carry: bytes = b""  # bytes of an element split across two chunks

    @property
    def done(self) -> bool:
        return self.offset == self.numel and not self.carry

    def received_bytes(self) -> int:
        return self.offset * self.itemsize + len(self.carry)


class WeightStaging:
    """One weight change being assembled beside `model` (not visible to scoring)."""

    def __init__(
        self,
        model: torch.nn.Module,
        update: WeightUpdateSpec,
        skipped: Mapping[str, Sequence[int]] | None = None,
    ) -> None:
        self.update = update
        self._targets = dict(_model_tensors(model))
        # The whole model's tensors that `model` does not hold: accepted and dropped.
        self._skipped = {k: tuple(v) for k, v in (skipped or {}).items() if k not in self._targets}
        self._persistent = set(model.state_dict().keys())
        # Tied names (lm_head.weight = embed_tokens.weight) share one live storage and so
        # one staging buffer: keyed by the first name that owns the storage.
        owner: dict[tuple[int, torch.device], str] = {}
        self._owner: dict[str, str] = {}
        for name, t in self._targets.items():
            self._owner[name] = owner.setdefault((t.data_ptr(), t.device), name)
        self._staged: dict[str, torch.Tensor] = {}
        self._received: set[str] = set()
        self._current: _Pending | None = None
        self._last = ""  # the last tensor completed
        self.tensors = 0  # received, the dropped ones included
        self.bytes = 0
        self.skipped_tensors = 0  # of them, tensors of layers (or the head) not loaded
        self.finished = False
        self._records: dict[str, bytes] | None = None

    # -- checks -------------------------------------------------------------------------
    def check(self, name: str, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor | None:
        """The live tensor `name` if a tensor of this dtype and shape may replace it, None for
        a tensor of a layer (or head) the model did not load; InputError naming the tensor
        otherwise."""
        if not name:
            raise InputError("a tensor header needs a name", field=FIELD)
        target = self._targets.get(name)
        if target is None and name not in self._skipped:
            raise InputError(
                f"tensor {name!r}: the model does not have a tensor of that name", FIELD
            )
        if name in self._received or (self._current and self._current.name == name):
            raise InputError(f"tensor {name!r} was sent twice in one update", FIELD)
        want = tuple(target.shape) if target is not None else self._skipped[name]
        if tuple(int(d) for d in shape) != want:
            raise InputError(
                f"tensor {name!r}: shape {tuple(int(d) for d in shape)} != the model's {want}",
                FIELD,
            )
        if target is None:
            if not dtype.is_floating_point:
                raise InputError(f"tensor {name!r}: dtype {dtype} is not floating point", FIELD)
            return None
        if not _castable(dtype, target.dtype):
            raise InputError(
                f"tensor {name!r}: dtype {str(dtype).removeprefix('torch.')} cannot be cast to "
                f"the model's {str(target.dtype).removeprefix('torch.')}",
                FIELD,
            )
        return target

    def check_wire(self, name: str, dtype: str, shape: Sequence[int]) -> torch.Tensor | None:
        """check() for a header on the wire (dtype by name: float32 | bfloat16 | float16)."""
        tensor_nbytes(dtype, tuple(int(d) for d in shape), name)  # InputError on other dtypes
        return self.check(name, WIRE_DTYPES[dtype], shape)

    def _buffer(self, name: str) -> torch.Tensor:
        """The staging tensor of `name`, allocated like the live one on first use."""
        key = self._owner[name]
        buf = self._staged.get(key)
        if buf is None:
            buf = self._staged[key] = torch.empty_like(self._targets[key])
        return buf

    def _done(self, name: str, nbytes: int, kept: bool = True) -> None:
        self._last = name
        self._received.add(name)
        self.tensors += 1
        self.bytes += nbytes
        self.skipped_tensors += not kept

    def _require_open(self) -> None:
        if self.finished:
            raise RuntimeError("this weight update is finished; start another")

    # -- a stream of raw bytes -------------------------------------------------------------
    def begin(self, name: str, dtype: str, shape: Sequence[int]) -> None:
        """A tensor header: check it, allocate its buffer; its bytes follow in write()."""
        self._require_open()
        cur = self._current
        if cur is not None:
            raise InputError(
                f"tensor {cur.name!r}: {cur.received_bytes()} of "
                f"{cur.numel * cur.itemsize} bytes received when the header of "
                f"{name!r} arrived",
                FIELD,
            )
        kept = self.check_wire(name, dtype, shape) is not None
        flat = self._buffer(name).view(-1) if kept else None
        numel = flat.numel() if flat is not None else _numel(shape)
        self._current = _Pending(name, flat, numel, WIRE_DTYPES[dtype], DTYPE_ITEMSIZE[dtype])
        if numel == 0:
            self._current = None
            self._done(name, 0, kept)

    def write(self, data: bytes | memoryview) -> None:
        """The next bytes of the current tensor (little-endian values, any chunking)."""
        self._require_open()
        cur = self._current
        if cur is None:
            after = f"after tensor {self._last!r} was complete" if self._last else "before"
            raise InputError(
                f"{len(data)} tensor bytes arrived {after} without a tensor header", FIELD
            )
        raw = cur.carry + bytes(data) if cur.carry else data
        n = len(raw) // cur.itemsize
        rest = len(raw) - n * cur.itemsize
        total = cur.numel
        if cur.offset + n > total or (rest and cur.offset + n == total):
            raise InputError(
                f"tensor {cur.name!r}: more than its {total * cur.itemsize} bytes were sent",
                FIELD,
            )
        if n and cur.flat is None:  # a tensor the model did not load: count, drop
            cur.offset += n
        elif n:
            # A view of the received bytes (read only, never written), then one cast (and
            # device transfer) into the staging tensor: no copy of the chunk in between.
            src = torch.frombuffer(raw, dtype=cur.wire, count=n)
            cur.flat[cur.offset : cur.offset + n].copy_(src)
            cur.offset += n
        cur.carry = bytes(memoryview(raw)[n * cur.itemsize :]) if rest else b""
        if cur.done:
            self._current = None
            self._done(cur.name, total * cur.itemsize, cur.flat is not None)

    # -- tensors in memory: a checkpoint or a state dict -------------------------------------
    def put(self, name: str, tensor: torch.Tensor) -> None:
        """Stage one whole tensor (any castable dtype, any device)."""
        self._require_open()
        kept = self.check(name, tensor.dtype, tuple(tensor.shape)) is not None
        if kept:
            self._buffer(name).copy_(tensor)
        self._done(name, tensor.numel() * tensor.element_size(), kept)

    def load(self, source: str | Path | Mapping[str, torch.Tensor]) -> None:
        """Stage everything in a checkpoint (directory of *.safetensors, one file) or a
        state dict. Every name and shape is checked before the first tensor is read."""
        self._require_open()
        with ExitStack() as stack:
            if isinstance(source, Mapping):
                shapes = {k: (v.dtype, tuple(v.shape)) for k, v in source.items()}

                def read(name: str) -> torch.Tensor:
                    return source[name]

            else:
                from safetensors import safe_open

                handles: dict[str, Any] = {}
                shapes = {}
                for f in _safetensors_files(Path(source)):
                    h = stack.enter_context(safe_open(str(f), framework="pt", device="cpu"))
                    for name in h.keys():
                        sl = h.get_slice(name)
                        handles[name] = h
                        shapes[name] = (_safetensors_dtype(name, sl.get_dtype()), sl.get_shape())

                def read(name: str) -> torch.Tensor:
                    return handles[name].get_tensor(name)

            kept = [n for n, (dt, shape) in shapes.items() if self.check(n, dt, shape) is not None]
            for name in kept:
                self.put(name, read(name))
            for name in shapes.keys() - set(kept):  # layers not loaded: never read
                dtype, shape = shapes[name]
                self._done(name, _numel(shape) * dtype.itemsize, kept=False)

    # -- a collective broadcast ------------------------------------------------------------
    def receive(self, group: Any, headers: Sequence[tuple[str, str, Sequence[int]]]) -> None:
        """Receive the listed tensors from rank 0 of `group` (a weight_group.WeightGroup),
        in order. Every header is checked before the first broadcast, so a bad list fails
        with nothing received (the trainer must then not broadcast). A broadcast that fails
        raises TruncatedWeights naming the tensor (the group should be closed)."""
        self._require_open()
        names = [h[0] for h in headers]
        dup = next((n for i, n in enumerate(names) if n in names[:i]), None)
        if dup is not None:
            raise InputError(f"tensor {dup!r} is listed twice", FIELD)
        kept = {n for n, dt, shape in headers if self.check_wire(n, dt, shape) is not None}
        for name, dtype, shape in headers:
            wire = WIRE_DTYPES[dtype]
            if name not in kept:  # every rank takes part in each broadcast: receive, drop
                scratch = torch.empty(tuple(shape), dtype=wire, device=group.device)
                self._broadcast(group, scratch, name, len(headers))
                del scratch
                self._done(name, _numel(shape) * wire.itemsize, kept=False)
                continue
            staged = self._buffer(name)
            direct = staged.dtype == wire and staged.device == group.device
            buf = staged if direct else torch.empty(tuple(shape), dtype=wire, device=group.device)
            self._broadcast(group, buf, name, len(headers))
            if not direct:
                staged.copy_(buf)
                del buf
            self._done(name, staged.numel() * wire.itemsize)

    def _broadcast(self, group: Any, buf: torch.Tensor, name: str, total: int) -> None:
        try:
            group.broadcast(buf)
        except Exception as err:
            raise TruncatedWeights(
                f"tensor {name!r}: the broadcast failed after {self.tensors} of "
                f"{total} tensors ({' '.join(str(err).split())[:300]})"
            ) from err

    # -- completion ------------------------------------------------------------------------
    def finish(self) -> None:
        """No tensor cut short; every model tensor present unless the update is partial."""
        cur = self._current
        if cur is not None:
            raise TruncatedWeights(
                f"tensor {cur.name!r}: the stream ended after {cur.received_bytes()} of its "
                f"{cur.numel * cur.itemsize} bytes"
            )
        if not self.update.partial:
            covered = {self._owner[n] for n in self._received if n in self._owner}
            missing = sorted(
                n for n in self._persistent if n in self._targets and self._owner[n] not in covered
            )
            if missing:
                raise InputError(
                    f"{len(missing)} model tensors missing from the new weights, e.g. "
                    f"{missing[:3]} (send every tensor, or mark the update partial)",
                    FIELD,
                )
        self.finished = True

    def commit_into(self) -> int:
        """Copy staged -> live (the caller holds the model's lock); returns tensors copied.
        The staging buffers are freed afterwards."""
        if not self.finished:
            self.finish()
        copied = 0
        with torch.no_grad():
            for key, staged in self._staged.items():
                try:
                    self._targets[key].copy_(staged)
                except Exception as err:  # a device error half way through
                    if copied == 0:
                        raise
                    raise PartialWeightsError(
                        f"committing {key!r} failed after {copied} of {len(self._staged)} "
                        f"tensors were replaced: {err}"
                    ) from err
                copied += 1
        self.discard()
        return copied

    def records(self) -> dict[str, bytes]:
        """Fingerprint records of the staged tensors (anchorcredit.runner.fingerprint), by
        the name that owns each live storage; computed once, off the device thread."""
        if self._records is None:
            self._records = fingerprint.records(self._staged.items())
        return self._records

    def discard(self) -> None:
        """Free the staging buffers (the live model is untouched)."""
        self._staged.clear()
        self._current = None


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _safetensors_dtype(tensor: str, name: str) -> torch.dtype:
    """safetensors' dtype names ("F32", "BF16", "I64", ...) -> torch dtypes."""
    table = {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
    }
    dtype = table.get(str(name).upper())
    if dtype is None:
        raise InputError(f"tensor {tensor!r}: safetensors dtype {name} is not supported", FIELD)
    return dtype


if sys.byteorder != "little":  # pragma: no cover - every supported host is little-endian
    raise ImportError("weight staging decodes little-endian bytes; this host is big-endian")
