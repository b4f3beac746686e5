"""SkyRL weight sync: the service follows the policy SkyRL's inference engines follow.

SkyRL (0.3.0) moves the policy's weights to its inference engines in
`WorkerDispatch.save_weights_for_sampler()` (trainer process: once before training, then
after every step), which runs `broadcast_to_inference_engines` on every policy worker rank
(Ray actors holding the FSDP or Megatron shards). anchorcredit hooks both ends:

- worker side (`push_after_broadcast`): after SkyRL's own broadcast, every rank iterates
  SkyRL's `weight_extractor.extract_weights(dtype)` (full tensors, gathered collectively,
  under the names vLLM loads, in the inference engine's dtype) and rank 0 pushes them as
  `step-<n>-<run>`, n counting this process's syncs from 0;
- trainer side (`pin_after_sync`): after `save_weights_for_sampler` returns (every rank done,
  so the service already serves the new version: a push returns only then), it checks that
  the service serves `step-<n>-<run>` and pins every later score() to it; an answer from
  other weights is refused (FAILED_PRECONDITION), never used.

Both sides name the run the same way (versions.default_run_id: ANCHORCREDIT_RUN_ID, else
the Ray job id and session). LoRA policies are refused (SkyRL syncs adapter files, not the
merged weights the service loads). The Megatron worker is patched through the same
extractor interface but untested here (megatron-core needs CUDA to install).
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from typing import Any

from anchorcredit.client.adapters.versions import default_run_id, note_run, version_name
from anchorcredit.client.client import CreditClient

__all__ = ["PIN", "POLICY_WORKERS", "SYNC_TRANSPORTS", "pin_after_sync", "push_after_broadcast"]

SYNC_TRANSPORTS = ("grpc", "collective")
# module -> the policy worker class whose broadcast_to_inference_engines is wrapped
POLICY_WORKERS = {
    "skyrl.backends.skyrl_train.workers.fsdp.fsdp_worker": "FSDPPolicyWorkerBase",
    "skyrl.backends.skyrl_train.workers.megatron.megatron_worker": "MegatronPolicyWorkerBase",
}


class WeightSyncError(RuntimeError):
    """The service does not serve the version SkyRL's weight sync should have put there."""


class _Count:
    """Syncs seen by this process, and the version the last one named."""

    def __init__(self) -> None:
        self.count = 0
        self.version: str | None = None
        self.seconds: list[float] = []  # wall time of each push (rank 0)

    def next_version(self) -> str:
        run = default_run_id()
        note_run(run)
        return version_name(self.count, run)


PUSHED = _Count()  # worker side
PIN = _Count()  # trainer side: .version is what score() pins


def reset() -> None:
    """Start counting again (a new install: a new run in this process)."""
    global PUSHED, PIN
    PUSHED, PIN = _Count(), _Count()


def _rank() -> int:
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return 0
    return int(dist.get_rank())


def push_after_broadcast(
    original: Callable[..., Any], client_factory: Callable[[], CreditClient], transport: str
) -> Callable[..., Any]:
    """Wrap a policy worker's async `broadcast_to_inference_engines`."""

    @functools.wraps(original)
    async def broadcast_to_inference_engines(self: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(self, "_is_lora", False):
            raise RuntimeError(
                "anchorcredit's SkyRL weight sync needs the full weights; a LoRA policy syncs "
                "adapter files. Merge the adapters, or set ANCHORCREDIT_SYNC=0 and declare a "
                "fixed scoring policy with ANCHORCREDIT_STALE_POLICY=frozen"
            )
        out = await original(self, *args, **kwargs)
        engine_cfg = args[1] if len(args) > 1 else kwargs["inference_engine_cfg"]
        push(self.weight_extractor, engine_cfg, client_factory, transport)
        return out

    return broadcast_to_inference_engines


def push(
    extractor: Any,
    engine_cfg: Any,
    client_factory: Callable[[], CreditClient],
    transport: str,
) -> str:
    """Every rank iterates the extractor (its gathers are collectives); rank 0 pushes."""
    from skyrl.train.utils.utils import str_to_torch_dtype

    version = PUSHED.next_version()
    t0 = time.perf_counter()
    rank0 = _rank() == 0
    items = []
    for chunk in extractor.extract_weights(str_to_torch_dtype(engine_cfg.model_dtype)):
        if rank0:
            pairs = zip(chunk.names, chunk.tensors, strict=True)
            items += [(name, t.detach().to("cpu")) for name, t in pairs]
    if rank0:
        client_factory().push_weights(items, version, transport=transport, dtype="auto")
        PUSHED.seconds.append(time.perf_counter() - t0)
    PUSHED.version = version
    PUSHED.count += 1
    return version


def pin_after_sync(
    original: Callable[..., Any], client_factory: Callable[[], CreditClient]
) -> Callable[..., Any]:
    """Wrap the trainer's async `WorkerDispatch.save_weights_for_sampler`."""

    @functools.wraps(original)
    async def save_weights_for_sampler(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = await original(self, *args, **kwargs)
        record_sync(client_factory())
        return out

    return save_weights_for_sampler


def record_sync(client: CreditClient) -> str:
    """After SkyRL's weight sync: the version the service must serve now becomes the pin."""
    version = PIN.next_version()
    served = client.served_version()  # every replica, or an error naming the odd ones
    if served != version:
        raise WeightSyncError(
            f"the credit service serves {served!r}, not {version!r}, after SkyRL's weight "
            "sync: is the anchorcredit hook installed in the policy workers too (the Ray "
            "worker_process_setup_hook of the job), with the same ANCHORCREDIT_RUN_ID?"
        )
    PIN.version = version
    PIN.count += 1
    return version
