"""The parameter contract: SPEC.md's strategies, defaults and ranges in one torch-free place.

Everything that takes credit parameters (the proto parser, the runner, the engine's credit(),
the client's cache keys, the CLI's flags) builds one validated, frozen `CreditParams` here
and reads its defaults from here; nothing else restates a default, a range or a strategy
name. `STAT_VERSION` names the definition of the statistics: bump it whenever a change
alters any number for the same input, and every cache key changes with it.

Bad values raise `InputError` (a ValueError) naming the field as the proto spells it
(`params.q`, `strategy`), so the server turns it into INVALID_ARGUMENT unchanged.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Any

from anchorcredit.errors import InputError, clip

# Version of the statistics' definition (SPEC.md + our [ours] choices). Served in
# ModelInfo.stat_version and hashed into every cache key.
STAT_VERSION = "1"

STRATEGIES = ("uniform", "local_chunk", "global_anchor", "coupled_rhythm", "random", "entropy")
DEFAULT_STRATEGY = "coupled_rhythm"
# How h_hi = "the whole rest of the response" (SPEC.md's analysis variant) is spelled by
# users; the runner and engine use None, the proto h_hi_to_end=true.
H_HI_END = "end"
# gamma is in [1, gamma_amp]; this bound keeps it (and products with it) far inside float32.
MAX_GAMMA_AMP = 1e6
# Exclusive upper bounds of the proto's integer fields (uint32; seed is uint64).
UINT32_END = 2**32
UINT64_END = 2**64

# What each parameter means, for --help texts and docs (defaults are the dataclass's).
HELP: dict[str, str] = {
    "q": "TopQ fraction of response tokens boosted",
    "gamma_amp": "gamma of a boosted token (gamma is in [1, gamma_amp])",
    "alpha": "coupled_rhythm: share of a dominated anchor's boost moved to its intro token",
    "k": "coupled_rhythm: look-back (tokens) for the intro token",
    "tau_waad": "coupled_rhythm WAAD threshold (default: median WAAD over the response)",
    "tau_delta": "coupled_rhythm Delta threshold (default: median Delta over the response)",
    "seed": "random strategy seed",
    "window": "WAAD window W",
    "h_lo": "FAI horizon start H_lo",
    "h_hi": f"FAI horizon end H_hi, an int or '{H_HI_END}' (to the end of the response)",
    "head_quantile": "share of heads in each head class (local and global)",
}
# The parameters credit() takes (the rest shape the statistics).
CREDIT_FIELDS = ("q", "gamma_amp", "alpha", "k", "tau_waad", "tau_delta", "seed")
HORIZON_FIELDS = ("window", "h_lo", "h_hi")


def _err(name: str, message: str, prefix: str) -> InputError:
    return InputError(message, field=f"{prefix}{name}")


def _real(name: str, value: Any, prefix: str) -> float:
    # numbers.Real: numpy scalars too (np.float32 is no float subclass)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _err(name, f"must be a number, got {clip(value)}", prefix)
    value = float(value)
    if not math.isfinite(value):
        raise _err(name, f"must be finite, got {value}", prefix)
    return value


def _integer(name: str, value: Any, lo: int, end: int, prefix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or int(value) != value:
        raise _err(name, f"must be an integer, got {clip(value)}", prefix)
    value = int(value)
    if not lo <= value < end:
        raise _err(name, f"must be in [{lo}, 2**{end.bit_length() - 1}), got {value}", prefix)
    return value


def _interval(name: str, value: float, lo: float, hi: float, lo_open: bool, prefix: str) -> float:
    if not (lo < value <= hi if lo_open else lo <= value <= hi):
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise _err(name, f"must be in {interval}, got {value:g}", prefix)
    return value


@dataclass(frozen=True)
class CreditParams:
    """One request's strategy and every SPEC.md parameter, validated; hashable (batch key).

    Build it with `CreditParams.build(...)` from loose values (the client, the CLI, Python
    callers) or `from_proto` on the server; the constructor validates too.
    """

    strategy: str = DEFAULT_STRATEGY
    q: float = 0.4  # TopQ fraction [paper]
    gamma_amp: float = 1.5  # gamma of a boosted token [paper]
    alpha: float = 0.5  # coupled_rhythm split [ours]
    k: int = 3  # coupled_rhythm look-back [paper: 1..3]
    tau_waad: float | None = None  # None: median WAAD over the response [ours]
    tau_delta: float | None = None  # None: median Delta over the response [ours]
    seed: int = 0  # random strategy seed
    window: int = 10  # WAAD window W [paper]
    h_lo: int = 10  # FAI horizon start [paper]
    h_hi: int | None = 100  # FAI horizon end [paper]; None: to the end of the response
    head_quantile: float = 0.3  # head-class share [paper]

    def __post_init__(self) -> None:
        self._validate(prefix="params.")

    def _validate(self, prefix: str) -> None:
        """Check and coerce every field to its type (frozen: through object.__setattr__)."""
        if self.strategy not in STRATEGIES:
            raise InputError(
                f"unknown strategy {clip(self.strategy)}; choose one of {', '.join(STRATEGIES)}",
                field="strategy",
            )
        real = {n: _real(n, getattr(self, n), prefix) for n in ("q", "gamma_amp", "alpha")}
        _interval("q", real["q"], 0.0, 1.0, False, prefix)
        _interval("gamma_amp", real["gamma_amp"], 1.0, MAX_GAMMA_AMP, False, prefix)
        _interval("alpha", real["alpha"], 0.0, 1.0, False, prefix)
        real["head_quantile"] = _interval(
            "head_quantile",
            _real("head_quantile", self.head_quantile, prefix),
            0.0,
            1.0,
            True,
            prefix,
        )
        for n in ("tau_waad", "tau_delta"):
            v = getattr(self, n)
            real[n] = None if v is None else _real(n, v, prefix)
        ints = {
            "k": _integer("k", self.k, 1, UINT32_END, prefix),
            "seed": _integer("seed", self.seed, 0, UINT64_END, prefix),
        }
        horizon = check_horizon(self.window, self.h_lo, self.h_hi, prefix)
        for name, value in {**real, **ints, **horizon}.items():
            object.__setattr__(self, name, value)

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def build(cls, strategy: str | None = None, **values: Any) -> CreditParams:
        """From loose keyword values; unknown names are refused.

        A value of None means the default, except `h_hi`, where None (the runner's spelling)
        and "end" both mean "to the end of the response": leave h_hi out for the default.
        """
        known = {f.name for f in fields(cls)} - {"strategy"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(
                f"unknown credit parameter(s) {', '.join(map(repr, unknown))}; "
                f"known: {', '.join(sorted(known))}",
                field="params",
            )
        kw: dict[str, Any] = {}
        for name, value in values.items():
            if name == "h_hi":
                kw["h_hi"] = parse_h_hi(value)
            elif value is not None:
                kw[name] = value
        return cls(strategy=strategy or DEFAULT_STRATEGY, **kw)

    @classmethod
    def from_proto(cls, strategy: str, msg: Any, max_positions: int | None = None) -> CreditParams:
        """From an anchorcredit.v1 ScoreRequest's strategy and CreditParams: unset fields take
        the defaults; h_hi_to_end=true is h_hi=None. `max_positions` (the model's) bounds the
        horizons first, so the caller hears of the real limit before anything else."""
        kw = {n: getattr(msg, n) for n in _PARAM_NAMES if n != "h_hi" and msg.HasField(n)}
        if msg.h_hi_to_end:
            if msg.HasField("h_hi"):
                raise InputError("give h_hi or h_hi_to_end, not both", field="params.h_hi")
            kw["h_hi"] = None
        elif msg.HasField("h_hi"):
            kw["h_hi"] = msg.h_hi
        check_positions(kw, max_positions)
        return cls(strategy=strategy or DEFAULT_STRATEGY, **kw)

    # -- views -----------------------------------------------------------------------------
    def proto_fields(self) -> dict[str, Any]:
        """Keyword arguments of anchorcredit.v1.CreditParams carrying every effective value
        (the strategy travels separately in ScoreRequest.strategy)."""
        out = {n: getattr(self, n) for n in _PARAM_NAMES if getattr(self, n) is not None}
        if self.h_hi is None:
            out["h_hi_to_end"] = True
        return out

    def credit_kwargs(self) -> dict[str, Any]:
        """The keywords of engine.credit() (besides the strategy and the arrays)."""
        return {n: getattr(self, n) for n in CREDIT_FIELDS}

    def record(self) -> dict[str, Any]:
        """Every effective parameter as JSON-able values (h_hi "end" for None), strategy
        included: what an output file records and what resuming compares."""
        out = asdict(self)
        if out["h_hi"] is None:
            out["h_hi"] = H_HI_END
        return out

    @property
    def needs_entropy(self) -> bool:
        return self.strategy == "entropy"


_PARAM_NAMES = tuple(f.name for f in fields(CreditParams) if f.name != "strategy")


def parse_h_hi(value: Any) -> int | None:
    """h_hi as users write it (an int, "end"/"none", None) -> the runner's int | None."""
    if value is None:
        return None
    if isinstance(value, str):
        if value.strip().lower() in (H_HI_END, "none"):
            return None
        try:
            return int(value)
        except ValueError:
            raise InputError(
                f"must be an int or '{H_HI_END}', got {clip(value)}", field="params.h_hi"
            ) from None
    return value


def check_positions(horizons: dict[str, Any], max_positions: int | None) -> None:
    """Horizons a caller set beyond the model's positions mean nothing: refuse them (not
    clamp) so the caller learns the real limit. None or 0 skips the check. Defaults are not
    checked (a small model with positions < the default h_hi still scores)."""
    if not max_positions:
        return
    for name in HORIZON_FIELDS:
        value = horizons.get(name)
        if value is not None and value > max_positions:
            raise InputError(
                f"must be <= the model's max positions ({max_positions}), got {value}",
                field=f"params.{name}",
            )


def check_horizon(
    window: Any, h_lo: Any, h_hi: Any, prefix: str = "params."
) -> dict[str, int | None]:
    """window >= 1, h_lo >= 0, h_hi None or >= h_lo (all below 2**32): the horizons as ints.

    Shared by CreditParams and the engine's span functions (which take them directly).
    """
    out: dict[str, int | None] = {
        "window": _integer("window", window, 1, UINT32_END, prefix),
        "h_lo": _integer("h_lo", h_lo, 0, UINT32_END, prefix),
        "h_hi": None,
    }
    if h_hi is not None:
        out["h_hi"] = _integer("h_hi", h_hi, 0, UINT32_END, prefix)
        if out["h_hi"] < out["h_lo"]:
            raise _err("h_hi", f"must be >= h_lo={out['h_lo']}, got {h_hi}", prefix)
    return out


# The SPEC defaults, for signatures and help texts that show them.
DEFAULTS = CreditParams()
