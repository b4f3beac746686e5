"""The seam between the server and compute: two Protocols and their torch-free types.

The server sees compute only through these; the runner's `Scorer` implements both.
Everything crossing the seam is numpy or plain Python, so the server never imports torch
and a test can stand in a fake backend (a fake for the batcher needs `ScoringBackend` only).

`ScoringBackend`: scoring (the batcher, the Score handlers)

    validate(pairs)                 ids checked once, at the edge -> list[TokenPair]
    score_batch(pairs, params, ...) ONE packed forward over what it is given (the batcher
                                    sized it) -> BatchScores (results + per-stage seconds);
                                    it may stop early at `check_cancelled()` (Cancelled)
                                    when run inside `cancellable(...)`
    info(), policy_version          -> ModelInfo, the version served now

`WeightLifecycle`: weight changes (the weight RPCs, server/weights.py; docs/SERVICE.md
"Changing the weights") stage beside the live model and commit in one step on the device
thread:

    stage = backend.stage_weights(update)   a WeightStage (checks the version rules now)
    stage.begin/write | put/load | receive  fill it off the device thread (scoring goes on)
    stage.finish()                          nothing cut short, nothing missing unless partial
    backend.commit_weights(stage)           device thread: version rules again, staged ->
                                            live under the scoring lock, the new version
    backend.join_weight_group(...)          a collective group handle for stage.receive

`ServingBackend` is both: what `anchorcredit serve` is given.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from anchorcredit.contract import STAT_VERSION, CreditParams
from anchorcredit.errors import TruncatedWeights  # noqa: F401 - re-exported (its old home)
from anchorcredit.weight_wire import WeightUpdateSpec

Head = tuple[int, int]  # (layer, head)


@dataclass(frozen=True)
class TokenPair:
    """One validated (prompt, response): int64 id arrays, checked against `vocab_size`."""

    prompt: np.ndarray
    response: np.ndarray
    vocab_size: int

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.response)


@dataclass
class ScoreResult:
    """Per-token outputs for one (prompt, response); arrays have len(response_ids)."""

    waad: np.ndarray
    fai: np.ndarray
    gamma: np.ndarray
    entropy: np.ndarray | None
    local_heads: list[Head]
    global_heads: list[Head]
    policy_version: str


@dataclass(frozen=True)
class BatchScores:
    """What one score_batch() call returns: a result per pair, in order, and the seconds
    each stage took (forward, statistics, entropy, credit, and `runner` = the whole call)."""

    results: list[ScoreResult]
    stage_seconds: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelInfo:
    """What GetModelInfo echoes about the loaded model (the server adds its own limits)."""

    model_id: str
    revision: str
    architecture: str
    dtype: str
    device: str
    num_layers: int
    layers: tuple[int, ...]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int | None
    policy_version: str
    kernel_backend: str
    stat_version: str = STAT_VERSION
    loaded_param_count: int = 0  # parameters held on the device (tied ones counted once)
    total_param_count: int = 0  # parameters of the whole model (tied ones counted once)
    # Digest of the weights served (changes with them, whatever their label); "" if unknown.
    weights_digest: str = ""


class Cancelled(Exception):
    """Every caller of the work being scored gave up (deadline passed or cancelled): the
    forward stopped early at a cooperative check (between layers or budget-sized forwards)."""


_cancel = threading.local()


@contextlib.contextmanager
def cancellable(should_stop: Callable[[], bool]) -> Iterator[None]:
    """While active on this thread, `check_cancelled()` raises Cancelled once should_stop()
    is true. The batcher wraps each device call in it; the runner checks between layers."""
    previous = getattr(_cancel, "check", None)
    _cancel.check = should_stop
    try:
        yield
    finally:
        _cancel.check = previous


def check_cancelled() -> None:
    """A cooperative cancellation point (cheap; a no-op outside `cancellable`)."""
    check = getattr(_cancel, "check", None)
    if check is not None and check():
        raise Cancelled("every caller of this work gave up; stopped between layers")


@runtime_checkable
class WeightStage(Protocol):
    """One weight change being assembled beside the live model (invisible to scoring).

    Header checks raise InputError naming the tensor (unknown name, other shape, a dtype
    that does not cast); a stream or broadcast cut short raises TruncatedWeights."""

    tensors: int  # tensors staged so far
    bytes: int  # bytes staged so far

    def begin(self, name: str, dtype: str, shape: Sequence[int]) -> None:
        """A wire tensor header (dtype float32 | bfloat16 | float16); its bytes follow."""
        ...

    def write(self, data: bytes) -> None:
        """The next raw little-endian bytes of the current tensor."""
        ...

    def load(self, source: str | Path | Mapping[str, Any]) -> None:
        """Every tensor of a checkpoint (directory or .safetensors file) or state dict."""
        ...

    def receive(self, group: Any, headers: Sequence[tuple[str, str, Sequence[int]]]) -> None:
        """The listed tensors broadcast by rank 0 of a joined group, in order; every
        header is checked before the first broadcast."""
        ...

    def finish(self) -> None:
        """No tensor cut short; every tensor present unless the update is partial."""
        ...

    def discard(self) -> None:
        """Drop the staged tensors (the live weights are untouched)."""
        ...


class WeightGroupHandle(Protocol):
    """A joined collective group (the runner's weight_group.WeightGroup)."""

    backend: str
    device: Any

    def close(self) -> None: ...


@runtime_checkable
class ScoringBackend(Protocol):
    """Scoring: what the batcher and the Score handlers need from compute. Calls come from
    one device thread, one at a time (validate and info excepted: read-only)."""

    @property
    def policy_version(self) -> str: ...

    def info(self) -> ModelInfo: ...

    def validate(self, pairs: Sequence[Any]) -> list[TokenPair]:
        """Check (prompt_ids, response_ids) pairs; InputError naming sequences[i] if bad."""
        ...

    def score_batch(
        self,
        pairs: Sequence[TokenPair],
        params: CreditParams,
        *,
        with_entropy: bool = False,
    ) -> BatchScores:
        """One packed forward over `pairs` (no budget, no OOM handling: the caller's job)."""
        ...


@runtime_checkable
class WeightLifecycle(Protocol):
    """Weight changes: what the weight RPCs need from compute (module docstring)."""

    def stage_weights(self, update: WeightUpdateSpec) -> WeightStage:
        """An empty staging buffer for `update` (its version rules checked now)."""
        ...

    def commit_weights(self, stage: WeightStage) -> None:
        """Device thread: re-check the version rules, copy staged -> live under the scoring
        lock and serve `stage.update.version` from the next batch on (atomic)."""
        ...

    def join_weight_group(
        self,
        address: str,
        port: int,
        world_size: int,
        rank: int,
        backend: str = "",
        timeout_s: float = 0,
    ) -> WeightGroupHandle:
        """Join the trainer's private broadcast group (blocks until every rank joined)."""
        ...


@runtime_checkable
class ServingBackend(ScoringBackend, WeightLifecycle, Protocol):
    """Both protocols: what the server is given (the runner's Scorer and
    TensorParallelScorer)."""
