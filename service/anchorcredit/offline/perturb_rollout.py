"""The model side of the perturbation test: alternative tokens and greedy rollouts (torch).

The rules (eligible positions, picking, content words, statistics) are in
anchorcredit.offline.perturb; this module only asks the model.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from anchorcredit.offline.perturb import Trial, content_words, jaccard, pick_positions


def next_token_logits(model: Any, prompt_ids: list[int], response_ids: list[int]) -> Any:
    """[R, V] logits: row t is the distribution that generated response token t."""
    import torch

    ids = torch.tensor([list(prompt_ids) + list(response_ids)], dtype=torch.long)
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0]
    p = len(prompt_ids)
    return logits[p - 1 : p - 1 + len(response_ids)].float()


def alternative_token(
    logits_row: Any, original: int, top_k: int, banned: set[int], rng: np.random.Generator
) -> int:
    """Uniformly one of the top-k tokens of `logits_row` other than `original` and `banned`."""
    order = logits_row.argsort(descending=True).tolist()
    cands = [t for t in order[: top_k + len(banned) + 1] if t != original and t not in banned]
    cands = cands[: max(1, top_k)]
    return int(cands[rng.integers(0, len(cands))])


def greedy_rollouts(
    model: Any, prefixes: list[list[int]], max_new: list[int], pad_id: int
) -> list[list[int]]:
    """Greedy continuations of each prefix (left-padded batch), each cut to its max_new."""
    import torch

    width = max(len(p) for p in prefixes)
    ids = torch.full((len(prefixes), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prefixes), width), dtype=torch.long)
    for i, p in enumerate(prefixes):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max(max_new),
            min_new_tokens=0,
            do_sample=False,
            pad_token_id=pad_id,
            top_p=None,
            top_k=None,
            temperature=None,
        )
    return [out[i, width : width + n].tolist() for i, n in enumerate(max_new)]


def _text(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def perturb_record(
    model: Any,
    tokenizer: Any,
    rec: dict[str, Any],
    *,
    positions: int,
    top_k: int,
    rollout_tokens: int,
    rng: np.random.Generator,
) -> list[Trial]:
    """The paired trials of one record (needs prompt_ids, response_ids, fai, id)."""
    prompt, resp = list(rec["prompt_ids"]), list(rec["response_ids"])
    if not prompt:
        raise ValueError(f"record {rec.get('id')!r}: empty prompt (no token predicts the first)")
    high, low = pick_positions(rec["fai"], positions)
    if not high:
        return []
    logits = next_token_logits(model, prompt, resp)
    banned = set(getattr(tokenizer, "all_special_ids", []) or [])
    pos = high + low
    alts = [alternative_token(logits[t], resp[t], top_k, banned, rng) for t in pos]
    max_new = [min(rollout_tokens, len(resp) - 1 - t) for t in pos]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outs = greedy_rollouts(
        model, [prompt + resp[:t] + [a] for t, a in zip(pos, alts, strict=True)], max_new, pad or 0
    )
    scores = [
        jaccard(
            content_words(_text(tokenizer, o)),
            content_words(_text(tokenizer, resp[t + 1 : t + 1 + n])),
        )
        for o, t, n in zip(outs, pos, max_new, strict=True)
    ]
    m = len(high)
    fai = rec["fai"]
    return [
        Trial(
            record=str(rec.get("id", "")),
            high_pos=high[i],
            low_pos=low[i],
            high_fai=float(fai[high[i]]),
            low_fai=float(fai[low[i]]),
            jaccard_high=scores[i],
            jaccard_low=scores[m + i],
            high_alt=alts[i],
            low_alt=alts[m + i],
        )
        for i in range(m)
    ]


def run_trials(
    model: Any,
    tokenizer: Any,
    records: Sequence[dict[str, Any]],
    *,
    positions: int = 2,
    top_k: int = 5,
    rollout_tokens: int = 32,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[Trial]:
    """Every record's trials, in order; one seeded generator for the alternative tokens."""
    rng = np.random.default_rng(seed)
    trials: list[Trial] = []
    for i, rec in enumerate(records):
        trials += perturb_record(
            model,
            tokenizer,
            rec,
            positions=positions,
            top_k=top_k,
            rollout_tokens=rollout_tokens,
            rng=rng,
        )
        if progress:
            progress(f"{i + 1}/{len(records)} responses, {len(trials)} trials")
    return trials


def stderr_progress(msg: str) -> None:
    print(f"anchorcredit analyze --perturb: {msg}", file=sys.stderr, flush=True)
