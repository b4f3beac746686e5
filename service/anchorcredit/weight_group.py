"""A private collective group for weight broadcasts: trainer rank 0 -> every server.

The way RL systems feed their rollout engines (TRL's vLLM server mode, OpenRLHF, verl): the
trainer's rank 0 hosts a TCPStore, each server joins as rank 1..N, and rank 0 broadcasts
each named tensor. The group is a bare ProcessGroupNCCL / ProcessGroupGloo on that store:
never the default process group, so a trainer's own torch.distributed setup is untouched.

    trainer (rank 0)                               server (rank i)
    store = host_store(address, port, world)       (JoinWeightGroup RPC)
    group = open_group(store, 0, world, ...)  <->  group = open_group(connect_store(...), i, ...)
    for t in tensors: group.broadcast(t)      <->  buf = empty(shape, dtype); group.broadcast(buf)

Both sides must agree on the tensors' order, dtypes and shapes (ReceiveWeights lists them).
Needs torch; the light client imports this only when a collective push is asked for.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 600.0


def resolve_backend(backend: str, device: torch.device) -> str:
    """ "" picks nccl on CUDA and gloo elsewhere; an explicit name must fit the device."""
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
    if backend == "nccl" and device.type != "cuda":
        raise ValueError("the nccl backend needs a CUDA device; use gloo on the CPU")
    return backend


def _timeout(timeout_s: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=timeout_s if timeout_s > 0 else DEFAULT_TIMEOUT_S)


def host_store(address: str, port: int, world_size: int, timeout_s: float = 0) -> dist.Store:
    """The trainer's side: host the rendezvous store (returns at once; ranks join later).
    port 0 picks a free one (read it back with store.port)."""
    return dist.TCPStore(
        address, port, world_size, is_master=True, timeout=_timeout(timeout_s),
        wait_for_workers=False,
    )  # fmt: skip


def connect_store(address: str, port: int, world_size: int, timeout_s: float = 0) -> dist.Store:
    """A server's side: connect to the trainer's store."""
    return dist.TCPStore(address, port, world_size, is_master=False, timeout=_timeout(timeout_s))


@dataclass
class WeightGroup:
    """One rank's handle on the group: broadcast from rank 0 into every other rank."""

    pg: dist.ProcessGroup
    rank: int
    world_size: int
    backend: str
    device: torch.device
    timeout: datetime.timedelta

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0 sends `tensor`; the others receive into it (same shape and dtype)."""
        self.pg.broadcast(tensor, 0).wait(self.timeout)
        return tensor

    def close(self) -> None:
        shutdown = getattr(self.pg, "shutdown", None)
        if callable(shutdown):
            shutdown()


def open_group(
    store: dist.Store,
    rank: int,
    world_size: int,
    backend: str = "",
    device: torch.device | str = "cpu",
    timeout_s: float = 0,
) -> WeightGroup:
    """Join the group on `store` (blocks until every rank has joined)."""
    device = torch.device(device)
    backend = resolve_backend(backend, device)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    timeout = _timeout(timeout_s)
    if backend == "gloo":
        pg = dist.ProcessGroupGloo(store, rank, world_size, timeout)
    else:
        if device.index is not None:
            torch.cuda.set_device(device)
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        pg = dist.ProcessGroupNCCL(store, rank, world_size, opts)
    return WeightGroup(pg, rank, world_size, backend, device, timeout)
