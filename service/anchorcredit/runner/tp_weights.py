"""Weight changes under tensor parallelism: rank 0 stages whole tensors, every rank keeps
its shard.

    rank 0                                     ranks 1..N-1
    stage (path, stream) into whole tensors    (scoring as usual)
      in host memory, checked as ever
    commit, under the scoring lock:
      send WeightCommand(names, shapes)  ---->  received (between two batches)
      per tensor: broadcast whole  --------->   received whole
        keep this rank's shard                    keep this rank's shard
      gather ok / error  <--------------------  ok / error
      all ok: copy shards into the model        copy shards into the model
      gather ok / error  <--------------------  ok / error
      new policy version

A rank that cannot stage its shard (out of memory) still takes part in every broadcast,
so the ranks stay in step; the first gather then fails the update everywhere and no rank
touches its model (the old version keeps scoring). A failure while copying in leaves
mixed weights: rank 0 refuses to score until a reload succeeds (as one process does).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from anchorcredit.runner.weights import PartialWeightsError, WeightStaging, _model_tensors


class TensorParallelWeightsFailed(RuntimeError):
    """A rank could not stage its shard of a weight change; no rank changed its weights."""


@dataclass(frozen=True)
class WeightCommand:
    """What rank 0 tells the other ranks before it broadcasts a weight change: the tensors
    (owner names, whole shapes) in broadcast order."""

    headers: list[tuple[str, tuple[int, ...]]]
    version: str


def local_tensor(param: torch.Tensor) -> torch.Tensor:
    """This rank's storage of `param`: a DTensor's local shard, or the tensor itself."""
    local = getattr(param, "_local_tensor", None)
    return local if local is not None else param


def local_shard(param: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """This rank's part of `whole` (the new value of `param`), as a tensor of its own."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        # src_data_rank=None: every rank holds `whole` and slices it, no communication.
        part = distribute_tensor(
            whole, param.device_mesh, param.placements, src_data_rank=None
        ).to_local()
        part = part.clone(memory_format=torch.contiguous_format)
    else:
        part = whole
    want = tuple(local_tensor(param).shape)
    if tuple(part.shape) != want:
        raise ValueError(f"shard shape {tuple(part.shape)} != this rank's {want}")
    return part


class WholeTensorStaging(WeightStaging):
    """Rank 0's staging: checked against the whole model as a single process checks it,
    but staged into whole tensors in host memory (the live parameters are shards). Every
    way in is WeightStaging's: begin/write (a stream), put/load (a path), receive (a
    collective weight group: gloo receives straight into the host buffer, nccl on the
    device and is copied to it tensor by tensor)."""

    def __init__(self, model: torch.nn.Module, update: Any, skipped: Any = None) -> None:
        super().__init__(model, update, skipped)
        # A DTensor's data_ptr() is 0: find tied names by their local storage instead.
        owner: dict[tuple[int, torch.device], str] = {}
        self._owner = {}
        for name, t in self._targets.items():
            local = local_tensor(t)
            self._owner[name] = owner.setdefault((local.data_ptr(), local.device), name)

    def _buffer(self, name: str) -> torch.Tensor:
        key = self._owner[name]
        buf = self._staged.get(key)
        if buf is None:
            target = self._targets[key]
            buf = self._staged[key] = torch.empty(tuple(target.shape), dtype=target.dtype)
        return buf

    def headers(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, whole shape) of each staged tensor (tied names once), in broadcast order."""
        return [(name, tuple(t.shape)) for name, t in self._staged.items()]

    @property
    def whole_tensors(self) -> Mapping[str, torch.Tensor]:
        return self._staged

    def commit_into(self) -> int:  # pragma: no cover - the TP scorer commits collectively
        raise RuntimeError("a tensor-parallel update is committed by exchange(), on every rank")


def _agree(error: str | None, control: Any) -> str | None:
    """Every rank: gather each rank's error (None: ok); the first one, or None."""
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error, group=control)
    return next((e for e in errors if e is not None), None)


def exchange(
    model: torch.nn.Module,
    device: torch.device,
    control: Any,
    headers: Sequence[tuple[str, tuple[int, ...]]],
    staged: Mapping[str, torch.Tensor] | None,
) -> int:
    """Every rank, under its scoring lock: receive each whole tensor from rank 0 (which
    passes `staged`), keep this rank's shard, then, once every rank has all of them, copy
    them into the model. Returns tensors copied. TensorParallelWeightsFailed when a rank
    could not stage (nothing changed), PartialWeightsError when a copy failed (mixed)."""
    live = dict(_model_tensors(model))
    rank = dist.get_rank()
    shards: dict[str, torch.Tensor] = {}
    error: str | None = None
    for name, shape in headers:
        target = live[name]
        if staged is not None:
            whole = staged[name].to(device)
        else:
            whole = torch.empty(shape, dtype=target.dtype, device=device)
        dist.broadcast(whole, src=0)  # a dead rank raises here: the caller breaks the group
        if error is None:
            try:
                shards[name] = local_shard(target, whole)
            except Exception as exc:  # keep receiving: the other ranks are broadcasting
                error = f"rank {rank}, tensor {name!r}: {' '.join(str(exc).split())[:300]}"
                shards.clear()
        del whole
    failed = _agree(error, control)
    if failed is not None:
        raise TensorParallelWeightsFailed(f"the weight change was not applied: {failed}")
    copied = 0
    try:
        with torch.no_grad():
            for name, shard in shards.items():
                local_tensor(live[name]).copy_(shard)
                copied += 1
    except Exception as exc:
        error = f"rank {rank}: copying {name!r} failed after {copied} tensors: {exc}"
    shards.clear()
    failed = _agree(error, control)
    if failed is not None:
        raise PartialWeightsError(f"a tensor-parallel weight commit failed half way: {failed}")
    return copied
