"""Which layers the runner captures (SPEC.md "Layers", docs/DEFINITIONS.md for hybrids).

SPEC's default is five evenly spaced layers of the middle third. Models that declare a type
per layer (`config.layer_types`: Gemma 2/3, gpt-oss, Qwen2 with sliding windows, ...) get
the nearest full-attention layers instead [ours]:

    each SPEC default layer d -> the full-attention layer f minimising |f - d|, ties to the
    lower f; then sorted with duplicates removed (so fewer than five layers may remain).

Without `layer_types`, or with no full-attention layer at all, the SPEC default stands (its
sliding-window layers are then scored exactly from the windowed softmax). Any layer whose
type is "full_attention" or "sliding_attention" may be asked for explicitly; other types
(linear attention, Mamba, chunked attention, ...) cannot be scored.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np

log = logging.getLogger(__name__)

FULL = "full_attention"
SLIDING = "sliding_attention"
SCORABLE_TYPES = (FULL, SLIDING)


class LayerChoiceError(ValueError):
    """A layer list that cannot be scored; `scorable` lists the layers that can."""

    def __init__(self, message: str, scorable: Sequence[int]):
        super().__init__(message)
        self.scorable = list(scorable)


def spec_default_layers(num_layers: int) -> list[int]:
    """SPEC: round(linspace(floor(L/3), floor(2L/3), 5)), half to even, deduplicated."""
    lo, hi = math.floor(num_layers / 3), math.floor(2 * num_layers / 3)
    picked = np.round(np.linspace(lo, hi, 5)).astype(int).tolist()
    return sorted(set(min(p, num_layers - 1) for p in picked))


def scorable_layers(num_layers: int, layer_types: Sequence[str] | None = None) -> list[int]:
    """Layers whose attention the statistics can read (all of them without layer_types)."""
    if layer_types is None:
        return list(range(num_layers))
    return [i for i, kind in enumerate(layer_types) if kind in SCORABLE_TYPES]


def describe_layers(num_layers: int, layer_types: Sequence[str] | None = None) -> str:
    """'0-17 (full attention: 5, 11, 17)': the layers that can be scored, for messages."""
    ok = scorable_layers(num_layers, layer_types)
    text = _ranges(ok) if ok else "none"
    if layer_types is not None:
        full = [i for i, kind in enumerate(layer_types) if kind == FULL]
        if full and len(full) < len(ok):
            text += f" (full attention: {', '.join(map(str, full))})"
    return text


def select_layers(
    num_layers: int,
    layers: Sequence[int] | None = None,
    layer_types: Sequence[str] | None = None,
) -> list[int]:
    """Sorted, de-duplicated 0-based layer indices to capture.

    None: SPEC's five middle-third layers (L=36 -> [12, 15, 18, 21, 24]), or for a model
    with per-layer attention types the nearest full-attention layers (module docstring).
    An explicit list is checked against [0, num_layers) and the scorable layer types;
    LayerChoiceError (a ValueError) names the layer and lists those that can be scored.
    """
    if int(num_layers) != num_layers or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers}")
    num_layers = int(num_layers)
    if layer_types is not None:
        layer_types = [str(t) for t in layer_types]
        if len(layer_types) != num_layers:
            layer_types = None  # a config that does not describe its layers: ignore it
    can = describe_layers(num_layers, layer_types)
    if layers is None:
        return default_layers(num_layers, layer_types)
    chosen = list(layers)
    if not chosen:
        raise LayerChoiceError(
            f"name at least one layer; layers that can be scored: {can}",
            scorable_layers(num_layers, layer_types),
        )
    for layer in chosen:
        if isinstance(layer, bool) or int(layer) != layer:
            raise ValueError(f"layer indices must be ints, got {layer!r}")
        if not 0 <= int(layer) < num_layers:
            raise LayerChoiceError(
                f"layer {layer} is out of range for a {num_layers}-layer model; "
                f"layers that can be scored: {can}",
                scorable_layers(num_layers, layer_types),
            )
        if layer_types is not None and layer_types[int(layer)] not in SCORABLE_TYPES:
            raise LayerChoiceError(
                f"layer {layer} is a {layer_types[int(layer)]} layer, which cannot be scored; "
                f"layers that can be scored: {can}",
                scorable_layers(num_layers, layer_types),
            )
    return sorted({int(layer) for layer in chosen})


def default_layers(num_layers: int, layer_types: Sequence[str] | None = None) -> list[int]:
    """The default layers: SPEC's, moved to the nearest full-attention layers for hybrids."""
    spec = spec_default_layers(num_layers)
    if layer_types is None:
        return spec
    full = [i for i, kind in enumerate(layer_types) if kind == FULL]
    if not full:
        ok = set(scorable_layers(num_layers, layer_types))
        if not set(spec) <= ok:
            raise LayerChoiceError(
                f"the default layers {spec} cannot be scored (types "
                f"{sorted({layer_types[i] for i in spec} - set(SCORABLE_TYPES))}); "
                f"layers that can be scored: {describe_layers(num_layers, layer_types)}",
                sorted(ok),
            )
        return spec
    picked = sorted({min(full, key=lambda f: (abs(f - d), f)) for d in spec})
    if picked != spec:
        log.info(
            "hybrid attention: default layers %s (SPEC's %s moved to the nearest "
            "full-attention layers, ties to the lower)",
            picked,
            spec,
        )
    return picked


def _ranges(values: Sequence[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    out: list[str] = []
    start = prev = None
    for v in values:
        if start is None:
            start = prev = v
        elif v == prev + 1:
            prev = v
        else:
            out.append(str(start) if start == prev else f"{start}-{prev}")
            start = prev = v
    if start is not None:
        out.append(str(start) if start == prev else f"{start}-{prev}")
    return ", ".join(out)
