"""Which layers the runner captures (SPEC.md "Layers")."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def select_layers(num_layers: int, layers: Sequence[int] | None = None) -> list[int]:
    """Sorted, de-duplicated 0-based layer indices to capture.

    None: SPEC's five middle-third layers round(linspace(floor(L/3), floor(2L/3), 5)),
    rounding half to even (numpy.round does), duplicates removed. L=36 -> [12, 15, 18, 21, 24].
    An explicit list is checked against [0, num_layers).
    """
    if int(num_layers) != num_layers or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers}")
    num_layers = int(num_layers)
    if layers is None:
        lo, hi = math.floor(num_layers / 3), math.floor(2 * num_layers / 3)
        picked = np.round(np.linspace(lo, hi, 5)).astype(int).tolist()
        return sorted(set(min(p, num_layers - 1) for p in picked))
    chosen = list(layers)
    if not chosen:
        raise ValueError("layers must name at least one layer (or be None for the default)")
    for layer in chosen:
        if isinstance(layer, bool) or int(layer) != layer:
            raise ValueError(f"layer indices must be ints, got {layer!r}")
        if not 0 <= int(layer) < num_layers:
            raise ValueError(f"layer {layer} is out of range for a {num_layers}-layer model")
    return sorted({int(layer) for layer in chosen})
