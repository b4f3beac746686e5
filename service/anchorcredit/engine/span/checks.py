"""Argument checks shared by every backend: clear ValueErrors, never a silent wrong answer."""

from __future__ import annotations

import math

import torch


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


def check_horizon(window: int, h_lo: int, h_hi: int | None) -> None:
    if int(window) != window or window < 0:
        raise ValueError(f"window must be a non-negative int, got {window}")
    if int(h_lo) != h_lo or h_lo < 0:
        raise ValueError(f"h_lo must be a non-negative int, got {h_lo}")
    if h_hi is not None and (int(h_hi) != h_hi or h_hi < h_lo):
        raise ValueError(f"h_hi must be None or an int >= h_lo={h_lo}, got {h_hi}")


def check_scale(scale: float | None, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    return float(scale)
