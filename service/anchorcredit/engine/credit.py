"""gamma_t (SPEC.md "Credit"): per-token multipliers of the advantage, >= 1, not renormalised.

Pure numpy (float64) so it is exact and cheap; torch tensors in give a torch tensor out
(same dtype and device as the first array given), numpy in gives numpy out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from anchorcredit.contract import DEFAULTS, STRATEGIES, CreditParams

# Which per-token inputs each strategy reads (the strategy names are the contract's).
NEEDS = {
    "uniform": (),
    "local_chunk": ("waad",),
    "global_anchor": ("fai",),
    "coupled_rhythm": ("waad", "fai"),
    "random": (),
    "entropy": ("entropy",),
}
if tuple(NEEDS) != STRATEGIES:  # a strategy added to the contract needs its inputs here
    raise ImportError(f"engine.credit.NEEDS names {tuple(NEEDS)}, the contract {STRATEGIES}")


def check_params(**values: Any) -> CreditParams:
    """The contract's validated CreditParams from keyword values (its defaults for the rest).

    The ranges live in one place (anchorcredit.contract); a bad value raises its InputError,
    a ValueError naming the parameter. numpy scalars (np.float32 has no float base class)
    are read as the Python numbers they hold, as before the contract checked them.
    """
    plain = {n: v.item() if isinstance(v, np.generic) else v for n, v in values.items()}
    return CreditParams(**plain)


def top_q_count(q: float, n: int) -> int:
    """ceil(q * n), robust to float noise (0.7 * 10 is 7.000000000000001 in binary)."""
    return math.ceil(round(q * n, 9))


def top_q_mask(x: np.ndarray, q: float) -> np.ndarray:
    """TopQ(x, q): the ceil(q*|R|) positions with the largest x, ties to the earlier position."""
    m = top_q_count(q, len(x))
    order = np.argsort(-x, kind="stable")  # stable: equal values keep position order
    mask = np.zeros(len(x), dtype=bool)
    mask[order[:m]] = True
    return mask


def waad_delta(waad: np.ndarray) -> np.ndarray:
    """Delta[t] = |WAAD[t] - WAAD[t+1]|, Delta[last] = 0."""
    delta = np.zeros_like(waad)
    delta[:-1] = np.abs(waad[:-1] - waad[1:])
    return delta


def coupled_rhythm_gamma(
    waad: np.ndarray,
    fai: np.ndarray,
    q: float,
    gamma_amp: float,
    alpha: float,
    k: int,
    tau_waad: float | None,
    tau_delta: float | None,
) -> np.ndarray:
    delta = waad_delta(waad)
    tau_w = float(np.median(waad)) if tau_waad is None else tau_waad
    tau_d = float(np.median(delta)) if tau_delta is None else tau_delta
    anchors = top_q_mask(fai, q)
    dominated = np.zeros(len(waad), dtype=bool)
    intro = np.zeros(len(waad), dtype=bool)
    for t in np.flatnonzero(anchors):
        lo = max(0, t - k)
        if lo >= t:  # no preceding response token: cannot be locally dominated
            continue
        window = delta[lo:t]
        u = lo + int(np.argmax(window))  # argmax ties go to the earlier position
        if waad[t] <= tau_w and window[u - lo] >= tau_d:
            dominated[t] = True
            intro[u] = True
    boost = gamma_amp - 1.0
    return (
        1.0
        + boost * (anchors & ~dominated)
        + (1.0 - alpha) * boost * dominated
        + alpha * boost * intro
    )


def _as_array(name: str, x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().to("cpu").double().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite (found NaN or inf)")
    return arr


def _output_like(gamma: np.ndarray, template: Any) -> Any:
    if hasattr(template, "detach"):
        import torch

        dtype = template.dtype if template.is_floating_point() else torch.float32
        return torch.as_tensor(gamma, dtype=dtype, device=template.device)
    if isinstance(template, np.ndarray) and template.dtype == np.float32:
        return gamma.astype(np.float32)
    return gamma


def credit(
    strategy: str,
    waad: Any = None,
    fai: Any = None,
    entropy: Any = None,
    q: float = DEFAULTS.q,
    gamma_amp: float = DEFAULTS.gamma_amp,
    alpha: float = DEFAULTS.alpha,
    k: int = DEFAULTS.k,
    tau_waad: float | None = DEFAULTS.tau_waad,
    tau_delta: float | None = DEFAULTS.tau_delta,
    seed: int | Sequence[int] = DEFAULTS.seed,
) -> Any:
    """gamma [R] for one response under `strategy` (SPEC.md). None thresholds = medians.

    The strategy and parameters are checked by the contract (one definition of the ranges);
    the arrays here: each strategy's inputs given, non-empty, finite, of one length.
    `seed` may also be a sequence of seeds (numpy's SeedSequence entropy): the runner seeds
    each response from the request's seed and the response's ids.
    """
    seeds = [seed] if isinstance(seed, int | np.integer) else list(seed)
    for part in seeds:  # each part is a seed as the contract bounds it
        check_params(seed=part)
    p = check_params(
        strategy=strategy,
        q=q,
        gamma_amp=gamma_amp,
        alpha=alpha,
        k=k,
        tau_waad=tau_waad,
        tau_delta=tau_delta,
    )
    given = {"waad": waad, "fai": fai, "entropy": entropy}
    for name in NEEDS[strategy]:
        if given[name] is None:
            raise ValueError(f"strategy {strategy!r} needs {name}")
    arrays = {n: _as_array(n, x) for n, x in given.items() if x is not None}
    if not arrays:
        raise ValueError("give at least one of waad, fai, entropy (it sets the response length)")
    lengths = {n: len(a) for n, a in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"waad, fai and entropy must have the same length, got {lengths}")
    r = next(iter(lengths.values()))
    q = p.q

    boost = p.gamma_amp - 1.0
    if strategy == "uniform":
        gamma = np.ones(r)
    elif strategy == "local_chunk":
        gamma = 1.0 + boost * top_q_mask(waad_delta(arrays["waad"]), q)
    elif strategy == "global_anchor":
        gamma = 1.0 + boost * top_q_mask(arrays["fai"], q)
    elif strategy == "random":
        noise = np.random.default_rng(seed).random(r)
        gamma = 1.0 + boost * top_q_mask(noise, q)
    elif strategy == "entropy":
        gamma = 1.0 + boost * top_q_mask(arrays["entropy"], q)
    else:
        gamma = coupled_rhythm_gamma(
            arrays["waad"], arrays["fai"], q, p.gamma_amp, p.alpha, p.k, p.tau_waad, p.tau_delta
        )
    template = next(x for x in (waad, fai, entropy) if x is not None)
    return _output_like(gamma, template)
