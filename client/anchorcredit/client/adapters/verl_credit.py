"""The credit step on verl's two batch layouts: padded DataProto (legacy) and TransferQueue (v1).

Both send every real response token to the service (multi-turn tool output stays in place,
so positions line up) and scale advantages only where verl's `response_mask` is set (tokens
the policy generated): padding and tool-output positions keep verl's values exactly.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from anchorcredit.client.adapters.common import gammas_for_rows, rows_from_mask
from anchorcredit.client.adapters.summary import StepSummary, log_version
from anchorcredit.client.client import CreditClient
from anchorcredit.client.reweight import _to_numpy, gamma_matrix, reweight


def _summary_metrics(summary: StepSummary) -> dict[str, float]:
    """The step summary under its shared names (summary.py), which verl's metric reducers
    read right: "max"/"min" in a name reduce by max/min, the rest by mean."""
    log_version("verl", summary.version)
    return summary.metrics()


def credit_padded(
    client: CreditClient,
    batch: Any,
    *,
    strategy: str,
    policy_version: str | None,
    sign: str,
    credit_params: dict[str, Any],
    stale_policy: str | None = None,
) -> dict[str, float]:
    """Reweight `batch["advantages"]` in place on verl's padded layout; returns the step's
    credit summary (summary.py).

    `prompts` [B, P] left-padded, `responses` [B, T] right-padded, `attention_mask`
    [B, P + T], `response_mask` [B, T] (0 on tool output and padding), `advantages` [B, T].
    """
    keys = set(batch.keys())
    missing = {"responses", "attention_mask", "advantages"} - keys
    if missing:
        raise KeyError(
            f"anchorcredit needs {sorted(missing)} in the verl batch (the legacy trainer's "
            "padded layout); v1 batches go through the TransferQueue hook instead"
        )
    responses = batch["responses"]
    t = responses.shape[-1]
    attention = batch["attention_mask"]
    prompts = batch["prompts"] if "prompts" in keys else batch["input_ids"][:, :-t]
    real = attention[:, -t:]
    summary = StepSummary()
    gammas = gammas_for_rows(
        client,
        rows_from_mask(prompts, attention[:, :-t]),
        rows_from_mask(responses, real),
        strategy=strategy,
        policy_version=policy_version,
        credit_params=credit_params,
        stale_policy=stale_policy,
        summary=summary,
    )
    dense = gamma_matrix(gammas, real)
    scaled = batch["response_mask"] if "response_mask" in keys else real
    batch["advantages"] = reweight(batch["advantages"], dense, scaled, sign=sign)
    summary.add_gammas(dense, scaled)
    return _summary_metrics(summary)


def _rows(x: Any) -> list[Any]:
    """Per-sample tensors of a TransferQueue field (jagged nested, or dense when stacked)."""
    return list(x.unbind()) if getattr(x, "is_nested", False) else list(x)


def credit_transfer_queue(
    client: CreditClient,
    keys: list[str],
    partition_id: str,
    *,
    strategy: str,
    policy_version: str | None,
    sign: str,
    credit_params: dict[str, Any],
    stale_policy: str | None = None,
) -> dict[str, float]:
    """Reweight the `advantages` verl's v1 trainer just wrote to TransferQueue (written back
    in place, same keys); returns the step's credit summary (summary.py).

    v1 stores each sample unpadded: `prompts` [P_i], `responses` [T_i] (tool output
    included), `response_mask` [T_i] and `advantages` [T_i] as jagged nested tensors.
    """
    import torch
    import transfer_queue as tq
    from tensordict import TensorDict

    fields = ["prompts", "responses", "response_mask", "advantages"]
    td = tq.kv_batch_get(keys=keys, partition_id=partition_id, select_fields=fields)
    prompts = [_to_numpy(p) for p in _rows(td["prompts"])]
    responses = [_to_numpy(r) for r in _rows(td["responses"])]
    masks = _rows(td["response_mask"])
    advs = _rows(td["advantages"])
    summary = StepSummary()
    gammas = gammas_for_rows(
        client,
        prompts,
        responses,
        strategy=strategy,
        policy_version=policy_version,
        credit_params=credit_params,
        stale_policy=stale_policy,
        summary=summary,
    )
    width = max(len(r) for r in responses)
    real = np.zeros((len(responses), width), bool)
    scaled = np.zeros_like(real)
    adv = torch.zeros(len(responses), width, dtype=advs[0].dtype)
    for i, (r, m, a) in enumerate(zip(responses, masks, advs, strict=True)):
        real[i, : len(r)] = True
        scaled[i, : len(r)] = _to_numpy(m).astype(bool)
        adv[i, : len(a)] = a
    dense = gamma_matrix(gammas, real)
    new = reweight(adv, dense, scaled, sign=sign)
    nested = torch.nested.as_nested_tensor(
        [new[i, : len(a)] for i, a in enumerate(advs)], layout=torch.jagged
    )
    out = TensorDict({"advantages": nested}, batch_size=len(keys))
    tq.kv_batch_put(keys=keys, partition_id=partition_id, fields=out)
    summary.add_gammas(dense, scaled)
    return _summary_metrics(summary)
