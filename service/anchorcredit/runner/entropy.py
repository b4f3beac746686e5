"""Next-token entropy at each response position, computed in row chunks.

Which logits row: response token t (0-based position P + j in the packed sequence) was
generated from the distribution the model predicts at position t - 1, so entropy[j] uses the
logits row at position P + j - 1 (j = 0 reads the last prompt token's row, which exists
because |P| >= 1). The row at the last position N - 1 predicts a token past the response and
is never used. Entropy is in nats (natural log), computed in float32 from the model's logits
(LM head, then final_logit_softcapping when the config has one).

Rows are pushed through the LM head a chunk at a time, so the [rows, vocab] float32 tensor
never exceeds max_elements (64 Mi elements = 256 MiB by default), whatever N is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

DEFAULT_MAX_ELEMENTS = 1 << 26


def logits_rows(
    cu_seqlens: Sequence[int], prompt_lens: Sequence[int]
) -> tuple[torch.Tensor, list[int]]:
    """Packed row indices P_i - 1 .. N_i - 2 for each sequence, and each sequence's count R_i."""
    rows, counts = [], []
    for a, b, p in zip(cu_seqlens[:-1], cu_seqlens[1:], prompt_lens, strict=True):
        rows.append(torch.arange(a + p - 1, b - 1))
        counts.append(b - a - p)
    return torch.cat(rows), counts


@torch.inference_mode()
def response_entropy(
    hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    cu_seqlens: Sequence[int],
    prompt_lens: Sequence[int],
    softcap: float | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> torch.Tensor:
    """Entropy (float32) at every response position of a packed batch, sequence after
    sequence ([sum R_i]), from its final hidden states [T, H]."""
    rows, _ = logits_rows(cu_seqlens, prompt_lens)
    if hidden.device.type == "cuda":  # pinned: an asynchronous copy, no host sync
        rows = rows.pin_memory()
    rows = rows.to(hidden.device, non_blocking=True)
    vocab = int(getattr(lm_head, "out_features", 0) or lm_head.weight.shape[0])
    step = max(1, max_elements // max(1, vocab))
    out = torch.empty(len(rows), dtype=torch.float32, device=hidden.device)
    for i in range(0, len(rows), step):
        logits = lm_head(hidden[rows[i : i + step]]).float()
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        logp = torch.log_softmax(logits, dim=-1)
        out[i : i + step] = -(logp.exp() * logp).sum(-1)
    return out
