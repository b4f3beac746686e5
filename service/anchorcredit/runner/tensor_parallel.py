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

Weight changes (a path, a PushWeights stream, a broadcast over the trainer's collective
weight group) are staged whole on rank 0 and committed on every rank at once between
batches (tp_weights.py). Only rank 0 joins a weight group (Scorer.join_weight_group: its own
store and process group, never the default group the ranks' forward uses).
Limits: both Hq and Hkv must divide by N; a batch is cancelled between forwards only, never
inside one (every rank must finish the collectives it started).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anchorcredit.backend import TokenPair, cancellable
from anchorcredit.runner import fingerprint
from anchorcredit.runner.capture import ATTN_IMPLEMENTATION
from anchorcredit.runner.forward import Horizon
from anchorcredit.runner.layers import select_layers
from anchorcredit.runner.loading import (
    LoadedModel,
    _headless,
    _meta_model,
    model_config,
    param_count,
    parse_dtype,
    resolve_source,
    truncated_config,
)
from anchorcredit.runner.scorer import Scorer
from anchorcredit.runner.timing import StageTimer
from anchorcredit.runner.tp_gather import Stats, gather_heads
from anchorcredit.runner.tp_launch import TPGroup
from anchorcredit.runner.tp_weights import (
    TensorParallelWeightsFailed,
    WeightCommand,
    WholeTensorStaging,
    exchange,
    local_tensor,
)
from anchorcredit.runner.weights import PartialWeightsError, owned_tensors
from anchorcredit.weight_wire import WeightUpdateSpec

log = logging.getLogger(__name__)


class TensorParallelGroupBroken(RuntimeError):
    """Another rank is gone (its process died): this group cannot score any more. Restart
    every rank."""


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


def load_sharded(
    path: str | Path,
    dtype: torch.dtype,
    world_size: int,
    layers_needed: int | None = None,
    with_head: bool = True,
) -> LoadedModel:
    """This rank's shard of the causal LM in `path` (collective: every rank calls it).

    As loading.load_model: only the first `layers_needed` decoder layers and, with
    `with_head`, the LM head are built and read. transformers reads only this rank's slices
    and places them on the device it binds (cuda:LOCAL_RANK on CUDA, else the CPU)."""
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    full = model_config(Path(path))
    check_divisible(full, world_size)
    depth = int(full.get_text_config().num_hidden_layers)
    layers = depth if with_head or layers_needed is None else int(layers_needed)
    shell = _meta_model(full)  # shapes only: the whole model's parameters and tensor names
    total = param_count(shell)
    every = {name: tuple(t.shape) for name, t in shell.state_dict(keep_vars=True).items()}
    try:
        from transformers import DistributedConfig

        plan: dict[str, Any] = {
            "distributed_config": DistributedConfig(tp_plan="auto", tp_size=world_size)
        }
    except ImportError:  # transformers before DistributedConfig: the plain arguments
        plan = {"tp_plan": "auto", "tp_size": world_size}
    # Without the head, the base model: the head's and later layers' tensors are skipped
    # unread, and get_decoder() is the model itself, get_output_embeddings() None.
    auto = AutoModelForCausalLM if with_head else AutoModel
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # no table of the (deliberately) skipped tensors
    try:
        model, info = auto.from_pretrained(
            str(path), config=truncated_config(full, layers), dtype=dtype,
            attn_implementation=ATTN_IMPLEMENTATION, local_files_only=True,
            output_loading_info=True, **plan,
        )  # fmt: skip
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = sorted(info.get("missing_keys") or ()) + sorted(info.get("mismatched_keys") or ())
    if missing:  # random-initialised tensors would score silently wrong
        raise RuntimeError(f"the checkpoint at {path} does not fill the model: {missing[:3]}")
    if not with_head:  # the checkpoint's tensor names (model.layers.0...) for weight updates
        model = _headless(shell, model)
    held = sum(local_numel(p) for p in model.parameters())
    names = model.state_dict(keep_vars=True).keys()
    skipped = {name: shape for name, shape in every.items() if name not in names}
    return LoadedModel(model, str(path), full, held, total, skipped)


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
        self.broken: str | None = None  # why the group cannot score any more
        # Called once when the group breaks (the server stops itself: cli/serve_tp.py).
        self.on_broken: Callable[[], None] | None = None
        # This rank's share (a DTensor parameter counts its whole size in numel()).
        self.loaded_param_count = sum(local_numel(p) for p in model.parameters())

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        path: str | Path | None,
        group: TPGroup,
        dtype: str | torch.dtype = "float32",
        layers: Sequence[int] | None = None,
        *,
        policy_version: str = "0",
        backend: str = "auto",
        model_id: str | None = None,
        revision: str | None = None,
        entropy: bool = True,
    ) -> TensorParallelScorer:
        """Load this rank's shard of the model in `path` (None: the embedded default), every
        rank at once. entropy=False: only the layers up to the last selected one, no LM head
        (as Scorer.from_pretrained)."""
        source, default_id = resolve_source(path)
        if isinstance(source, torch.nn.Module):
            raise ValueError("tensor parallelism loads from a model directory, not an object")
        text = model_config(source).get_text_config()
        chosen = select_layers(
            int(text.num_hidden_layers), layers, getattr(text, "layer_types", None)
        )
        loaded = load_sharded(
            source, parse_dtype(dtype), group.world_size, max(chosen) + 1, with_head=entropy
        )
        scorer = cls(
            loaded.model,
            group,
            layers=chosen,
            policy_version=policy_version,
            backend=backend,
            model_id=model_id or default_id,
            revision=revision,
            loaded=loaded,
        )
        scorer.check_local_heads()
        return scorer

    def check_local_heads(self) -> None:
        """Every rank: one 2-token forward, which must see Hq/N heads on this rank. A plan
        that gathers q/k/v (a fused qkv projection, or no plan for attention) would show
        every head on every rank and the gather would repeat them."""
        probe = [TokenPair(np.zeros(1, np.int64), np.zeros(1, np.int64), self.vocab_size)]
        with self._lock, torch.inference_mode():
            stats, _ = Scorer._forward_stats(
                self, probe, Horizon(1, 1, None), StageTimer(self.device), False
            )
        seen, want = stats[0].num_heads, self.num_heads // self.group.world_size
        if seen != want:
            raise ValueError(
                f"this model's tensor-parallel plan gives each rank {seen} attention heads, "
                f"not {self.num_heads} / {self.group.world_size} = {want}: its q/k/v "
                "projections are not split by head, so it cannot be scored with "
                "--tensor-parallel"
            )

    # ------------------------------------------------------------------ scoring
    def _forward_stats(
        self,
        pairs: Sequence[TokenPair],
        horizon: Horizon,
        timer: StageTimer,
        with_entropy: bool,
    ) -> tuple[Stats, torch.Tensor | None]:
        """Rank 0, under the scoring lock: tell the others what to run, then run it too."""
        if self.broken is not None:
            raise TensorParallelGroupBroken(self.broken)
        try:
            self.group.send(ScoreCommand(list(pairs), horizon, bool(with_entropy)))
        except Exception as exc:  # a rank is gone (a rank that fails a forward stays)
            self._break(f"a tensor-parallel rank is gone ({exc}); restart every rank")
            raise TensorParallelGroupBroken(self.broken) from exc
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
    ) -> tuple[Stats | None, torch.Tensor | None]:
        """Every rank: the sharded forward, local-head statistics, gathered on rank 0."""
        local, entropies = super()._forward_stats(pairs, horizon, timer, with_entropy)
        with timer.stage("gather"):
            return gather_heads(local), entropies

    def _break(self, reason: str) -> None:
        self.broken = " ".join(reason.split())
        log.error("tensor parallelism: %s", self.broken)
        if self.on_broken is not None:
            self.on_broken()

    def serve_worker(self) -> None:
        """Ranks > 0: run each forward rank 0 announces, until it sends stop (None)."""
        log.info("tensor-parallel rank %d ready", self.group.rank)
        while True:
            command = self.group.receive()
            if command is None:
                log.info("tensor-parallel rank %d stopping", self.group.rank)
                return
            if isinstance(command, WeightCommand):
                self._follow_weights(command)
                continue
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
        if self.group.is_leader and self.broken is None:
            with self._lock:
                try:
                    self.group.send(None)
                except Exception as exc:  # a rank already gone: close() still reaps the rest
                    log.warning("could not tell the tensor-parallel ranks to stop: %s", exc)
        self.group.close()

    # ------------------------------------------------------------------ weights
    def _initial_records(self) -> dict[str, bytes]:
        """Rank 0 holds shards, not the whole weights: records of its shards plus a random
        one, so its digest is never shared with another process (the records of tensors a
        change sends are of whole tensors, and replace those of the shards)."""
        records = fingerprint.records(owned_tensors(self.model, local_tensor))
        records["\0tensor-parallel"] = uuid.uuid4().bytes
        return records

    def stage_weights(self, update: WeightUpdateSpec) -> WholeTensorStaging:
        """Rank 0: an empty staging buffer of whole tensors in host memory, checked against
        the whole model (names, shapes, the layers not loaded) as one process checks them."""
        update.check(self.policy_version)
        return WholeTensorStaging(self.model, update, skipped=self._skipped_tensors)

    def commit_weights(self, stage: WholeTensorStaging) -> None:  # type: ignore[override]
        """Rank 0, between batches: every rank takes its shard of the staged tensors and
        swaps them in (tp_weights.exchange); the version changes once every rank has."""
        stage.finish()
        with self._lock:
            if self.broken is not None:
                raise TensorParallelGroupBroken(self.broken)
            stage.update.check(self.policy_version)
            records, after = self._digest_after(stage)
            headers = stage.headers()
            try:
                self.group.send(WeightCommand(headers, stage.update.version))
            except Exception as exc:
                self._break(f"a tensor-parallel rank is gone ({exc}); restart every rank")
                raise TensorParallelGroupBroken(self.broken) from exc
            try:
                exchange(self.model, self.device, self.group.control, headers, stage.whole_tensors)
            except PartialWeightsError as err:
                self._weights_broken = str(err)
                raise
            except TensorParallelWeightsFailed:
                raise  # no rank changed its weights: the old version keeps scoring
            except Exception as exc:
                # A collective failed: a rank is gone, the ranks are out of step.
                self._break(f"a weight change failed on the process group ({exc})")
                raise TensorParallelGroupBroken(self.broken) from exc
            finally:
                stage.discard()
            self._weights_broken = None
            self._now_serving(stage.update.version, records, after)

    def _follow_weights(self, command: WeightCommand) -> None:
        """Ranks > 0: rank 0's weight change, between two batches."""
        try:
            with self._lock:
                exchange(self.model, self.device, self.group.control, command.headers, None)
            self.policy_version = command.version
            log.info("tensor-parallel rank %d: weights at %r", self.group.rank, command.version)
        except Exception:  # rank 0 reports it; follow the next command
            log.exception("tensor-parallel rank %d: weight change failed", self.group.rank)


def _worker(
    group: TPGroup, device_type: str, path: str | None, dtype: str, scorer_kwargs: dict[str, Any]
) -> None:
    """A rank > 0: load its shard, then follow rank 0 until told to stop."""
    group.device(device_type)
    TensorParallelScorer.from_pretrained(path, group, dtype, **scorer_kwargs).serve_worker()


def launch(
    world_size: int,
    path: str | Path | None,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    **scorer_kwargs: Any,
) -> TensorParallelScorer | None:
    """Shard the model in `path` (None: the embedded default) over `world_size` ranks and
    return rank 0's scorer (call close() on it when done). device: "cpu" (gloo) or "cuda"
    (nccl, one GPU per rank: cuda:LOCAL_RANK). scorer_kwargs: layers, policy_version,
    backend, model_id, revision, entropy (as TensorParallelScorer.from_pretrained).

    In a plain process the other ranks are spawned here. Under torchrun every process calls
    launch: ranks > 0 serve rank 0's forwards until it closes, then get None.
    """
    device_type = torch.device(device).type
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"tensor parallelism runs on cpu or cuda, not {device!r}")
    from anchorcredit.runner import tp_launch

    args = (device_type, None if path is None else str(path), str(dtype), dict(scorer_kwargs))
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
