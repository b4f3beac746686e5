"""Proto <-> Python for the CreditService: request validation and result encoding.

Everything here is torch-free and synchronous. Validation raises `InputError` naming the
proto field (`params.q`, `sequences[3].response_ids`, ...) and, where one is at fault, the
sequence index; the servicer turns that into INVALID_ARGUMENT. Token ids against the
vocabulary and positions against the model's limit are the runner's `validate()`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from anchorcredit.errors import InputError
from anchorcredit.v1 import credit_pb2 as pb

# Same names as anchorcredit.engine.credit.STRATEGIES (a test keeps them equal); repeated
# here so request parsing does not import torch.
STRATEGIES = ("uniform", "local_chunk", "global_anchor", "coupled_rhythm", "random", "entropy")
DEFAULT_STRATEGY = "coupled_rhythm"
# SPEC.md defaults of the runner's score() keywords.
DEFAULTS: dict[str, Any] = dict(
    q=0.4,
    gamma_amp=1.5,
    alpha=0.5,
    k=3,
    tau_waad=None,
    tau_delta=None,
    seed=0,
    window=10,
    h_lo=10,
    h_hi=100,
    head_quantile=0.3,
)
_LE_F32 = np.dtype("<f4")
# gamma is in [1, gamma_amp]; this keeps it (and products with it) far inside float32.
MAX_GAMMA_AMP = 1e6


class NonFiniteResult(Exception):
    """The runner produced a NaN/inf output; it is never sent back (the RPC fails INTERNAL)."""


@dataclass
class ParsedRequest:
    """A validated ScoreRequest in the runner's terms."""

    pairs: list[tuple[Any, Any]]  # lists from the proto, int64 arrays once validated
    strategy: str
    params: dict[str, Any]
    with_entropy: bool
    outputs: tuple[bool, bool, bool, bool]  # waad, fai, gamma, entropy
    expected_policy_version: str
    request_id: str
    num_tokens: int
    key: tuple[Any, ...] = field(default=())

    def score_kwargs(self) -> dict[str, Any]:
        return dict(strategy=self.strategy, with_entropy=self.with_entropy, **self.params)


def _finite(name: str, value: float) -> float:
    if not math.isfinite(value):
        raise InputError(f"must be finite, got {value}", field=f"params.{name}")
    return float(value)


def _unit(name: str, value: float, lo_open: bool = False) -> float:
    value = _finite(name, value)
    if not (0.0 < value <= 1.0 if lo_open else 0.0 <= value <= 1.0):
        interval = "(0, 1]" if lo_open else "[0, 1]"
        raise InputError(f"must be in {interval}, got {value}", field=f"params.{name}")
    return value


def _horizon(name: str, value: int, max_positions: int | None) -> int:
    # Distances never exceed the model's max positions, so a larger horizon means nothing;
    # it is rejected (not clamped) so that the caller learns the real limit.
    if max_positions and value > max_positions:
        raise InputError(
            f"must be <= the model's max positions ({max_positions}), got {value}",
            field=f"params.{name}",
        )
    return int(value)


def parse_params(msg: pb.CreditParams, max_positions: int | None = None) -> dict[str, Any]:
    """CreditParams -> score() keywords with SPEC defaults for unset fields.

    `max_positions` (the model's) bounds window, h_lo and h_hi; None or 0 skips that check.
    """
    p = dict(DEFAULTS)
    if msg.HasField("q"):
        p["q"] = _unit("q", msg.q)
    if msg.HasField("gamma_amp"):
        p["gamma_amp"] = _finite("gamma_amp", msg.gamma_amp)
        if not 1.0 <= p["gamma_amp"] <= MAX_GAMMA_AMP:
            raise InputError(
                f"must be in [1, {MAX_GAMMA_AMP:g}] (gamma is in [1, gamma_amp]), "
                f"got {msg.gamma_amp}",
                field="params.gamma_amp",
            )
    if msg.HasField("alpha"):
        p["alpha"] = _unit("alpha", msg.alpha)
    if msg.HasField("k"):
        if msg.k < 1:
            raise InputError(f"must be >= 1, got {msg.k}", field="params.k")
        p["k"] = int(msg.k)
    if msg.HasField("tau_waad"):
        p["tau_waad"] = _finite("tau_waad", msg.tau_waad)
    if msg.HasField("tau_delta"):
        p["tau_delta"] = _finite("tau_delta", msg.tau_delta)
    if msg.HasField("seed"):
        p["seed"] = int(msg.seed)
    if msg.HasField("window"):
        if msg.window < 1:
            raise InputError(f"must be >= 1, got {msg.window}", field="params.window")
        p["window"] = _horizon("window", msg.window, max_positions)
    if msg.HasField("h_lo"):
        p["h_lo"] = _horizon("h_lo", msg.h_lo, max_positions)
    if msg.h_hi_to_end:
        if msg.HasField("h_hi"):
            raise InputError("give h_hi or h_hi_to_end, not both", field="params.h_hi")
        p["h_hi"] = None
    elif msg.HasField("h_hi"):
        p["h_hi"] = _horizon("h_hi", msg.h_hi, max_positions)
    if p["h_hi"] is not None and p["h_hi"] < p["h_lo"]:
        raise InputError(f"must be >= h_lo={p['h_lo']}, got {p['h_hi']}", field="params.h_hi")
    if msg.HasField("head_quantile"):
        p["head_quantile"] = _unit("head_quantile", msg.head_quantile, lo_open=True)
    return p


def parse_request(
    req: pb.ScoreRequest, max_sequences: int, max_tokens: int, max_positions: int | None = None
) -> ParsedRequest:
    """Validate the proto fields of a ScoreRequest; raise InputError naming the bad field."""
    strategy = req.strategy or DEFAULT_STRATEGY
    if strategy not in STRATEGIES:
        raise InputError(
            f"unknown strategy {req.strategy!r}; choose one of {', '.join(STRATEGIES)}",
            field="strategy",
        )
    n = len(req.sequences)
    if n == 0:
        raise InputError("at least one sequence is required", field="sequences")
    if n > max_sequences:
        raise InputError(
            f"{n} sequences exceed the limit of {max_sequences} per request (split the request)",
            field="sequences",
        )
    pairs: list[tuple[Any, Any]] = []
    total = 0
    for i, seq in enumerate(req.sequences):
        if len(seq.prompt_ids) == 0:
            raise InputError("needs at least 1 token", field=f"sequences[{i}].prompt_ids", index=i)
        if len(seq.response_ids) == 0:
            raise InputError(
                "needs at least 1 token", field=f"sequences[{i}].response_ids", index=i
            )
        prompt, response = list(seq.prompt_ids), list(seq.response_ids)
        total += len(prompt) + len(response)
        pairs.append((prompt, response))
    if total > max_tokens:
        raise InputError(
            f"{total} tokens exceed the limit of {max_tokens} per request (split the request)",
            field="sequences",
        )
    params = parse_params(req.params, max_positions)
    o = req.outputs
    outputs = (o.waad, o.fai, o.gamma, o.entropy)
    if not any(outputs):
        outputs = (True, True, True, False)
    with_entropy = bool(o.entropy) or strategy == "entropy"
    # Requests with equal keys can share one score() call.
    key = (strategy, with_entropy, tuple(sorted(params.items())))
    return ParsedRequest(
        pairs=pairs,
        strategy=strategy,
        params=params,
        with_entropy=with_entropy,
        outputs=outputs,
        expected_policy_version=req.expected_policy_version,
        request_id=req.request_id,
        num_tokens=total,
        key=key,
    )


def f32_bytes(x: Any, name: str = "output") -> bytes:
    """Little-endian float32 bytes of a 1-D array (what the proto's bytes fields carry).

    Raises NonFiniteResult rather than encode a NaN/inf (also one that overflows float32).
    """
    with np.errstate(over="ignore", invalid="ignore"):  # overflow -> inf, refused below
        arr = np.ascontiguousarray(np.asarray(x, dtype=_LE_F32).reshape(-1))
    if not np.isfinite(arr).all():
        raise NonFiniteResult(f"non-finite {name} from the runner")
    return arr.tobytes()


def from_f32_bytes(raw: bytes) -> np.ndarray:
    """Inverse of f32_bytes: a read-only float32 view, no copy."""
    return np.frombuffer(raw, dtype=_LE_F32)


def encode_result(result: Any, outputs: tuple[bool, bool, bool, bool]) -> pb.SequenceResult:
    """One runner ScoreResult -> SequenceResult with the requested arrays only."""
    want_waad, want_fai, want_gamma, want_entropy = outputs
    gamma = np.asarray(result.gamma)
    msg = pb.SequenceResult(response_len=int(gamma.shape[-1]))
    if want_waad:
        msg.waad = f32_bytes(result.waad, "waad")
    if want_fai:
        msg.fai = f32_bytes(result.fai, "fai")
    if want_gamma:
        msg.gamma = f32_bytes(gamma, "gamma")
    entropy = getattr(result, "entropy", None)
    if want_entropy and entropy is not None:
        msg.entropy = f32_bytes(entropy, "entropy")
    for layer, head in getattr(result, "local_heads", None) or ():
        msg.local_heads.add(layer=int(layer), head=int(head))
    for layer, head in getattr(result, "global_heads", None) or ():
        msg.global_heads.add(layer=int(layer), head=int(head))
    return msg


def model_info(
    info: dict[str, Any], max_request_sequences: int, server_version: str, stat_version: str
) -> pb.ModelInfo:
    """Scorer.info() dict -> ModelInfo (unknown keys ignored, missing ones left empty)."""

    def s(k: str) -> str:
        v = info.get(k)
        return "" if v is None else str(v)

    def u(k: str) -> int:
        v = info.get(k)
        return int(v) if v is not None else 0

    return pb.ModelInfo(
        model_id=s("model_id"),
        revision=s("revision"),
        architecture=s("architecture"),
        dtype=s("dtype"),
        device=s("device"),
        num_layers=u("num_layers"),
        layers=[int(x) for x in info.get("layers") or ()],
        num_heads=u("num_heads"),
        num_kv_heads=u("num_kv_heads"),
        head_dim=u("head_dim"),
        vocab_size=u("vocab_size"),
        max_positions=u("max_positions"),
        max_batch_tokens=u("max_batch_tokens"),
        max_request_sequences=max_request_sequences,
        policy_version=s("policy_version"),
        kernel_backend=s("kernel_backend"),
        server_version=server_version,
        stat_version=stat_version,
    )
