"""One packed forward of the decoder: span statistics of the selected layers (and entropy).

The attention function (capture.py) hands each selected layer's post-RoPE q/k to the
engine's packed entry point right away, so only one layer's q/k is alive at a time, and
raises StopForward after the last selected layer unless entropy needs the final hidden
states (early exit: that layer's MLP, the later layers and the LM head never run).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from anchorcredit.backend import TokenPair
from anchorcredit.engine import SpanStats, span_stats_packed
from anchorcredit.runner.capture import CaptureState, StopForward, capturing
from anchorcredit.runner.entropy import response_entropy
from anchorcredit.runner.packing import PackedBatch, pack_inputs
from anchorcredit.runner.timing import StageTimer


@dataclass(frozen=True)
class Horizon:
    """The statistics' horizons (SPEC.md: WAAD window, FAI band)."""

    window: int
    h_lo: int
    h_hi: int | None


def packed_forward(
    decoder: torch.nn.Module,
    lm_head: torch.nn.Module | None,
    pairs: Sequence[TokenPair],
    layers: Sequence[int],
    horizon: Horizon,
    backend: str,
    timer: StageTimer,
    *,
    with_entropy: bool = False,
    final_logit_softcap: float | None = None,
) -> tuple[list[list[SpanStats]], list[torch.Tensor | None]]:
    """Per sequence: SpanStats of every selected layer (in `layers` order), and entropy
    [R] of the next-token distribution at each response position (None unless asked)."""
    batch = PackedBatch.of(pairs)
    ids, pos = pack_inputs(pairs, next(decoder.parameters()).device)
    cu = batch.cu_seqlens
    slot = {layer: j for j, layer in enumerate(layers)}
    per_seq: list[list[SpanStats | None]] = [[None] * len(layers) for _ in pairs]

    def sink(layer: int, q: torch.Tensor, k: torch.Tensor, scale: float, variant: dict) -> None:
        # variant: the layer's softcap / sinks / sliding_window (model-true attention)
        with timer.stage("statistics"):
            got = span_stats_packed(
                q, k, cu, batch.prompt_lens, horizon.window, horizon.h_lo, horizon.h_hi,
                scale, backend, **variant,
            )  # fmt: skip
        for i, s in enumerate(got):
            per_seq[i][slot[layer]] = s

    state = CaptureState(
        cu_seqlens=cu,
        layers=frozenset(layers),
        sink=sink,
        stop_after=None if with_entropy else max(layers),
    )
    hidden = None
    with capturing(state), timer.stage("forward"):
        try:
            hidden = decoder(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state[0]
        except StopForward:
            pass
    missing = set(layers) - state.captured
    if missing:
        raise RuntimeError(
            f"layers {sorted(missing)} never called the attention interface: this model "
            "does not route attention through transformers' AttentionInterface"
        )
    entropies: list[torch.Tensor | None] = [None] * len(pairs)
    if with_entropy:
        assert hidden is not None and lm_head is not None
        with timer.stage("entropy"):
            entropies = list(
                response_entropy(hidden, lm_head, cu, batch.prompt_lens, final_logit_softcap)
            )
    return per_seq, entropies  # type: ignore[return-value]
