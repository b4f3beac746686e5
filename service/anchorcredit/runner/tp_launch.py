"""Tensor parallelism: the process group, how its ranks start, and rank 0's commands.

Two ways to get N ranks:
  * spawned: `start(N, ...)` in a plain process makes it rank 0 and starts ranks 1..N-1
    itself (torch.multiprocessing, "spawn"), each running `worker(rank, *args)`;
  * torchrun: every process was started by torchrun (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_*
    in the environment) and `start` only joins the group.
The default group runs the sharded forward's collectives (gloo on the CPU, nccl on CUDA).
Commands (what to score next, or stop) go from rank 0 to the others over a second, gloo
group with a long timeout: an idle server's workers may wait for hours between batches,
past the default group's timeout.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

log = logging.getLogger(__name__)

# How long a worker waits for rank 0's next command before giving up.
IDLE_TIMEOUT = datetime.timedelta(days=365)
# How long rank 0 waits for spawned workers to exit after "stop".
JOIN_TIMEOUT_S = 30.0


def under_torchrun() -> bool:
    """True when this process was started by torchrun (or any launcher setting its env)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def collective_backend(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


@dataclass
class TPGroup:
    """This process's place in the tensor-parallel group."""

    rank: int
    world_size: int
    local_rank: int
    control: dist.ProcessGroup
    workers: list[Any] = field(default_factory=list)  # processes rank 0 spawned

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def device(self, device_type: str) -> torch.device:
        """This rank's device: cuda:LOCAL_RANK on CUDA (one GPU per rank), else the CPU."""
        if device_type == "cuda":
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return torch.device(device_type)

    def send(self, command: Any) -> None:
        """Rank 0: hand `command` (any picklable object) to every other rank."""
        assert self.is_leader
        dist.broadcast_object_list([command], src=0, group=self.control)

    def receive(self) -> Any:
        """Ranks > 0: block until rank 0 sends the next command."""
        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def close(self) -> None:
        """Rank 0: wait for the spawned workers (after they were told to stop), then leave
        the group. Other ranks: leave the group."""
        for proc in self.workers:
            proc.join(JOIN_TIMEOUT_S)
            if proc.is_alive():
                log.warning("tensor-parallel worker pid %d did not stop; terminating", proc.pid)
                proc.terminate()
                proc.join(5)
        self.workers = []
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _join(
    rank: int, world_size: int, local_rank: int, device_type: str, init_method: str = "env://"
) -> TPGroup:
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(
        collective_backend(device_type), init_method, rank=rank, world_size=world_size
    )
    control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    return TPGroup(rank, world_size, local_rank, control)


def _spawned_entry(
    rank: int,
    world_size: int,
    init_method: str,
    device_type: str,
    log_level: int,
    worker: Callable,
    args: tuple,
) -> None:
    # A spawned interpreter starts with no logging set up: log like rank 0, rank named.
    logging.basicConfig(
        level=log_level, format=f"%(asctime)s %(levelname)s %(name)s [rank {rank}]: %(message)s"
    )
    os.environ["LOCAL_RANK"] = str(rank)  # transformers binds its device from it
    # Ctrl-C reaches the whole process group: rank 0 alone decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    group = _join(rank, world_size, rank, device_type, init_method)
    try:
        worker(group, *args)
    finally:
        group.close()


def start(
    world_size: int, device_type: str, worker: Callable[..., None], args: tuple = ()
) -> TPGroup:
    """Join (torchrun) or create (spawn) a group of `world_size` ranks.

    Spawned: this process becomes rank 0 and returns; ranks 1.. run worker(group, *args)
    and leave the group when it returns. Under torchrun every process returns its own
    TPGroup; the caller runs the worker on ranks > 0 itself.
    """
    if world_size < 2:
        raise ValueError(f"tensor parallelism needs at least 2 ranks, got {world_size}")
    if dist.is_initialized():
        raise RuntimeError(
            "this process already belongs to a process group: one tensor-parallel group per "
            "process (close() the scorer of the other one first)"
        )
    if under_torchrun():
        launched = int(os.environ["WORLD_SIZE"])
        if launched != world_size:
            raise ValueError(
                f"torchrun started {launched} processes but --tensor-parallel is {world_size}; "
                "give the same number to both"
            )
        rank = int(os.environ["RANK"])
        return _join(rank, world_size, int(os.environ.get("LOCAL_RANK", rank)), device_type)
    # A TCP rendezvous on loopback, not env:// variables: this process's environment
    # stays as it was (a later start() must not mistake it for a torchrun launch).
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    ctx = mp.get_context("spawn")
    log_level = logging.getLogger().getEffectiveLevel()
    workers = []
    for rank in range(1, world_size):
        proc = ctx.Process(
            target=_spawned_entry,
            args=(rank, world_size, init_method, device_type, log_level, worker, args),
            name=f"anchorcredit-tp{rank}",
            daemon=True,  # never outlive rank 0
        )
        proc.start()
        workers.append(proc)
    try:
        group = _join(0, world_size, 0, device_type, init_method)
    except BaseException:
        for proc in workers:
            proc.terminate()
        raise
    group.workers = workers
    return group
