"""Head classes (SPEC.md): local heads = shortest span, global heads = longest span."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from anchorcredit.contract import DEFAULTS
from anchorcredit.engine.credit import check_params
from anchorcredit.engine.types import Aggregate, SpanStats


def num_class_heads(total_heads: int, head_quantile: float) -> int:
    """n = max(1, floor(quantile * number_of_heads)), robust to float noise (0.35 * 180)."""
    return max(1, math.floor(round(head_quantile * total_heads, 9)))


def classify_heads(
    head_span: torch.Tensor, layer_ids: Sequence[int], head_quantile: float
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Sort heads by span (ties: earlier layer, then lower head); n lowest local, n highest global.

    head_span is [num_layers, Hq]. "n highest" is the last n of that same ascending order.
    """
    if not bool(torch.isfinite(head_span).all()):
        # A NaN would make the sort order meaningless and misclassify finite heads silently.
        raise ValueError("head spans must be finite (non-finite q/k reached the statistics?)")
    spans = head_span.detach().to("cpu", torch.float64).tolist()
    order = sorted(
        ((d, li, h) for li, row in enumerate(spans) for h, d in enumerate(row)),
        key=lambda x: (x[0], x[1], x[2]),
    )
    n = num_class_heads(len(order), head_quantile)
    local = [(layer_ids[li], h) for _, li, h in order[:n]]
    global_ = [(layer_ids[li], h) for _, li, h in order[-n:]]
    return local, global_


def aggregate(
    stats: Sequence[SpanStats],
    head_quantile: float = DEFAULTS.head_quantile,
    layer_ids: Sequence[int] | None = None,
    local_heads: Sequence[tuple[int, int]] | None = None,
    global_heads: Sequence[tuple[int, int]] | None = None,
) -> Aggregate:
    """Mean WAAD over local heads and mean FAI over global heads, per sequence.

    layer_ids names each SpanStats' layer in the returned head lists (default 0, 1, ...).
    local_heads/global_heads supply a fixed, calibrated head set instead of per-sequence classes.
    """
    if len(stats) == 0:
        raise ValueError("stats must hold at least one layer's SpanStats")
    head_quantile = check_params(head_quantile=head_quantile).head_quantile  # the contract's range
    layer_ids = list(range(len(stats))) if layer_ids is None else list(layer_ids)
    if len(layer_ids) != len(stats):
        raise ValueError(f"layer_ids has {len(layer_ids)} entries for {len(stats)} layers")
    shapes = {(s.num_heads, s.response_len) for s in stats}
    if len(shapes) != 1:
        raise ValueError(f"all layers must share (Hq, R); got {sorted(shapes)}")

    head_span = torch.stack([s.span for s in stats])
    if (local_heads is None) != (global_heads is None):
        raise ValueError("give both local_heads and global_heads, or neither")
    if local_heads is None:
        local, global_ = classify_heads(head_span, layer_ids, head_quantile)
    else:
        local, global_ = list(map(tuple, local_heads)), list(map(tuple, global_heads))
        if not local or not global_:
            raise ValueError("a fixed head set needs at least one local and one global head")

    where = {layer: i for i, layer in enumerate(layer_ids)}

    def mean_over(heads: list[tuple[int, int]], field: str) -> torch.Tensor:
        rows = []
        for layer, h in heads:
            if layer not in where or not 0 <= h < stats[0].num_heads:
                raise ValueError(f"head {(layer, h)} is not among layers {layer_ids}")
            rows.append(getattr(stats[where[layer]], field)[h])
        return torch.stack(rows).mean(0)

    return Aggregate(
        waad=mean_over(local, "waad"),
        fai=mean_over(global_, "fai"),
        local_heads=local,
        global_heads=global_,
        head_span=head_span,
    )
