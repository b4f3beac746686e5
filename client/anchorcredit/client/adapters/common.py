"""The step every adapter shares: padded ids + masks -> service call -> reweighted advantages.

Torch-free by itself (numpy via `reweight`); tensors in give tensors out.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from anchorcredit.client.adapters.policy_check import check_served_policy
from anchorcredit.client.adapters.summary import StepSummary
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


def gammas_for_rows(
    client: CreditClient,
    prompts: Sequence[np.ndarray],
    responses: Sequence[np.ndarray],
    *,
    strategy: str,
    policy_version: str | None,
    credit_params: dict[str, Any],
    stale_policy: str | None = None,
    summary: StepSummary | None = None,
) -> list[np.ndarray]:
    """gamma for each (prompt, response) row; rows with an empty side get ones (not sent:
    the service needs at least one token on each side).

    policy_version None (no weight sync of this run pins the scores): the served version is
    checked first (policy_check.py; stale_policy "warn" | "error" | "frozen", None: the
    ANCHORCREDIT_STALE_POLICY setting). summary: gets the call's seconds, cache hits and
    misses and the version that scored (the caller adds the gammas it applies)."""
    live = [i for i, (p, r) in enumerate(zip(prompts, responses, strict=True)) if len(p) and len(r)]
    gammas = [np.ones(len(r), np.float32) for r in responses]
    pusher = getattr(client, "background_pusher", None)
    if pusher is not None:
        # The push this score pins: waiting for it is sync time, not scoring; a failed
        # background push is raised here, naming its step.
        pusher.wait()
        if summary is not None:
            times = pusher.take_times()
            summary.add_sync(times.push_seconds, times.blocked_seconds, times.period_seconds)
    if live:
        if policy_version is None:
            check_served_policy(client, stale_policy)
        t0 = time.perf_counter()
        results = client.score(
            [prompts[i] for i in live],
            [responses[i] for i in live],
            strategy=strategy,
            policy_version=policy_version,
            **credit_params,
        )
        seconds = time.perf_counter() - t0
        if summary is not None:
            served = results[0].policy_version if results else policy_version
            summary.add_call(seconds, getattr(client, "last_stats", None), served)
        for i, res in zip(live, results, strict=True):
            gammas[i] = res.gamma
    elif summary is not None and policy_version is not None:
        summary.add_call(0.0, None, policy_version)  # nothing to score: the pinned version
    return gammas


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
    stale_policy: str | None = None,
    summary: StepSummary | None = None,
) -> tuple[Any, np.ndarray]:
    """Score the batch and return (gamma * advantages as [B, T], dense float32 gamma [B, T]).

    prompt_ids/prompt_mask: [B, P] (any padding side); response_ids/response_mask: [B, T].
    Rows whose response mask is empty (e.g. masked truncated completions) get gamma 1 and are
    not sent (the service needs at least one response token). summary: gets the scoring
    call and the gammas on `response_mask` (summary.py).
    """
    prompts = rows_from_mask(prompt_ids, prompt_mask)
    responses = rows_from_mask(response_ids, response_mask)
    gammas = gammas_for_rows(
        client,
        prompts,
        responses,
        strategy=strategy,
        policy_version=policy_version,
        credit_params=credit_params or {},
        stale_policy=stale_policy,
        summary=summary,
    )
    dense = gamma_matrix(gammas, response_mask)
    if summary is not None:
        summary.add_gammas(dense, response_mask)
    return reweight(advantages, dense, response_mask, sign=sign), dense


def shifted_response_spans(
    sequences: Any, attention_mask: Any, action_mask: Any
) -> list[tuple[int, np.ndarray, np.ndarray, int, int]]:
    """(row, prompt ids, response ids, lo, hi) for each row with a response, in the layout
    where action position j produced the token at sequence index j + 1 (OpenRLHF's
    action_mask, AReaL's rolled loss_mask).

    The response is the span from the first to the last action token (multi-turn tool/user
    tokens inside it stay in place as context); the prompt is every attended token before
    it; action positions lo..hi-1 produced response tokens lo+1..hi.
    """
    ids = _to_numpy(sequences)
    attn = _to_numpy(attention_mask).astype(bool)
    action = _to_numpy(action_mask).astype(bool)
    out = []
    for b in range(ids.shape[0]):
        pos = np.flatnonzero(action[b])
        if len(pos) == 0:
            continue
        first, last = int(pos[0]) + 1, int(pos[-1]) + 1  # sequence indices of the response
        prompt = ids[b, :first][attn[b, :first]]
        if len(prompt) == 0:
            continue
        out.append((b, prompt, ids[b, first : last + 1], first - 1, last))
    return out


def credit_for_shifted_batch(
    client: CreditClient,
    advantages: Any,
    sequences: Any,
    attention_mask: Any,
    action_mask: Any,
    *,
    strategy: str = DEFAULT_STRATEGY,
    policy_version: str | None = None,
    sign: str = "both",
    credit_params: dict[str, Any] | None = None,
    stale_policy: str | None = None,
    summary: StepSummary | None = None,
) -> tuple[Any, np.ndarray]:
    """(gamma * advantages, dense float32 gamma) for the shifted layout of
    `shifted_response_spans`; positions where action_mask is 0 keep their values exactly.
    summary: gets the scoring call and the gammas on `action_mask` (summary.py)."""
    spans = shifted_response_spans(sequences, attention_mask, action_mask)
    gammas = gammas_for_rows(
        client,
        [s[1] for s in spans],
        [s[2] for s in spans],
        strategy=strategy,
        policy_version=policy_version,
        credit_params=credit_params or {},
        stale_policy=stale_policy,
        summary=summary,
    )
    dense = np.ones(tuple(action_mask.shape), np.float32)
    for (b, _, _, lo, hi), gamma in zip(spans, gammas, strict=True):
        dense[b, lo:hi] = gamma
    if summary is not None:
        summary.add_gammas(dense, action_mask)
    return reweight(advantages, dense, action_mask, sign=sign), dense
