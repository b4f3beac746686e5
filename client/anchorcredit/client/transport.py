"""Channels to the targets and the unary call: round-robin, failover, retries with backoff.

`Transport.call` spreads calls round-robin over the targets. Whether a failed call is tried
again is the status table's verdict (anchorcredit.status: the server's `anchorcredit-
retryable` trailer, else UNAVAILABLE, RESOURCE_EXHAUSTED, and CANCELLED, which this client
never causes itself: a server stopping under the call); how long to wait and for how
long is the one retry policy's (retry_policy.py): each attempt goes to the next target not
recently found down. A busy server (RESOURCE_EXHAUSTED) is retried until
`retry_budget_s` has passed since the call began, each wait at least the server's hint
(trailing metadata) plus backoff with full jitter; UNAVAILABLE while every target is down
(a restart, a rollout) until `reconnect_budget_s` has passed since none answered (and at
most `retries` times when that is set; 0 = no retries at all); failing over from a down
target to one that is up is immediate and not counted. Other codes raise at once.
`Transport.call_one` calls one target exactly once. Weight changes go to every concrete
address behind every target (`resolve.expand_target`: a dns name resolved as gRPC does,
gRPC's `ipv4:a:p1,b:p2` list), each over its own channel (`Transport.address_stub`), so no
replica is left on old weights by round-robin; `call(..., addresses=[...])` spreads a call
over chosen addresses the same way `call` spreads it over the targets (replicas.py uses it
to reach only the replicas that serve a policy version). Each resolution closes the channels
of addresses that left the resolved set (pods gone behind a dns name), each once the last
call on it has ended.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from anchorcredit import status
from anchorcredit.client.config import ClientConfig
from anchorcredit.client.counters import ClientCounters
from anchorcredit.client.errors import CreditServiceError, from_rpc
from anchorcredit.client.resolve import dns_name, expand_target, split_hostport
from anchorcredit.client.retry_policy import RetryClock, RetryPolicy
from anchorcredit.v1 import credit_pb2 as pb
from anchorcredit.v1 import credit_pb2_grpc as pb_grpc

log = logging.getLogger("anchorcredit.client")

# How long a target that answered UNAVAILABLE is passed over by round-robin.
DOWN_FOR_S = 1.0
_MAX_MESSAGE = 256 * 1024 * 1024
# gRPC's own reconnection backoff (default 1 s growing to 120 s) would keep a channel to a
# restarted server failing fast long after it is back: cap it near the retry windows.
RECONNECT_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
)


def _address_channel_target(address: str) -> str:
    if address.startswith(("unix:", "unix-abstract:", "vsock:")):
        return address
    return f"ipv6:{address}" if address.startswith("[") else f"ipv4:{address}"


def _pem(value: bytes | str | None) -> bytes | None:
    """PEM bytes from bytes, PEM text or the path of a PEM file."""
    if value is None or isinstance(value, bytes):
        return value
    if "-----BEGIN" in value:
        return value.encode()
    with open(value, "rb") as f:
        return f.read()


def channel_credentials(
    tls: bool,
    root_certificates: bytes | str | None = None,
    certificate_chain: bytes | str | None = None,
    private_key: bytes | str | None = None,
) -> grpc.ChannelCredentials | None:
    """TLS channel credentials (None: plaintext). root_certificates: the CA to trust (None:
    the system roots); certificate_chain + private_key: the client's certificate for mutual
    TLS. Each is PEM bytes, PEM text or a file path."""
    given = root_certificates, certificate_chain, private_key
    if not tls:
        if any(v is not None for v in given):
            raise ValueError("root_certificates / certificate_chain / private_key need tls=True")
        return None
    if (certificate_chain is None) != (private_key is None):
        raise ValueError("certificate_chain and private_key go together (mutual TLS)")
    return grpc.ssl_channel_credentials(
        root_certificates=_pem(root_certificates),
        private_key=_pem(private_key),
        certificate_chain=_pem(certificate_chain),
    )


def is_loopback_target(target: str) -> bool:
    """True when the target is this machine (a token may travel there in cleartext)."""
    t = target.strip()
    if t.startswith(("unix:", "unix-abstract:", "vsock:")):
        return t.startswith(("unix:", "unix-abstract:"))
    if t.startswith(("ipv4:", "ipv6:")):
        rest = t.split(":", 1)[1].removeprefix("//")
        hosts = [split_hostport(a.strip())[0] for a in rest.split(",") if a.strip()]
    else:
        if t.startswith("dns:"):
            t = t[4:].removeprefix("//").partition("/")[2] if t[4:].startswith("//") else t[4:]
        hosts = [split_hostport(t)[0]]
    for host in hosts:
        if host == "localhost":
            continue
        try:
            if not ipaddress.ip_address(host).is_loopback:
                return False
        except ValueError:
            return False  # another name: not known to be local
    return bool(hosts)


def _trailers(err: grpc.RpcError) -> Any:
    try:
        return err.trailing_metadata() or ()
    except Exception:  # an error raised locally has none
        return ()


def retry_hint(err: grpc.RpcError) -> float | None:
    """Seconds the server asked us to wait (its trailing metadata), if it said."""
    return status.retry_hint_s(_trailers(err))


class _AddressChannel:
    """One address's channel and how many calls run on it: a channel dropped from the
    resolved set closes when its last call ends (closing fails the calls in flight)."""

    def __init__(self, channel: grpc.Channel):
        self.channel = channel
        self.stub = pb_grpc.CreditServiceStub(channel)
        # PushWeights with messages serialized by the caller (weights.weight_chunk_bytes:
        # one copy of the tensor bytes instead of three)
        self.stub.PushWeightsSerialized = channel.stream_unary(  # type: ignore[attr-defined]
            "/anchorcredit.v1.CreditService/PushWeights",
            request_serializer=None,
            response_deserializer=pb.UpdateWeightsResponse.FromString,
        )
        self.in_flight = 0
        self.dropped = False


class _AddressMethod:
    """One method of an address's stub: each call (plain, `.with_call`, `.future`) runs on
    the address's current channel and holds it open until the call ends."""

    def __init__(self, transport: Transport, address: str, method: str):
        self._transport, self._address, self._method = transport, address, method

    def _run(self, kind: str | None, *args: Any, **kwargs: Any) -> Any:
        entry = self._transport._hold(self._address)
        try:
            fn = getattr(entry.stub, self._method)
            result = fn(*args, **kwargs) if kind is None else getattr(fn, kind)(*args, **kwargs)
        except BaseException:
            self._transport._let_go(entry)
            raise
        if isinstance(result, grpc.Future):  # a future or a stream: held until it is done
            result.add_done_callback(lambda _: self._transport._let_go(entry))
        else:
            self._transport._let_go(entry)
        return result

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(None, *args, **kwargs)

    def with_call(self, *args: Any, **kwargs: Any) -> Any:
        return self._run("with_call", *args, **kwargs)

    def future(self, *args: Any, **kwargs: Any) -> Any:
        return self._run("future", *args, **kwargs)


class _AddressStub:
    """A CreditServiceStub bound to an address rather than to one channel."""

    def __init__(self, transport: Transport, address: str):
        self._transport, self._address = transport, address

    def __getattr__(self, method: str) -> _AddressMethod:
        if method.startswith("_"):
            raise AttributeError(method)
        return _AddressMethod(self._transport, self._address, method)


class Transport:
    """One channel and stub per target ("host:port", "dns:///name:port"), set up from a
    ClientConfig (config.py: the settings are declared there, once)."""

    def __init__(
        self,
        config: ClientConfig | Sequence[str] | str,
        counters: ClientCounters | None = None,
        **settings: Any,
    ):
        """config: a ClientConfig, or targets plus ClientConfig's settings as keywords.
        counters: where retries are counted (None: nowhere)."""
        if not isinstance(config, ClientConfig):
            config = ClientConfig(config, **settings)
        elif settings:
            config = config.replace(**settings)
        self.config = config
        self.counters = counters
        self.targets = list(config.targets)
        self.timeout_s = float(config.timeout_s)
        self.retries = None if config.retries is None else int(config.retries)
        self.policy = RetryPolicy(
            float(config.backoff_base_s), float(config.backoff_max_s),
            float(config.retry_budget_s), float(config.reconnect_budget_s),
        )  # fmt: skip
        token, admin_token = config.token, config.admin_token
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        # The admin token goes on weight-changing calls only (admin_metadata).
        self._admin_metadata = (
            (("authorization", f"Bearer {admin_token}"),) if admin_token else self._metadata
        )
        self._credentials = channel_credentials(
            config.tls, config.root_certificates, config.certificate_chain, config.private_key
        )
        if self._credentials is None and (token or admin_token):
            for t in self.targets:
                if not is_loopback_target(t):
                    log.warning(
                        "a token will be sent in cleartext to %s: use tls=True "
                        "(root_certificates=...) for targets off this machine",
                        t,
                    )
        base = [
            ("grpc.max_receive_message_length", _MAX_MESSAGE),
            ("grpc.max_send_message_length", _MAX_MESSAGE),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_permit_without_calls", 0),
        ]
        # dns:/// targets with several addresses: spread over all of them
        base += RECONNECT_OPTIONS
        options = [*base, ("grpc.lb_policy_name", "round_robin"), *config.channel_options]
        self._address_options = [*base, *config.channel_options]
        self._address_channels: dict[str, _AddressChannel] = {}
        self._address_lock = threading.Lock()
        # address -> the dns name it was resolved from (TLS checks the certificate for it)
        self._address_names: dict[str, str] = {}
        # target -> its addresses at its last successful resolution
        self._resolved: dict[str, list[str]] = {}
        self._channels = [self._channel(t, options) for t in self.targets]
        self._stubs = [pb_grpc.CreditServiceStub(c) for c in self._channels]
        self._rr = itertools.count()
        # target or address -> until when round-robin passes it over (it answered UNAVAILABLE)
        self._down: dict[str, float] = {}

    def _channel(self, target: str, options: Sequence[tuple[str, Any]]) -> grpc.Channel:
        if self._credentials is None:
            return grpc.insecure_channel(target, options=options)
        return grpc.secure_channel(target, self._credentials, options=options)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        """Call metadata (the scoring bearer token), for calls made outside this class."""
        return self._metadata

    @property
    def admin_metadata(self) -> tuple[tuple[str, str], ...] | None:
        """Metadata of the weight-changing calls: the admin token (else the scoring one)."""
        return self._admin_metadata

    def close(self) -> None:
        for c in self._channels:
            c.close()
        with self._address_lock:
            for entry in self._address_channels.values():
                entry.channel.close()
            self._address_channels.clear()

    def address_stub(self, address: str) -> pb_grpc.CreditServiceStub:
        """The stub of one concrete address (its own channel, opened on the first call and
        kept while the address stays in the resolved set)."""
        return _AddressStub(self, address)  # type: ignore[return-value]

    def _hold(self, address: str) -> _AddressChannel:
        """The address's channel (opened if needed), counted busy until `_let_go`."""
        with self._address_lock:
            entry = self._address_channels.get(address)
            if entry is None:
                options = list(self._address_options)
                name = self._address_names.get(address)
                if self._credentials is not None and name:
                    # an IP channel still checks the certificate for the name it came from
                    options.append(("grpc.ssl_target_name_override", name))
                ch = self._channel(_address_channel_target(address), options)
                entry = self._address_channels[address] = _AddressChannel(ch)
            entry.in_flight += 1
            return entry

    def _let_go(self, entry: _AddressChannel) -> None:
        with self._address_lock:
            entry.in_flight -= 1
            close = entry.dropped and entry.in_flight == 0
        if close:
            entry.channel.close()

    def _drop_unresolved(self) -> None:
        """Close the channels of addresses no target resolves to any more; one still
        running a call closes when that call ends."""
        with self._address_lock:
            live = {a for addresses in self._resolved.values() for a in addresses}
            idle = []
            for address in [a for a in self._address_channels if a not in live]:
                entry = self._address_channels.pop(address)
                entry.dropped = True
                if entry.in_flight == 0:
                    idle.append(entry)
            for address in [a for a in self._address_names if a not in live]:
                del self._address_names[address]
        for entry in idle:
            entry.channel.close()

    def resolve(self) -> tuple[dict[str, list[str]], dict[str, CreditServiceError]]:
        """{target: its concrete addresses}, resolved now; {target: error} for targets that
        did not resolve (or resolved to nothing). Channels of addresses that left the set
        are closed; a target that did not resolve keeps its earlier addresses."""
        found: dict[str, list[str]] = {}
        failed: dict[str, CreditServiceError] = {}
        for t in self.targets:
            try:
                addresses = expand_target(t)
            except (OSError, ValueError) as exc:
                failed[t] = CreditServiceError(
                    grpc.StatusCode.UNAVAILABLE, f"cannot resolve {t}: {exc}", t
                )
                continue
            if not addresses:
                failed[t] = CreditServiceError(
                    grpc.StatusCode.UNAVAILABLE, f"{t} resolves to no address", t
                )
                continue
            name = dns_name(t)
            if name:
                with self._address_lock:
                    self._address_names.update(dict.fromkeys(addresses, name))
            found[t] = addresses
        with self._address_lock:
            self._resolved.update(found)
        self._drop_unresolved()
        return found, failed

    def addresses(self) -> tuple[list[str], dict[str, CreditServiceError]]:
        """Every concrete address behind the targets, resolved now, in target order without
        repeats; and {target: error} for targets that did not resolve."""
        found, failed = self.resolve()
        out = dict.fromkeys(a for addresses in found.values() for a in addresses)
        return list(out), failed

    def _pick(self, names: Sequence[str], start: int, attempt: int) -> int:
        n = len(names)
        now = time.monotonic()
        for j in range(n):  # the next one not recently found down, else the plain next
            i = (start + attempt + j) % n
            if self._down.get(names[i], 0.0) <= now:
                return i
        return (start + attempt) % n

    def _invoke(self, ti: int, method: str, request: Any, timeout: float | None = None) -> Any:
        fn: Callable[..., Any] = getattr(self._stubs[ti], method)
        timeout = self.timeout_s if timeout is None else timeout
        return fn(request, timeout=timeout, metadata=self._metadata)

    def _invoke_address(self, address: str, method: str, request: Any) -> Any:
        fn: Callable[..., Any] = getattr(self.address_stub(address), method)
        return fn(request, timeout=self.timeout_s, metadata=self._metadata)

    @property
    def retry_budget_s(self) -> float:
        """How long a busy server (RESOURCE_EXHAUSTED) is retried, from the first attempt."""
        return self.policy.busy_budget_s

    @property
    def reconnect_budget_s(self) -> float:
        """How long UNAVAILABLE is retried while no target answers."""
        return self.policy.reconnect_budget_s

    def call(self, method: str, request: Any, *, addresses: Sequence[str] | None = None) -> Any:
        """Unary call on the next target with failover, retries and backoff; a status the
        table calls final raises CreditServiceError (StalePolicyVersionError) at once.

        addresses: spread over these concrete addresses (each over its own channel)
        instead of the targets. A busy server is retried while `retry_budget_s` (from the
        first attempt) lasts, UNAVAILABLE while `reconnect_budget_s` (from the moment no
        target answered) lasts and, when `retries` is set, at most that many times (0:
        never retry); the last wait is cut to end at the budget, then one more attempt."""
        names = self.targets if addresses is None else list(addresses)
        if not names:
            raise ValueError("no address to call")
        start = next(self._rr)
        busy = RetryClock(self.policy.busy_budget_s)
        down: RetryClock | None = None  # from the first moment no target answered
        tried: set[int] = set()
        attempt = unavailable = 0
        while True:
            ti = self._pick(names, start, attempt)
            tried.add(ti)
            try:
                if addresses is None:
                    return self._invoke(ti, method, request)
                return self._invoke_address(names[ti], method, request)
            except grpc.RpcError as err:
                if not status.retryable(err.code(), _trailers(err)):
                    raise from_rpc(err, names[ti]) from None
                all_down = self._note_down(err, names, names[ti])
                if all_down:
                    unavailable += 1
                    down = down or RetryClock(self.policy.reconnect_budget_s)
                else:
                    down = None  # some target answers: back to the busy budget
                clock = down or busy
                why = self._give_up(attempt, unavailable if all_down else 0, clock)
                if why:
                    raise CreditServiceError(
                        err.code(), f"{err.details()} ({why})", names[ti]
                    ) from None
                next_untried = self._pick(names, start, attempt + 1) not in tried
                n = unavailable - 1 if all_down else attempt
                delay = self._delay(err, n, next_untried)
                log.info(
                    "%s on %s: %s; retry %d in %.3f s",
                    method, names[ti], err.code().name, attempt + 1, min(delay, clock.left),
                )  # fmt: skip
                if self.counters is not None:
                    self.counters.retry(err.code().name)
                clock.sleep(delay)
                attempt += 1

    def _note_down(self, err: grpc.RpcError, names: Sequence[str], name: str) -> bool:
        """Mark `name` down on UNAVAILABLE (or a call a stopping server CANCELLED); True
        when every name is down now."""
        if err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
            return False
        now = time.monotonic()
        self._down[name] = now + DOWN_FOR_S
        return all(self._down.get(n, 0.0) > now for n in names)

    def _give_up(self, attempt: int, unavailable: int, clock: RetryClock) -> str:
        """Why to stop retrying now ("" to go on)."""
        if self.retries is not None and (self.retries <= 0 or unavailable > self.retries):
            return f"gave up after {attempt + 1} attempts (retries={self.retries})"
        if clock.left <= 0:
            name = "reconnect_budget_s" if unavailable else "retry_budget_s"
            return (
                f"gave up after {attempt + 1} attempts in {clock.elapsed:.1f} s "
                f"({name}={clock.budget_s:g})"
            )
        return ""

    def _delay(self, err: grpc.RpcError, attempt: int, next_untried: bool) -> float:
        """Seconds to wait before the next attempt (the retry policy): the server's hint
        (when it sent one) plus backoff with full jitter; none to fail over from a down
        target to one not tried yet."""
        hint = retry_hint(err)
        gone = err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        if hint is None and gone and next_untried:
            return 0.0
        return self.policy.wait(attempt, hint)

    def call_one(self, ti: int, method: str, request: Any) -> Any:
        """One call on target ti only: no failover, no retries."""
        try:
            return self._invoke(ti, method, request)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.UNAVAILABLE:
                self._down[self.targets[ti]] = time.monotonic() + DOWN_FOR_S
            raise from_rpc(err, self.targets[ti]) from None
