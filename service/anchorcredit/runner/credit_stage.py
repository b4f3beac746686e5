"""Per sequence after the forward: head classes, WAAD/FAI means, gamma (SPEC.md).

Pure functions of the statistics and the validated parameters: the Scorer calls them once
per packed forward, inside its "credit" stage.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import torch

from anchorcredit.backend import Head, ScoreResult, TokenPair
from anchorcredit.contract import CreditParams
from anchorcredit.engine import SpanStats, aggregate, credit


def sequence_seed(seed: int, prompt: np.ndarray, response: np.ndarray) -> list[int]:
    """The random baseline's seed for one sequence: the request's seed and the sequence's ids.

    One shared seed would boost the same positions in every response of a batch; the batch
    index would make a cached result depend on its batch. The ids' crc32 does neither.
    """
    return [int(seed), zlib.crc32(np.asarray(prompt, "<u4").tobytes()),
            zlib.crc32(np.asarray(response, "<u4").tobytes())]  # fmt: skip


def credit_result(
    pair: TokenPair,
    stats: list[SpanStats],
    entropy: torch.Tensor | None,
    params: CreditParams,
    layers: Sequence[int],
    policy_version: str,
    local_heads: Sequence[Head] | None = None,
    global_heads: Sequence[Head] | None = None,
) -> ScoreResult:
    """One sequence's ScoreResult from its per-layer statistics (and entropy)."""
    agg = aggregate(
        stats,
        params.head_quantile,
        layer_ids=list(layers),
        local_heads=local_heads,
        global_heads=global_heads,
    )
    waad = agg.waad.float().cpu().numpy()
    fai = agg.fai.float().cpu().numpy()
    ent = None if entropy is None else entropy.float().cpu().numpy()
    kwargs = {
        **params.credit_kwargs(),
        "seed": sequence_seed(params.seed, pair.prompt, pair.response),
    }
    gamma = credit(params.strategy, waad=waad, fai=fai, entropy=ent, **kwargs)
    return ScoreResult(
        waad=waad,
        fai=fai,
        gamma=np.asarray(gamma, dtype=np.float32),
        entropy=ent,
        local_heads=[tuple(h) for h in agg.local_heads],
        global_heads=[tuple(h) for h in agg.global_heads],
        policy_version=policy_version,
    )
