"""ClientConfig: every setting of the light client, in one dataclass.

The transport, the client and every trainer adapter read this one object, so a setting, its
default and its environment variable are written once, here:

    cfg = ClientConfig(["credit-svc:50051"], cache="redis://redis:6379/0", timeout_s=30)
    cfg = ClientConfig.from_env()                 # ANCHORCREDIT_TARGETS, ANCHORCREDIT_CACHE...
    client = CreditClient(config=cfg)             # == CreditClient(targets, **settings)

Each field `x` that has a variable reads `ANCHORCREDIT_` + `X` (the field's name in capitals;
docs/CLIENT.md lists them). Fields without one (`channel_options`, `metrics_registry`) are
objects, not text: pass them in code.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

from anchorcredit.client.cache import DEFAULT_TTL_S
from anchorcredit.client.codec import DTYPES
from anchorcredit.client.keys import DEFAULT_NAMESPACE

ENV_PREFIX = "ANCHORCREDIT_"
_FALSE = ("0", "false", "no", "off")


def _flag(text: str) -> bool:
    return text.strip().lower() not in _FALSE


def _optional_int(text: str) -> int | None:
    return None if text.strip().lower() in ("", "none") else int(text)


def _targets(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _cache(text: str) -> str | bool | None:
    """ "" / "memory": the in-process LRU (None); "off" / "none": no cache; else a URL."""
    low = text.strip().lower()
    if low in ("", "memory"):
        return None
    if low in ("off", "none", "false", "0"):
        return False
    return text.strip()


def _env(parse: Callable[[str], Any]) -> dict[str, Any]:
    return {"env": parse}


@dataclass(frozen=True)
class ClientConfig:
    """Settings of a CreditClient, its transport and the adapters that build one.

    targets: "host:port", "dns:///name:port" or a list of them. cache: None -> in-process
    LRU bounded in bytes; "redis://..." -> Redis; False -> none; or any object with
    get_many/set_many. timeout_s: each RPC's deadline. retries: at most this many retries
    while no target answers (None: reconnect_budget_s alone bounds them; 0: none at all).
    Busy servers are retried until retry_budget_s has passed since the call began; waits
    are the server's hint plus backoff with full jitter (backoff_base_s doubling up to
    backoff_max_s). replica_wait_s: how long a call pinned to a version waits for a replica
    serving it. token / admin_token: bearer tokens (scoring; weight changes). tls,
    root_certificates, certificate_chain, private_key: TLS and mutual TLS (PEM bytes, PEM
    text or a file path). metrics_registry: where the client's Prometheus counters go
    (None: prometheus_client's global registry; counters.py).
    """

    targets: tuple[str, ...] = field(default=(), metadata=_env(_targets))
    cache: Any = field(default=None, metadata=_env(_cache))
    timeout_s: float = field(default=60.0, metadata=_env(float))
    retries: int | None = field(default=None, metadata=_env(_optional_int))
    _: KW_ONLY
    cache_ttl_s: int = field(default=DEFAULT_TTL_S, metadata=_env(int))
    cache_dtype: str = field(default="float32", metadata=_env(str))
    namespace: str = field(default=DEFAULT_NAMESPACE, metadata=_env(str))
    backoff_base_s: float = field(default=0.05, metadata=_env(float))
    backoff_max_s: float = field(default=5.0, metadata=_env(float))
    retry_budget_s: float = field(default=120.0, metadata=_env(float))
    reconnect_budget_s: float = field(default=60.0, metadata=_env(float))
    replica_wait_s: float = field(default=10.0, metadata=_env(float))
    token: str | None = field(default=None, metadata=_env(str))
    admin_token: str | None = field(default=None, metadata=_env(str))
    tls: bool = field(default=False, metadata=_env(_flag))
    root_certificates: bytes | str | None = field(default=None, metadata=_env(str))
    certificate_chain: bytes | str | None = field(default=None, metadata=_env(str))
    private_key: bytes | str | None = field(default=None, metadata=_env(str))
    channel_options: Sequence[tuple[str, Any]] = ()
    metrics_registry: Any = None

    def __post_init__(self) -> None:
        targets = self.targets
        if isinstance(targets, str):
            targets = (targets,)
        object.__setattr__(self, "targets", tuple(targets))
        object.__setattr__(self, "channel_options", tuple(self.channel_options))
        if not self.targets:
            raise ValueError(
                f"give at least one target (or set {ENV_PREFIX}TARGETS: comma-separated "
                "host:port list)"
            )
        if self.cache_dtype not in DTYPES:
            raise ValueError(f"cache_dtype must be one of {tuple(DTYPES)}")
        for name in ("timeout_s", "retry_budget_s", "reconnect_budget_s", "replica_wait_s"):
            if float(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")

    @classmethod
    def env_names(cls) -> dict[str, str]:
        """{field: its environment variable} for every field read from the environment."""
        return {
            f.name: ENV_PREFIX + f.name.upper()
            for f in dataclasses.fields(cls)
            if "env" in f.metadata
        }

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ClientConfig:
        """The settings the ANCHORCREDIT_* variables give (unset or empty: the default);
        `overrides` (field=value) win over the environment. A value that does not parse
        raises ValueError naming its variable."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            name = ENV_PREFIX + f.name.upper()
            if "env" not in f.metadata or f.name in overrides or not env.get(name):
                continue
            try:
                values[f.name] = f.metadata["env"](env[name])
            except ValueError as exc:
                raise ValueError(f"{name}={env[name]!r}: {exc}") from None
        values.update(overrides)
        return cls(**values)

    def replace(self, **changes: Any) -> ClientConfig:
        """A copy with `changes` applied (validated again)."""
        return dataclasses.replace(self, **changes)
