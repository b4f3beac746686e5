"""The step every adapter shares: padded ids + masks -> service call -> reweighted advantages.

Torch-free by itself (numpy via `reweight`); tensors in give tensors out.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from anchorcredit.client.client import CreditClient
from anchorcredit.client.reweight import _to_numpy, gamma_matrix, reweight
from anchorcredit.contract import DEFAULT_STRATEGY


def rows_from_mask(ids: Any, mask: Any) -> list[np.ndarray]:
    """The ids of each row where mask is set, in order (drops left or right padding)."""
    ids_np = _to_numpy(ids)
    mask_np = _to_numpy(mask).astype(bool, copy=False)
    if ids_np.shape != mask_np.shape:
        raise ValueError(f"ids {ids_np.shape} and mask {mask_np.shape} differ in shape")
    return [row[m] for row, m in zip(ids_np, mask_np, strict=True)]


def credit_for_batch(
    client: CreditClient,
    advantages: Any,
    prompt_ids: Any,
    prompt_mask: Any,
    response_ids: Any,
    response_mask: Any,
    *,
    strategy: str = DEFAULT_STRATEGY,
    policy_version: str | None = None,
    sign: str = "both",
    credit_params: dict[str, Any] | None = None,
) -> tuple[Any, np.ndarray]:
    """Score the batch and return (gamma * advantages as [B, T], dense float32 gamma [B, T]).

    prompt_ids/prompt_mask: [B, P] (any padding side); response_ids/response_mask: [B, T].
    Rows whose response mask is empty (e.g. masked truncated completions) get gamma 1 and are
    not sent (the service needs at least one response token).
    """
    prompts = rows_from_mask(prompt_ids, prompt_mask)
    responses = rows_from_mask(response_ids, response_mask)
    live = [i for i, (p, r) in enumerate(zip(prompts, responses, strict=True)) if len(p) and len(r)]
    gammas: list[np.ndarray] = [np.ones(len(r), np.float32) for r in responses]
    if live:
        results = client.score(
            [prompts[i] for i in live],
            [responses[i] for i in live],
            strategy=strategy,
            policy_version=policy_version,
            **(credit_params or {}),
        )
        for i, res in zip(live, results, strict=True):
            gammas[i] = res.gamma
    dense = gamma_matrix(gammas, response_mask)
    return reweight(advantages, dense, response_mask, sign=sign), dense
