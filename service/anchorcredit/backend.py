"""The one seam between the server and compute: a Protocol and its torch-free types.

The server (batcher, servicer) sees compute only through `ScoringBackend`; the runner's
`Scorer` implements it. Everything crossing the seam is numpy or plain Python, so the
server never imports torch and a test can stand in a fake backend.

    validate(pairs)                 ids checked once, at the edge -> list[TokenPair]
    score_batch(pairs, params, ...) ONE packed forward over what it is given (the batcher
                                    sized it) -> BatchScores (results + per-stage seconds)
    load_weights(source, version)   swap weights; later results carry `version`
    info()                          -> ModelInfo
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from anchorcredit.contract import STAT_VERSION, CreditParams

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


@runtime_checkable
class ScoringBackend(Protocol):
    """What the server needs from compute. Calls come from one device thread, one at a time."""

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

    def load_weights(self, source: str | Path | Mapping[str, Any], version: str) -> None:
        """Swap in new weights (checked first); a failure leaves no half-loaded model."""
        ...
