"""Result containers of the engine (torch tensors, one sequence)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
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


class PackedStats(Sequence[SpanStats]):
    """One layer's statistics for a packed batch, every sequence's response end to end.

    span:    [B, Hq]       each sequence's per-head span.
    waad:    [Hq, n_resp]  WAAD of every response position of the batch, sequence after
                           sequence (sequence b owns columns offsets[b]:offsets[b + 1]).
    fai:     [Hq, n_resp]  FAI likewise.
    offsets: B + 1 ints, where each sequence's response starts (0 first, n_resp last).

    Indexing gives a sequence's SpanStats (views, no copy): the batched credit stage reads
    the packed tensors, per-sequence callers what they always read.
    """

    __slots__ = ("span", "waad", "fai", "offsets")

    def __init__(
        self, span: torch.Tensor, waad: torch.Tensor, fai: torch.Tensor, offsets: Sequence[int]
    ) -> None:
        self.span, self.waad, self.fai = span, waad, fai
        self.offsets = tuple(int(o) for o in offsets)

    @classmethod
    def of_sequences(cls, stats: Sequence[SpanStats]) -> PackedStats:
        """One sequence's SpanStats after another, packed (one copy per field)."""
        offsets = [0]
        for s in stats:
            offsets.append(offsets[-1] + s.response_len)
        return cls(
            torch.stack([s.span for s in stats]),
            torch.cat([s.waad for s in stats], dim=1),
            torch.cat([s.fai for s in stats], dim=1),
            offsets,
        )

    @property
    def num_heads(self) -> int:
        return int(self.waad.shape[0])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, b: int) -> SpanStats:  # type: ignore[override]
        if not isinstance(b, int):
            raise TypeError(f"PackedStats indices are ints, got {type(b).__name__}")
        if b < 0:
            b += len(self)
        if not 0 <= b < len(self):
            raise IndexError(f"sequence {b} of {len(self)}")
        lo, hi = self.offsets[b], self.offsets[b + 1]
        return SpanStats(span=self.span[b], waad=self.waad[:, lo:hi], fai=self.fai[:, lo:hi])

    def __iter__(self) -> Iterator[SpanStats]:
        return (self[b] for b in range(len(self)))


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
