"""Token-budget batching: several sequences packed end to end into one forward.

A packed batch is one row of T = sum(N_i) tokens with position ids restarting at 0 for every
sequence, plus cu_seqlens = [0, N_0, N_0+N_1, ...]. Attention is block-diagonal causal
(capture.py runs it segment by segment), so nothing is padded and no T x T mask exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class PackedBatch:
    """Which sequences (by index into the request) one forward carries, and how."""

    indices: list[int]
    prompt_lens: list[int]
    seq_lens: list[int]

    @property
    def cu_seqlens(self) -> list[int]:
        return [0, *np.cumsum(self.seq_lens).tolist()]

    @property
    def num_tokens(self) -> int:
        return int(sum(self.seq_lens))

    def split(self) -> tuple[PackedBatch, PackedBatch]:
        """Two halves (by sequence count), used to retry after running out of device memory."""
        h = len(self.indices) // 2
        return (
            PackedBatch(self.indices[:h], self.prompt_lens[:h], self.seq_lens[:h]),
            PackedBatch(self.indices[h:], self.prompt_lens[h:], self.seq_lens[h:]),
        )


def plan_batches(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]], max_batch_tokens: int
) -> list[PackedBatch]:
    """Greedy packing in request order; a sequence longer than the budget gets a batch alone.

    Request order (not length-sorted) keeps a sequence's batch mates, hence its float
    rounding, a pure function of the request: same request, bit-identical results.
    """
    batches: list[PackedBatch] = []
    cur = PackedBatch([], [], [])
    for i, (p, r) in enumerate(pairs):
        n = len(p) + len(r)
        if cur.indices and cur.num_tokens + n > max_batch_tokens:
            batches.append(cur)
            cur = PackedBatch([], [], [])
        cur.indices.append(i)
        cur.prompt_lens.append(len(p))
        cur.seq_lens.append(n)
    if cur.indices:
        batches.append(cur)
    return batches


def pack_inputs(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]], batch: PackedBatch, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [1, T] and position_ids [1, T] (restarting per sequence) for one batch."""
    ids = np.concatenate([np.concatenate(pairs[i]) for i in batch.indices]).astype(np.int64)
    pos = np.concatenate([np.arange(n, dtype=np.int64) for n in batch.seq_lens])
    return (
        torch.from_numpy(ids).to(device)[None],
        torch.from_numpy(pos).to(device)[None],
    )
