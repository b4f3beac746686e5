"""A Scorer whose model is sharded over N processes by attention head (tensor parallelism).

    rank 0                                   ranks 1..N-1
    score_batch(pairs)                       serve_worker(): loop
      validate, check heads                    receive command
      send (pairs, horizon, entropy?)  ---->   |
      sharded forward + local statistics       sharded forward + local statistics
      gather_heads  <------------------------  gather_heads
      head classes, WAAD/FAI, gamma
    close(): send stop  -------------------->  return

The model is loaded with transformers' tensor-parallel plan (`tp_plan="auto"`: q/k/v and
gate/up column-wise, o/down row-wise with an all-reduce), so each rank holds 1/N of every
decoder layer's projections and the attention function (capture.py) sees that rank's
heads only: Hq/N query heads and Hkv/N kv heads, contiguous, so a GQA group never spans two
ranks. The span statistics of those local heads are computed where the heads live and
gathered once per batch (tp_gather.py); head classification and credit then run unchanged
on rank 0. Entropy runs on every rank: the LM head's plan gathers the logits, so each rank
computes the same entropies, and rank 0's are used.

Limits: both Hq and Hkv must divide by N; weight changes are refused (the staging code
copies whole tensors; a sharded reload is future work); a batch is cancelled between
forwards only, never inside one (every rank must finish the collectives it started).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from anchorcredit.backend import TokenPair, cancellable
from anchorcredit.errors import WeightVersionConflict
from anchorcredit.runner.capture import ATTN_IMPLEMENTATION
from anchorcredit.runner.forward import Horizon
from anchorcredit.runner.loading import parse_dtype
from anchorcredit.runner.scorer import Scorer
from anchorcredit.runner.timing import StageTimer
from anchorcredit.runner.tp_gather import Stats, gather_heads
from anchorcredit.runner.tp_launch import TPGroup

log = logging.getLogger(__name__)


class TensorParallelWeightsUnsupported(WeightVersionConflict):
    """Weight changes are refused under tensor parallelism (FAILED_PRECONDITION: restart the
    server on the new checkpoint instead)."""


@dataclass(frozen=True)
class ScoreCommand:
    """What rank 0 tells the other ranks before each packed forward."""

    pairs: list[TokenPair]
    horizon: Horizon
    with_entropy: bool


def check_divisible(config: Any, world_size: int) -> None:
    """Every rank must get whole heads and whole GQA groups."""
    cfg = config.get_text_config()
    hq = int(cfg.num_attention_heads)
    hkv = int(getattr(cfg, "num_key_value_heads", None) or hq)
    if hq % world_size or hkv % world_size:
        raise ValueError(
            f"--tensor-parallel {world_size} must divide both the query heads ({hq}) and the "
            f"kv heads ({hkv}) of this model"
        )


def load_sharded(path: str | Path, dtype: torch.dtype, world_size: int) -> torch.nn.Module:
    """This rank's shard of the causal LM in `path` (collective: every rank calls it).
    transformers reads only this rank's slices and places them on the device it binds
    (cuda:LOCAL_RANK on CUDA, else the CPU)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {path}")
    check_divisible(AutoConfig.from_pretrained(str(path), local_files_only=True), world_size)
    kwargs: dict[str, Any] = {"tp_plan": "auto", "tp_size": world_size}
    try:
        from transformers import DistributedConfig

        kwargs = {"distributed_config": DistributedConfig(tp_plan="auto", tp_size=world_size)}
    except ImportError:  # transformers before DistributedConfig: the plain arguments
        pass
    return AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION, local_files_only=True,
        **kwargs,
    )  # fmt: skip


def local_numel(param: torch.Tensor) -> int:
    """Elements this rank holds (a DTensor's local shard, or the whole tensor)."""
    to_local = getattr(param, "to_local", None)
    return int(to_local().numel()) if to_local is not None else int(param.numel())


class TensorParallelScorer(Scorer):
    """The Scorer of one rank of a tensor-parallel group. On rank 0 it is the server's
    backend (score_batch drives every rank); on the others, serve_worker() follows."""

    def __init__(self, model: torch.nn.Module, group: TPGroup, **kwargs: Any):
        super().__init__(model, **kwargs)
        self.group = group
        self.loaded_param_count = sum(local_numel(p) for p in model.parameters())

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        path: str | Path,
        group: TPGroup,
        dtype: str | torch.dtype = "float32",
        layers: Sequence[int] | None = None,
        *,
        policy_version: str = "0",
        backend: str = "auto",
        model_id: str | None = None,
        revision: str | None = None,
    ) -> TensorParallelScorer:
        """Load this rank's shard of the model in `path` (every rank calls it)."""
        model = load_sharded(path, parse_dtype(dtype), group.world_size)
        return cls(
            model,
            group,
            layers=layers,
            policy_version=policy_version,
            backend=backend,
            model_id=model_id or str(path),
            revision=revision,
        )

    # ------------------------------------------------------------------ scoring
    def _forward_stats(
        self,
        pairs: Sequence[TokenPair],
        horizon: Horizon,
        timer: StageTimer,
        with_entropy: bool,
    ) -> tuple[Stats, list[torch.Tensor | None]]:
        """Rank 0, under the scoring lock: tell the others what to run, then run it too."""
        self.group.send(ScoreCommand(list(pairs), horizon, bool(with_entropy)))
        # No cancellation inside a forward: the other ranks would wait for collectives
        # rank 0 never joins. The batcher still cancels between forwards.
        with cancellable(lambda: False):
            stats, entropies = self._sharded_forward(pairs, horizon, timer, with_entropy)
        assert stats is not None
        return stats, entropies

    def _sharded_forward(
        self,
        pairs: Sequence[TokenPair],
        horizon: Horizon,
        timer: StageTimer,
        with_entropy: bool,
    ) -> tuple[Stats | None, list[torch.Tensor | None]]:
        """Every rank: the sharded forward, local-head statistics, gathered on rank 0."""
        local, entropies = super()._forward_stats(pairs, horizon, timer, with_entropy)
        with timer.stage("gather"):
            return gather_heads(local), entropies

    def serve_worker(self) -> None:
        """Ranks > 0: run each forward rank 0 announces, until it sends stop (None)."""
        log.info("tensor-parallel rank %d ready", self.group.rank)
        while True:
            command = self.group.receive()
            if command is None:
                log.info("tensor-parallel rank %d stopping", self.group.rank)
                return
            try:
                with self._lock, torch.inference_mode():
                    timer = StageTimer(self.device)
                    self._sharded_forward(
                        command.pairs, command.horizon, timer, command.with_entropy
                    )
            except Exception:
                # Same shapes on every rank: rank 0 met the same failure (an out-of-memory
                # error, most likely) and answers it; wait for the next command.
                log.exception("tensor-parallel rank %d: forward failed", self.group.rank)

    def close(self) -> None:
        """Rank 0: tell the other ranks to stop (after any running batch), then leave."""
        if self.group.is_leader:
            with self._lock:
                self.group.send(None)
        self.group.close()

    # ------------------------------------------------------------------ weights
    def stage_weights(self, update: Any) -> Any:
        raise TensorParallelWeightsUnsupported(
            "weight changes are not supported with --tensor-parallel; restart the server "
            "on the new checkpoint"
        )

    def join_weight_group(self, *args: Any, **kwargs: Any) -> Any:
        return self.stage_weights(None)


def _worker(
    group: TPGroup, device_type: str, path: str, dtype: str, scorer_kwargs: dict[str, Any]
) -> None:
    """A rank > 0: load its shard, then follow rank 0 until told to stop."""
    group.device(device_type)
    TensorParallelScorer.from_pretrained(path, group, dtype, **scorer_kwargs).serve_worker()


def launch(
    world_size: int,
    path: str | Path,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    **scorer_kwargs: Any,
) -> TensorParallelScorer | None:
    """Shard the model in `path` over `world_size` ranks and return rank 0's scorer (call
    close() on it when done). device: "cpu" (gloo) or "cuda" (nccl, one GPU per rank:
    cuda:LOCAL_RANK). scorer_kwargs: layers, policy_version, backend, model_id, revision.

    In a plain process the other ranks are spawned here. Under torchrun every process calls
    launch: ranks > 0 serve rank 0's forwards until it closes, then get None.
    """
    device_type = torch.device(device).type
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"tensor parallelism runs on cpu or cuda, not {device!r}")
    from anchorcredit.runner import tp_launch

    args = (device_type, str(path), str(dtype), dict(scorer_kwargs))
    group = tp_launch.start(world_size, device_type, _worker, args)
    try:
        if not group.is_leader:  # torchrun: this process is a worker
            _worker(group, *args)
            group.close()
            return None
        group.device(device_type)
        return TensorParallelScorer.from_pretrained(path, group, dtype, **scorer_kwargs)
    except BaseException:
        group.close()
        raise
