"""reweight: A~_t = gamma_t * A_t on a padded [B, T] batch (SPEC.md "Credit", sign rule).

Works on numpy arrays and on torch tensors without importing torch for numpy input (the
client stays torch-free): torch is only touched when the caller already hands us a tensor,
and then the result keeps that tensor's dtype and device.

Gammas are given per sequence, as variable-length arrays of len(response) (what
`CreditClient.score` returns); they are placed onto the mask's True positions of each row in
order, so left padding, right padding or holes (multi-turn tool output) all work. A dense
[B, T] gamma array of the mask's shape is accepted as is.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

SIGNS = ("both", "positive_only")


def _is_torch_tensor(x: Any) -> bool:
    # Look torch up in sys.modules instead of importing it: a tensor can only exist if torch
    # has been imported already, so numpy callers never pay for (or need) torch.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _to_numpy(x: Any) -> np.ndarray:
    if _is_torch_tensor(x):
        return x.detach().to("cpu").numpy()
    return np.asarray(x)


def gamma_matrix(gammas: Any, response_mask: Any) -> np.ndarray:
    """Dense float32 [B, T] gamma: per-sequence gammas on the mask's True positions, 1 elsewhere.

    `gammas` is either a sequence of B 1-D arrays (row i has mask[i].sum() values) or a dense
    array of the mask's shape (used as is, 1 outside the mask).
    """
    mask = _to_numpy(response_mask).astype(bool, copy=False)
    if mask.ndim != 2:
        raise ValueError(f"response_mask must be [B, T], got shape {mask.shape}")
    out = np.ones(mask.shape, dtype=np.float32)
    dense = None
    if not isinstance(gammas, (list, tuple)):
        arr = _to_numpy(gammas)
        if arr.dtype != object and arr.shape == mask.shape:
            dense = arr
    if dense is not None:
        out[mask] = dense[mask]
        return out
    rows: Sequence[Any] = list(gammas)
    if len(rows) != mask.shape[0]:
        raise ValueError(f"got {len(rows)} gamma arrays for a batch of {mask.shape[0]} rows")
    counts = mask.sum(axis=1)
    flat = []
    for i, g in enumerate(rows):
        g = _to_numpy(g).reshape(-1)
        if len(g) != counts[i]:
            raise ValueError(
                f"row {i}: {len(g)} gamma values but the response mask has {counts[i]} tokens"
            )
        flat.append(g.astype(np.float32, copy=False))
    if flat:
        # Boolean assignment walks the mask row-major: row by row, positions in order.
        out[mask] = np.concatenate(flat)
    return out


def reweight(advantages: Any, gammas: Any, response_mask: Any, sign: str = "both") -> Any:
    """Return gamma * advantages as [B, T], same type (numpy/torch), dtype and device.

    advantages: [B, T] per-token or [B] per-sequence (broadcast along T, as TRL's GRPO has).
    gammas: B variable-length arrays (len = response tokens of row i) or a dense [B, T] array.
    response_mask: [B, T] bool/int, True on response tokens (any padding side).
    sign: "both" (paper v2, default) scales every advantage; "positive_only" (v1) scales only
    where A >= 0. Outside the mask advantages pass through unchanged.
    """
    if sign not in SIGNS:
        raise ValueError(f"sign must be one of {SIGNS}, got {sign!r}")
    g = gamma_matrix(gammas, response_mask)
    if _is_torch_tensor(advantages):
        torch = sys.modules["torch"]
        adv = advantages if advantages.dim() == 2 else advantages.unsqueeze(-1)
        if adv.shape[0] != g.shape[0] or adv.shape[1] not in (1, g.shape[1]):
            raise ValueError(f"advantages {tuple(advantages.shape)} do not fit mask {g.shape}")
        gt = torch.from_numpy(g).to(device=advantages.device, dtype=advantages.dtype)
        if sign == "positive_only":
            gt = torch.where(adv >= 0, gt, torch.ones_like(gt))
        return adv * gt
    adv_np = np.asarray(advantages)
    adv2 = adv_np if adv_np.ndim == 2 else adv_np[:, None]
    if adv2.shape[0] != g.shape[0] or adv2.shape[1] not in (1, g.shape[1]):
        raise ValueError(f"advantages {adv_np.shape} do not fit mask {g.shape}")
    dtype = adv_np.dtype if np.issubdtype(adv_np.dtype, np.floating) else np.float32
    gd = g.astype(dtype, copy=False)
    if sign == "positive_only":
        gd = np.where(adv2 >= 0, gd, np.ones_like(gd))
    return (adv2 * gd).astype(dtype, copy=False)
