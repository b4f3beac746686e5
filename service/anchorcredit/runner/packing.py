"""Packing: several sequences end to end in one forward.

A packed batch is one row of T = sum(N_i) tokens with position ids restarting at 0 for every
sequence, plus cu_seqlens = [0, N_0, N_0+N_1, ...]. Attention is block-diagonal causal
(capture.py runs it segment by segment), so nothing is padded and no T x T mask exists.
How many sequences go into one forward is the caller's choice (the server's batcher owns
the token budget: anchorcredit.budget).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from anchorcredit.backend import TokenPair


@dataclass(frozen=True)
class PackedBatch:
    """The layout of one packed forward."""

    prompt_lens: list[int]
    seq_lens: list[int]

    @classmethod
    def of(cls, pairs: Sequence[TokenPair]) -> PackedBatch:
        return cls([len(p.prompt) for p in pairs], [p.num_tokens for p in pairs])

    @property
    def cu_seqlens(self) -> list[int]:
        return [0, *np.cumsum(self.seq_lens).tolist()]

    @property
    def num_tokens(self) -> int:
        return int(sum(self.seq_lens))


def pack_inputs(
    pairs: Sequence[TokenPair], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [1, T] and position_ids [1, T] (restarting per sequence), copied to the
    device in one pinned, asynchronous copy (no host sync)."""
    ids = np.concatenate([np.concatenate((p.prompt, p.response)) for p in pairs])
    pos = np.concatenate([np.arange(p.num_tokens, dtype=np.int64) for p in pairs])
    host = torch.from_numpy(np.stack([ids.astype(np.int64, copy=False), pos]))
    if device.type == "cuda":
        host = host.pin_memory()
    both = host.to(device, non_blocking=True)
    return both[0:1], both[1:2]
