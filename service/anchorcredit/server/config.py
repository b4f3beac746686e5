"""Server configuration: one dataclass; every field is a `--flag` and an `ANCHORCREDIT_*` env var.

Precedence: command-line flag > environment variable > default. The mapping is mechanical
(`max_batch_tokens` <-> `--max-batch-tokens` <-> `ANCHORCREDIT_MAX_BATCH_TOKENS`) so that a
Kubernetes ConfigMap can set anything the CLI can.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from anchorcredit.weight_wire import CHUNK_BYTES

ENV_PREFIX = "ANCHORCREDIT_"
# Secrets that may come from a file (`--<name>-file`, `ANCHORCREDIT_<NAME>_FILE`) instead of
# the command line (visible in the process list) or the environment.
SECRET_FILES = ("auth_token", "admin_token")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
# gRPC service name used for per-service health (readiness means: model loaded).
SERVICE_NAME = "anchorcredit.v1.CreditService"


@dataclass(frozen=True)
class BatchLimits:
    """What the batcher is held to; the defaults here are THE server defaults (ServeConfig's
    flags, the batcher, `anchorcredit score` and the benches all read them from here)."""

    max_batch_tokens: int = 16384  # token budget of one device forward
    max_wait_s: float = 0.005  # how long an idle batcher waits to fill a batch
    max_batch_requests: int = 64  # most requests merged into one device batch
    max_queue: int = 256  # most requests waiting; beyond it RESOURCE_EXHAUSTED


DEFAULT_LIMITS = BatchLimits()


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class ServeConfig:
    """Everything `anchorcredit serve` can be told. Sizes in tokens, times in the unit named."""

    model: str | None = _opt(
        None,
        "model directory (safetensors + config.json); omitted: the embedded default "
        "(SmolLM2-135M-Instruct)",
    )
    host: str = _opt("0.0.0.0", "address to bind the gRPC server to")
    port: int = _opt(50051, "gRPC port (0 picks a free one)")
    metrics_port: int = _opt(9400, "Prometheus /metrics port (0 picks a free one, -1 disables)")
    metrics_host: str = _opt("0.0.0.0", "address to bind the metrics server to")
    device: str = _opt("auto", "cpu, cuda, cuda:N or auto (cuda when available)")
    dtype: str = _opt("auto", "float32, bfloat16, float16 or auto (bfloat16 on cuda, else float32)")
    layers: str | None = _opt(None, "comma-separated layer indices (default: SPEC middle third)")
    entropy: bool = _opt(
        False,
        "load every layer and the LM head so requests may ask for entropy (strategy "
        "'entropy' or outputs.entropy); default off: only the layers up to the last scored "
        "one are loaded (about 2/3 of the weights) and entropy requests get INVALID_ARGUMENT",
    )
    tensor_parallel: int = _opt(
        1,
        "shard the model by attention head over N processes (spawned here, or started by "
        "torchrun with N processes); one GPU each on CUDA; see docs/TENSOR_PARALLEL.md",
    )
    policy_version: str = _opt("0", "policy version the initial weights carry")
    max_batch_tokens: int = _opt(
        DEFAULT_LIMITS.max_batch_tokens, "token budget of one device batch"
    )
    max_wait_ms: float = _opt(
        DEFAULT_LIMITS.max_wait_s * 1000.0, "how long the batcher waits to fill a batch once idle"
    )
    max_batch_requests: int = _opt(
        DEFAULT_LIMITS.max_batch_requests, "most requests merged into one device batch"
    )
    max_queue: int = _opt(
        DEFAULT_LIMITS.max_queue, "most requests waiting; beyond it RESOURCE_EXHAUSTED"
    )
    max_request_sequences: int = _opt(1024, "most sequences in one ScoreRequest")
    max_request_tokens: int = _opt(
        0, "most tokens (prompt+response, all sequences) in one request; 0 = 8 x max_batch_tokens"
    )
    max_concurrent_rpcs: int = _opt(1024, "gRPC cap on concurrently handled RPCs")
    stream_window: int = _opt(8, "requests of one ScoreStream in flight at once")
    grace_s: float = _opt(30.0, "SIGTERM: seconds in-flight RPCs get to finish")
    shutdown_delay_s: float = _opt(
        0.0, "SIGTERM: seconds to keep serving while NOT_SERVING propagates (k8s: ~5)"
    )
    max_connection_age_s: float = _opt(
        300.0, "grpc.max_connection_age: clients reconnect and re-resolve (0 disables)"
    )
    keepalive_min_ping_s: float = _opt(10.0, "shortest client keepalive ping interval allowed")
    tls_cert: str | None = _opt(None, "PEM certificate chain; with --tls-key enables TLS")
    tls_key: str | None = _opt(None, "PEM private key for --tls-cert")
    tls_client_ca: str | None = _opt(
        None, "PEM CA bundle; with TLS, require client certificates it signed (mutual TLS)"
    )
    auth_token: str | None = _opt(
        None,
        "scoring token: require `authorization: Bearer <token>` on Score, ScoreStream and "
        "GetModelInfo (the admin token is accepted there too)",
        secret=True,
    )
    auth_token_file: str | None = _opt(None, "read --auth-token from this file (kept off argv)")
    admin_token: str | None = _opt(
        None,
        "admin token: required (`authorization: Bearer <token>`) on the weight-changing RPCs "
        "(UpdateWeights, PushWeights, Join/Receive/LeaveWeightGroup); unset: they are refused",
        secret=True,
    )
    admin_token_file: str | None = _opt(None, "read --admin-token from this file (kept off argv)")
    allow_unauthenticated_weights: bool = _opt(
        False,
        "DEVELOPMENT ONLY: without --admin-token, weight changes need only the scoring token "
        "(none when --auth-token is unset) and, without --weights-dir, UpdateWeights may load "
        "any path; logs a warning",
    )
    weights_dir: str | None = _opt(
        None,
        "UpdateWeights loads only checkpoints inside this directory (symlinks resolved, "
        "regular files only); unset: path loads are refused",
    )
    log_level: str = _opt("INFO", "logging level")

    def __post_init__(self) -> None:
        if self.max_batch_tokens < 1:
            raise ValueError("max_batch_tokens must be >= 1")
        if self.max_queue < 1 or self.max_batch_requests < 1 or self.stream_window < 1:
            raise ValueError("max_queue, max_batch_requests and stream_window must be >= 1")
        if self.tensor_parallel < 1:
            raise ValueError("tensor_parallel must be >= 1")
        if self.max_wait_ms < 0 or self.grace_s < 0 or self.shutdown_delay_s < 0:
            raise ValueError("max_wait_ms, grace_s and shutdown_delay_s must be >= 0")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.max_request_tokens <= 0:
            self.max_request_tokens = 8 * self.max_batch_tokens
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS)")
        for name in SECRET_FILES:
            path = getattr(self, name + "_file")
            if not path:
                continue
            if getattr(self, name):
                raise ValueError(f"give {flag_name(name)} or {flag_name(name + '_file')}, not both")
            try:
                with open(path, encoding="utf-8") as f:
                    value = f.read().strip()
            except OSError as exc:
                raise ValueError(f"{flag_name(name + '_file')}: {exc}") from None
            if not value:
                raise ValueError(f"{flag_name(name + '_file')}: {path} is empty")
            setattr(self, name, value)
        if self.auth_token and self.admin_token and self.auth_token == self.admin_token:
            raise ValueError("--auth-token and --admin-token must differ (two roles)")

    @property
    def layer_list(self) -> list[int] | None:
        if not self.layers:
            return None
        return [int(x) for x in str(self.layers).replace(" ", "").split(",") if x]

    @property
    def limits(self) -> BatchLimits:
        """The batcher's limits as configured (max_wait_ms in seconds)."""
        return BatchLimits(
            max_batch_tokens=self.max_batch_tokens,
            max_wait_s=self.max_wait_ms / 1000.0,
            max_batch_requests=self.max_batch_requests,
            max_queue=self.max_queue,
        )

    @property
    def max_receive_bytes(self) -> int:
        # A uint32 id is at most 5 varint bytes; each sequence adds a few bytes of framing.
        score = 5 * self.max_request_tokens + 16 * self.max_request_sequences + (1 << 16)
        # PushWeights: one WeightChunk carries up to CHUNK_BYTES of tensor data + a header.
        return max(score, CHUNK_BYTES + (1 << 16))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ServeConfig:
        """Defaults, then env vars, then `overrides` (used by tests and the CLI)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(env_name(f.name))
            if raw is not None and raw != "":
                values[f.name] = _parse(f, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _kind(f: Any) -> type:
    default = f.default
    if isinstance(default, bool):
        return bool
    if isinstance(default, int):
        return int
    if isinstance(default, float):
        return float
    return str


def _parse(f: Any, raw: str) -> Any:
    kind = _kind(f)
    if kind is bool:
        if raw.strip().lower() in _TRUE | _FALSE:
            return raw.strip().lower() in _TRUE
        raise ValueError(f"{env_name(f.name)}={raw!r} is not a boolean (1/0, true/false)")
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"{env_name(f.name)}={raw!r} is not a valid {kind.__name__}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field; defaults are left None so env vars can fill them in later."""
    for f in fields(ServeConfig):
        shown = "(unset)" if f.default is None else repr(f.default)
        if f.metadata.get("secret"):
            shown = "(unset)"
        if _kind(f) is bool:
            parser.add_argument(
                flag_name(f.name),
                dest=f.name,
                action="store_const",
                const=True,
                default=None,
                help=f"{f.metadata['help']} [env {env_name(f.name)}=1; default off]",
            )
            continue
        parser.add_argument(
            flag_name(f.name),
            dest=f.name,
            type=_kind(f),
            default=None,
            metavar=f.name.split("_")[-1].upper(),
            help=f"{f.metadata['help']} [env {env_name(f.name)}; default {shown}]",
        )


def env_table() -> list[tuple[str, str, str]]:
    """(flag, env var, default) rows for docs and --help epilogs."""
    return [
        (flag_name(f.name), env_name(f.name), "" if f.default is None else str(f.default))
        for f in fields(ServeConfig)
    ]


def from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> ServeConfig:
    """Flags given on the command line win over env vars, which win over defaults."""
    given = {f.name: getattr(args, f.name, None) for f in fields(ServeConfig)}
    for name in SECRET_FILES:
        if given.get(name):
            logging.getLogger(__name__).warning(
                "%s on the command line is visible in the process list; use %s or %s",
                flag_name(name),
                flag_name(name + "_file"),
                env_name(name + "_file"),
            )
    return ServeConfig.from_env(environ, **given)
