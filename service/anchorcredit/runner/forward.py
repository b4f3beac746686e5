"""One packed forward of the decoder: span statistics of the selected layers (and entropy).

The attention function (capture.py) hands each selected layer's post-RoPE q/k to the
engine's packed entry point right away, so only one layer's q/k is alive at a time, and
raises StopForward after the last selected layer unless entropy needs the final hidden
states (early exit: that layer's MLP, the later layers and the LM head never run).

With the triton backend and the horizon to the end, each selected layer whose attention the
forward computes anyway (all but the stop layer) also hands over its row LSE, so the kernel
scores that layer in one pass instead of two (anchorcredit.engine.span.kernel_lse). The
statistics stay on the device, one PackedStats per layer, for the batched credit stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from anchorcredit.backend import TokenPair
from anchorcredit.engine import PackedStats, span_stats_packed
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
) -> tuple[list[PackedStats], torch.Tensor | None]:
    """The statistics of every selected layer (in `layers` order), each a PackedStats over
    the batch, and the entropy [n_resp] of the next-token distribution at every response
    position, sequence after sequence (None unless asked)."""
    batch = PackedBatch.of(pairs)
    ids, pos = pack_inputs(pairs, next(decoder.parameters()).device)
    cu = batch.cu_seqlens
    slot = {layer: j for j, layer in enumerate(layers)}
    per_layer: list[PackedStats | None] = [None] * len(layers)

    def sink(
        layer: int, q: torch.Tensor, k: torch.Tensor, scale: float, variant: dict,
        lse: torch.Tensor | None,
    ) -> None:  # fmt: skip
        # variant: the layer's softcap / sinks / sliding_window (model-true attention)
        with timer.stage("statistics"):
            per_layer[slot[layer]] = span_stats_packed(
                q, k, cu, batch.prompt_lens, horizon.window, horizon.h_lo, horizon.h_hi,
                scale, backend, lse=lse, **variant,
            )  # fmt: skip

    state = CaptureState(
        cu_seqlens=cu,
        layers=frozenset(layers),
        sink=sink,
        stop_after=None if with_entropy else max(layers),
        want_lse=backend == "triton" and horizon.h_hi is None,
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
    entropy = None
    if with_entropy:
        assert hidden is not None and lm_head is not None
        with timer.stage("entropy"):
            entropy = response_entropy(hidden, lm_head, cu, batch.prompt_lens, final_logit_softcap)
    return per_layer, entropy  # type: ignore[return-value]
