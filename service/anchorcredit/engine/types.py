"""Result containers of the engine (torch tensors, one sequence)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SpanStats:
    """Per-head statistics of one layer for one sequence (SPEC.md).

    span: [Hq]    mean over response rows of the unclipped attention distance.
    waad: [Hq, R] windowed average attention distance of each response row.
    fai:  [Hq, R] future attention influence of each response column, per head
                  (already divided by |T(s)|; 0 where T(s) is empty).
    """

    span: torch.Tensor
    waad: torch.Tensor
    fai: torch.Tensor

    @property
    def num_heads(self) -> int:
        return int(self.span.shape[0])

    @property
    def response_len(self) -> int:
        return int(self.waad.shape[1])


@dataclass
class Aggregate:
    """Layer/head-class aggregation of several SpanStats (SPEC.md "Head classes").

    waad: [R] mean WAAD over the local heads; fai: [R] mean FAI over the global heads.
    local_heads / global_heads: (layer_index, head) pairs; head_span: [num_layers, Hq].
    """

    waad: torch.Tensor
    fai: torch.Tensor
    local_heads: list[tuple[int, int]]
    global_heads: list[tuple[int, int]]
    head_span: torch.Tensor
