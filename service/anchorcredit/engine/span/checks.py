"""Argument checks shared by every backend: clear ValueErrors, never a silent wrong answer."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from anchorcredit import contract


def check_qk(q: torch.Tensor, k: torch.Tensor, prompt_len: int) -> None:
    """Validate one sequence's post-RoPE q [Hq, N, d] and k [Hkv, N, d]."""
    check_qk_pair(q, k)
    check_lengths(q.shape[1], prompt_len)
    check_finite_qk(q, k)


def check_qk_pair(q: torch.Tensor, k: torch.Tensor) -> None:
    """q [Hq, N, d] and k [Hkv, N, d] fit together: shapes, GQA, device, one float dtype.

    N is one sequence's length or, for a packed batch, the total over its sequences.
    """
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor):
        raise ValueError("q and k must be torch tensors")
    if q.dim() != 3:
        raise ValueError(f"q must be [Hq, N, d], got shape {tuple(q.shape)}")
    if k.dim() != 3:
        raise ValueError(f"k must be [Hkv, N, d], got shape {tuple(k.shape)}")
    hq, n, d = q.shape
    hkv, nk, dk = k.shape
    if nk != n or dk != d:
        raise ValueError(
            f"q and k shapes do not match: q {tuple(q.shape)} vs k {tuple(k.shape)} "
            "(sequence length and head dim must agree)"
        )
    if hkv < 1 or hq % hkv != 0:
        raise ValueError(f"Hq={hq} must be a positive multiple of Hkv={hkv} (GQA)")
    if q.device != k.device:
        raise ValueError(f"q and k are on different devices: {q.device} vs {k.device}")
    if not q.is_floating_point() or not k.is_floating_point():
        raise ValueError("q and k must be floating point tensors")
    if q.dtype != k.dtype:
        # Casting one to the other's dtype could overflow (inf -> NaN) or lose precision.
        raise ValueError(f"q and k must share a dtype, got {q.dtype} and {k.dtype}")


def check_finite_qk(q: torch.Tensor, k: torch.Tensor) -> None:
    if not bool(torch.isfinite(q).all()) or not bool(torch.isfinite(k).all()):
        raise ValueError("q and k must be finite (found NaN or inf)")


def check_lengths(n: int, prompt_len: int) -> None:
    if not isinstance(prompt_len, int) or isinstance(prompt_len, bool):
        raise ValueError(f"prompt_len must be an int, got {type(prompt_len).__name__}")
    if prompt_len < 1:
        raise ValueError(f"prompt_len must be >= 1, got {prompt_len}")
    if prompt_len >= n:
        raise ValueError(
            f"empty response: prompt_len={prompt_len} leaves no response token in N={n}"
        )


def check_horizon(window: Any, h_lo: Any, h_hi: Any) -> tuple[int, int, int | None]:
    """The contract's horizon check (anchorcredit.contract.check_horizon): (window, h_lo, h_hi)
    as ints, or an InputError (a ValueError) naming the argument.

    One engine-only extension: window=0 (WAAD identically 0) stays legal here, a degenerate
    case the backends' tests pin against each other; requests need window >= 1.
    """
    # numpy integers are not int subclasses: read them as the Python ints they hold.
    window, h_lo, h_hi = (
        v.item() if isinstance(v, np.generic) else v for v in (window, h_lo, h_hi)
    )
    zero_window = type(window) in (int, float) and window == 0
    horizon = contract.check_horizon(1 if zero_window else window, h_lo, h_hi, prefix="")
    return 0 if zero_window else horizon["window"], horizon["h_lo"], horizon["h_hi"]


def check_scale(scale: float | None, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    return float(scale)


def check_attention_variant(
    softcap: Any, sinks: Any, sliding_window: Any, q: torch.Tensor, *, check_finite: bool = True
) -> tuple[float | None, torch.Tensor | None, int | None]:
    """The model-true attention options of one layer, checked (module docstring of
    anchorcredit.engine.span): softcap a positive finite float or None, sinks a finite
    float tensor [Hq] on q's device or None, sliding_window an int >= 1 or None.
    check_finite=False skips reading the sinks' values (a device sync on a GPU): the
    runner's hot path, where a non-finite sink still shows as a non-finite statistic."""
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
            raise ValueError(f"softcap must be a positive number or None, got {softcap!r}")
        if not math.isfinite(softcap) or softcap <= 0:
            raise ValueError(f"softcap must be a positive finite number, got {softcap}")
        softcap = float(softcap)
    if sinks is not None:
        if not isinstance(sinks, torch.Tensor) or not sinks.is_floating_point():
            raise ValueError("sinks must be a floating point tensor [Hq] (one logit per head)")
        if tuple(sinks.shape) != (q.shape[0],):
            raise ValueError(
                f"sinks must have shape [Hq] = ({q.shape[0]},), got {tuple(sinks.shape)}"
            )
        if sinks.device != q.device:
            raise ValueError(f"sinks are on {sinks.device}, q on {q.device}")
        if check_finite and not bool(torch.isfinite(sinks).all()):
            raise ValueError("sinks must be finite")
    if sliding_window is not None:
        if isinstance(sliding_window, np.generic):
            sliding_window = sliding_window.item()
        if isinstance(sliding_window, bool) or not isinstance(sliding_window, int):
            raise ValueError(f"sliding_window must be an int or None, got {sliding_window!r}")
        if sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    return softcap, sinks, sliding_window
