"""Tensor parallelism: every rank's per-head statistics -> all heads on rank 0.

Under a column-wise split of q/k/v, rank r holds the contiguous query heads
[r * Hq/N, (r+1) * Hq/N) (and the matching kv heads, so GQA groups stay whole), and the
capture computes statistics (one PackedStats per layer) for those local heads only. Every
rank holds the same sequences and layers, so its statistics have the same shapes: they
travel as ONE flat tensor per rank (one collective per batch) and are put back together on
rank 0 by concatenating along the head axis in rank order, which is the global head order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from anchorcredit.engine import PackedStats

Stats = list[PackedStats]  # one per selected layer


def flatten_stats(stats: Stats) -> torch.Tensor:
    """span, waad and fai of every layer, one after another, as one 1-D tensor."""
    parts = [t.reshape(-1) for s in stats for t in (s.span, s.waad, s.fai)]
    dtypes = {t.dtype for t in parts}
    if len(dtypes) != 1:
        raise ValueError(f"a batch's statistics must share a dtype, got {sorted(map(str, dtypes))}")
    return torch.cat(parts)


def concat_heads(flats: Sequence[torch.Tensor], like: Stats) -> Stats:
    """Rank-ordered flat tensors (each laid out as flatten_stats(like)) -> PackedStats with
    the heads of every rank, in global head order."""
    out: Stats = []
    offset = 0
    for s in like:
        fields = []
        for t, head_axis in ((s.span, 1), (s.waad, 0), (s.fai, 0)):
            n = t.numel()
            fields.append(torch.cat([f[offset : offset + n].view(t.shape) for f in flats],
                                    dim=head_axis))  # fmt: skip
            offset += n
        out.append(PackedStats(*fields, s.offsets))
    if offset != flats[0].numel():
        raise ValueError(f"gathered {flats[0].numel()} values per rank, expected {offset}")
    return out


def gather_heads(stats: Stats) -> Stats | None:
    """Collective over the default group (every rank calls it with its local statistics,
    same shapes everywhere): rank 0 gets the statistics of all heads, the others None."""
    flat = flatten_stats(stats)
    buffers = None
    if dist.get_rank() == 0:
        buffers = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.gather(flat, buffers, dst=0)
    return None if buffers is None else concat_heads(buffers, stats)
