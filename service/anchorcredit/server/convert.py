"""Proto <-> Python for the CreditService: request parsing and result encoding.

Everything here is torch-free and synchronous. Parameters become the contract's validated
CreditParams (anchorcredit.contract: defaults, ranges, strategy names); request limits are
checked here; token ids are checked once, against the model, by the backend's validate()
at the servicer's edge. Every error is an `InputError` naming the proto field
(`params.q`, `sequences[3].response_ids`, ...) and, where one is at fault, the sequence
index; the servicer turns it into INVALID_ARGUMENT.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from anchorcredit.backend import ModelInfo, ScoreResult
from anchorcredit.contract import CreditParams
from anchorcredit.errors import InputError, NonFiniteResult  # noqa: F401 - re-exported
from anchorcredit.v1 import credit_pb2 as pb
from anchorcredit.weight_wire import WeightUpdateSpec

_LE_F32 = np.dtype("<f4")


@dataclass
class ParsedRequest:
    """A ScoreRequest in the backend's terms. `pairs` holds the proto's id lists until the
    servicer validates them into TokenPairs."""

    pairs: list[Any]  # (prompt_ids, response_ids) from the proto, then TokenPairs
    params: CreditParams
    with_entropy: bool
    outputs: tuple[bool, bool, bool, bool]  # waad, fai, gamma, entropy
    expected_policy_version: str
    request_id: str
    num_tokens: int
    key: tuple[Any, ...] = field(default=())


def parse_params(
    strategy: str, msg: pb.CreditParams, max_positions: int | None = None
) -> CreditParams:
    """Strategy + CreditParams -> the contract's CreditParams (unset fields: SPEC defaults).

    `max_positions` (the model's) bounds window, h_lo and h_hi; None or 0 skips that check.
    """
    return CreditParams.from_proto(strategy, msg, max_positions)


def parse_request(
    req: pb.ScoreRequest, max_sequences: int, max_tokens: int, max_positions: int | None = None
) -> ParsedRequest:
    """Validate the proto fields of a ScoreRequest; raise InputError naming the bad field."""
    params = parse_params(req.strategy, req.params, max_positions)
    n = len(req.sequences)
    if n == 0:
        raise InputError("at least one sequence is required", field="sequences")
    if n > max_sequences:
        raise InputError(
            f"{n} sequences exceed the limit of {max_sequences} per request (split the request)",
            field="sequences",
        )
    pairs = [(seq.prompt_ids, seq.response_ids) for seq in req.sequences]
    total = sum(len(p) + len(r) for p, r in pairs)
    if total > max_tokens:
        raise InputError(
            f"{total} tokens exceed the limit of {max_tokens} per request (split the request)",
            field="sequences",
        )
    o = req.outputs
    outputs = (o.waad, o.fai, o.gamma, o.entropy)
    if not any(outputs):
        outputs = (True, True, True, False)
    with_entropy = bool(o.entropy) or params.needs_entropy
    return ParsedRequest(
        pairs=pairs,
        params=params,
        with_entropy=with_entropy,
        outputs=outputs,
        expected_policy_version=req.expected_policy_version,
        request_id=req.request_id,
        num_tokens=total,
        key=(params, with_entropy),  # requests with equal keys can share one forward
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


def encode_result(result: ScoreResult, outputs: tuple[bool, bool, bool, bool]) -> pb.SequenceResult:
    """One ScoreResult -> SequenceResult with the requested arrays only."""
    want_waad, want_fai, want_gamma, want_entropy = outputs
    gamma = np.asarray(result.gamma)
    msg = pb.SequenceResult(response_len=int(gamma.shape[-1]))
    if want_waad:
        msg.waad = f32_bytes(result.waad, "waad")
    if want_fai:
        msg.fai = f32_bytes(result.fai, "fai")
    if want_gamma:
        msg.gamma = f32_bytes(gamma, "gamma")
    if want_entropy and result.entropy is not None:
        msg.entropy = f32_bytes(result.entropy, "entropy")
    for layer, head in result.local_heads:
        msg.local_heads.add(layer=int(layer), head=int(head))
    for layer, head in result.global_heads:
        msg.global_heads.add(layer=int(layer), head=int(head))
    return msg


def model_info(
    info: ModelInfo,
    *,
    max_batch_tokens: int,
    max_request_sequences: int,
    server_version: str,
    max_request_tokens: int = 0,
) -> pb.ModelInfo:
    """The backend's ModelInfo plus the server's limits -> the proto ModelInfo."""
    return pb.ModelInfo(
        model_id=info.model_id,
        revision=info.revision,
        architecture=info.architecture,
        dtype=info.dtype,
        device=info.device,
        num_layers=info.num_layers,
        layers=list(info.layers),
        num_heads=info.num_heads,
        num_kv_heads=info.num_kv_heads,
        head_dim=info.head_dim,
        vocab_size=info.vocab_size,
        max_positions=info.max_positions or 0,
        max_batch_tokens=max_batch_tokens,
        max_request_sequences=max_request_sequences,
        policy_version=info.policy_version,
        kernel_backend=info.kernel_backend,
        server_version=server_version,
        stat_version=info.stat_version,
        max_request_tokens=max_request_tokens,
        loaded_param_count=info.loaded_param_count,
        total_param_count=info.total_param_count,
        weights_digest=info.weights_digest,
    )


def weight_update(msg: pb.WeightUpdate) -> WeightUpdateSpec:
    """The proto WeightUpdate -> the spec whose check() holds the version rules."""
    return WeightUpdateSpec(version=msg.version, replaces=msg.replaces, partial=msg.partial)


def tensor_header(msg: pb.TensorHeader) -> tuple[str, str, tuple[int, ...]]:
    """(name, dtype, shape) of a TensorHeader (checked against the model by the stage)."""
    return msg.name, msg.dtype, tuple(int(d) for d in msg.shape)
