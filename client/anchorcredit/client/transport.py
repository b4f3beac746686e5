"""Channels to the targets and the unary call: round-robin, failover, retries with backoff.

`Transport.call` spreads calls round-robin over the targets; UNAVAILABLE and
RESOURCE_EXHAUSTED are retried (each attempt on the next target not recently found down)
after the server's retry hint plus 10 % jitter, at once when failing over to an untried
target, else after exponential backoff with full jitter. Other codes raise at once.
`Transport.call_one` calls one target exactly once. Weight changes go to every concrete
address behind every target (`expand_target`: a dns name resolved with getaddrinfo, gRPC's
`ipv4:a:p1,b:p2` list), each over its own channel (`Transport.address_stub`), so no
replica is left on old weights by round-robin.
"""

from __future__ import annotations

import itertools
import logging
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from anchorcredit.client.errors import CreditServiceError, from_rpc
from anchorcredit.v1 import credit_pb2_grpc as pb_grpc

log = logging.getLogger("anchorcredit.client")

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
# How long a target that answered UNAVAILABLE is passed over by round-robin.
DOWN_FOR_S = 1.0
# Retry hints servers may send: trailing metadata, or "retry after ~N ms" in the details.
_HINT_KEYS = {"grpc-retry-pushback-ms": 1e-3, "retry-after-ms": 1e-3, "retry-after": 1.0}
_HINT_TEXT = re.compile(r"retry after ~?\s*([0-9.]+)\s*(ms|s)\b", re.IGNORECASE)
_MAX_MESSAGE = 256 * 1024 * 1024


def _split_hostport(hostport: str) -> tuple[str, str]:
    """ "host:port", "[v6]:port" or "host" (gRPC's default port 443)."""
    if hostport.startswith("["):
        host, _, rest = hostport[1:].partition("]")
        return host, rest.removeprefix(":") or "443"
    if hostport.count(":") > 1:  # a bare IPv6 literal
        return hostport, "443"
    host, _, port = hostport.partition(":")
    return host, port or "443"


def expand_target(target: str) -> list[str]:
    """The concrete addresses ("ip:port", "[v6]:port") behind one target.

    "dns:///name:port", "dns://authority/name:port" and plain "name:port" (gRPC's default
    scheme is dns) are resolved now with socket.getaddrinfo; when a name has IPv4 addresses
    only those are used (a dual-stack pod has one of each: pushing to both would load it
    twice), else its IPv6 ones. "ipv4:a:p1,b:p2" / "ipv6:[a]:p1,[b]:p2" list them
    explicitly; "unix:" targets are one address. OSError when a name does not resolve.
    """
    t = target.strip()
    if t.startswith(("ipv4:", "ipv6:")):
        rest = t.split(":", 1)[1].removeprefix("//")
        return [a.strip() for a in rest.split(",") if a.strip()]
    if t.startswith(("unix:", "unix-abstract:", "vsock:")):
        return [t]
    rest = t
    if t.startswith("dns:"):
        rest = t[4:]
        if rest.startswith("//"):
            rest = rest[2:].partition("/")[2]
    host, port = _split_hostport(rest)
    infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    v4 = dict.fromkeys(i[4][0] for i in infos if i[0] == socket.AF_INET)
    v6 = dict.fromkeys(i[4][0] for i in infos if i[0] == socket.AF_INET6)
    if v4:
        return [f"{ip}:{port}" for ip in v4]
    return [f"[{ip}]:{port}" for ip in v6]


def _address_channel_target(address: str) -> str:
    if address.startswith(("unix:", "unix-abstract:", "vsock:")):
        return address
    return f"ipv6:{address}" if address.startswith("[") else f"ipv4:{address}"


def retry_hint(err: grpc.RpcError) -> float | None:
    """Seconds the server asked us to wait, if it said."""
    try:
        for key, value in err.trailing_metadata() or ():
            if key in _HINT_KEYS:
                return max(0.0, float(value) * _HINT_KEYS[key])
        m = _HINT_TEXT.search(err.details() or "")
    except Exception:  # a malformed hint is no hint
        return None
    if m:
        return float(m.group(1)) * (1e-3 if m.group(2).lower() == "ms" else 1.0)
    return None


class Transport:
    """One channel and stub per target ("host:port", "dns:///name:port")."""

    def __init__(
        self,
        targets: Sequence[str],
        timeout_s: float = 60.0,
        retries: int = 3,
        *,
        backoff_base_s: float = 0.05,
        backoff_max_s: float = 5.0,
        token: str | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
    ):
        if not targets:
            raise ValueError("give at least one target")
        self.targets = list(targets)
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        base = [
            ("grpc.max_receive_message_length", _MAX_MESSAGE),
            ("grpc.max_send_message_length", _MAX_MESSAGE),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_permit_without_calls", 0),
        ]
        # dns:/// targets with several addresses: spread over all of them
        options = [*base, ("grpc.lb_policy_name", "round_robin"), *channel_options]
        self._address_options = [*base, *channel_options]
        self._address_channels: dict[str, tuple[grpc.Channel, pb_grpc.CreditServiceStub]] = {}
        self._address_lock = threading.Lock()
        self._channels = [grpc.insecure_channel(t, options=options) for t in self.targets]
        self._stubs = [pb_grpc.CreditServiceStub(c) for c in self._channels]
        self._rr = itertools.count()
        self._down_until = [0.0] * len(self.targets)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        """Call metadata (the bearer token), for calls made outside this class."""
        return self._metadata

    def close(self) -> None:
        for c in self._channels:
            c.close()
        with self._address_lock:
            for c, _ in self._address_channels.values():
                c.close()
            self._address_channels.clear()

    def address_stub(self, address: str) -> pb_grpc.CreditServiceStub:
        """The stub of one concrete address (its own channel, created once, kept)."""
        with self._address_lock:
            entry = self._address_channels.get(address)
            if entry is None:
                ch = grpc.insecure_channel(
                    _address_channel_target(address), options=self._address_options
                )
                entry = self._address_channels[address] = (ch, pb_grpc.CreditServiceStub(ch))
            return entry[1]

    def addresses(self) -> tuple[list[str], dict[str, CreditServiceError]]:
        """Every concrete address behind the targets, resolved now, in target order without
        repeats; and {target: error} for targets that did not resolve."""
        out: dict[str, None] = {}
        failed: dict[str, CreditServiceError] = {}
        for t in self.targets:
            try:
                found = expand_target(t)
            except (OSError, ValueError) as exc:
                failed[t] = CreditServiceError(
                    grpc.StatusCode.UNAVAILABLE, f"cannot resolve {t}: {exc}", t
                )
                continue
            if not found:
                failed[t] = CreditServiceError(
                    grpc.StatusCode.UNAVAILABLE, f"{t} resolves to no address", t
                )
            out.update(dict.fromkeys(found))
        return list(out), failed

    def _pick(self, start: int, attempt: int) -> int:
        n = len(self.targets)
        now = time.monotonic()
        for j in range(n):  # the next target not recently found down, else the plain next
            ti = (start + attempt + j) % n
            if self._down_until[ti] <= now:
                return ti
        return (start + attempt) % n

    def _invoke(self, ti: int, method: str, request: Any) -> Any:
        fn: Callable[..., Any] = getattr(self._stubs[ti], method)
        return fn(request, timeout=self.timeout_s, metadata=self._metadata)

    def call(self, method: str, request: Any) -> Any:
        """Unary call on the next target with failover, retries and backoff; non-retryable
        codes raise CreditServiceError (StalePolicyVersionError) at once."""
        start = next(self._rr)
        tried: set[int] = set()
        last: grpc.RpcError | None = None
        last_target = ""
        for attempt in range(self.retries + 1):
            ti = self._pick(start, attempt)
            tried.add(ti)
            try:
                return self._invoke(ti, method, request)
            except grpc.RpcError as err:
                code = err.code()
                last, last_target = err, self.targets[ti]
                if code not in RETRYABLE:
                    raise from_rpc(err, self.targets[ti]) from None
                if code == grpc.StatusCode.UNAVAILABLE:
                    self._down_until[ti] = time.monotonic() + DOWN_FOR_S
                if attempt == self.retries:
                    break
                delay = self._delay(err, attempt, self._pick(start, attempt + 1) not in tried)
                log.info(
                    "%s on %s: %s; retry %d in %.3f s",
                    method,
                    self.targets[ti],
                    code.name,
                    attempt + 1,
                    delay,
                )
                time.sleep(delay)
        assert last is not None
        raise CreditServiceError(
            last.code(),
            f"{last.details()} (gave up after {self.retries + 1} attempts)",
            last_target,
        )

    def _delay(self, err: grpc.RpcError, attempt: int, next_untried: bool) -> float:
        """Seconds to wait before attempt + 1."""
        hint = retry_hint(err)
        if hint is not None:
            return hint * (1.0 + 0.1 * random.random())  # jitter: no thundering herd
        if err.code() == grpc.StatusCode.UNAVAILABLE and next_untried:
            return 0.0  # fail over to a target not tried yet right away
        cap = min(self.backoff_max_s, self.backoff_base_s * 2**attempt)
        return random.uniform(0.0, cap)  # full jitter

    def call_one(self, ti: int, method: str, request: Any) -> Any:
        """One call on target ti only: no failover, no retries."""
        try:
            return self._invoke(ti, method, request)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.UNAVAILABLE:
                self._down_until[ti] = time.monotonic() + DOWN_FOR_S
            raise from_rpc(err, self.targets[ti]) from None
