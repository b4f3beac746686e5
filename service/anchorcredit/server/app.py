"""Build, start and stop the grpc.aio server: CreditService + health + reflection + /metrics.

Lifecycle
  start()  bind the port, serve health (CreditService NOT_SERVING) and /metrics at once, so
           probes and clients get answers (UNAVAILABLE) while the model loads.
  load()   build the backend (the runner's Scorer) on the device thread, start the batcher,
           flip health to SERVING.
  stop()   health NOT_SERVING everywhere, optionally keep serving `shutdown_delay_s` while
           that propagates, stop accepting RPCs, give in-flight ones `grace_s` to finish,
           drain the batcher, close /metrics.
`serve(config)` runs that under SIGTERM/SIGINT handlers and returns the exit code.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from anchorcredit.backend import ServingBackend
from anchorcredit.errors import StartupError
from anchorcredit.server.auth import BearerTokenInterceptor
from anchorcredit.server.batcher import Batcher
from anchorcredit.server.bounded import abandoned_threads, observe_abandoned
from anchorcredit.server.config import SERVICE_NAME, ServeConfig
from anchorcredit.server.frames import MalformedFrameInterceptor
from anchorcredit.server.metrics import MetricsInterceptor, ServerMetrics, memory_probe
from anchorcredit.server.servicer import CreditServicer
from anchorcredit.server.state import ServerState
from anchorcredit.v1 import credit_pb2, credit_pb2_grpc

log = logging.getLogger(__name__)
# SIGTERM: calls not answered this long before the grace period ends are refused with
# UNAVAILABLE (at most a quarter of the grace period).
DRAIN_MARGIN_S = 1.0
# After the grace period, the batcher's forward (whose callers are gone: it stops at the
# next layer) and then any thread still running (a forward past the grace period, an
# abandoned collective) each get this long before the process exits without them.
EXIT_WAIT_S = 1.0


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, device: str) -> str:
    if dtype != "auto":
        return dtype
    return "bfloat16" if device.startswith("cuda") else "float32"


def default_backend_factory(config: ServeConfig) -> Callable[[], ServingBackend]:
    """A zero-argument callable building the runner's Scorer from the config (blocking)."""

    def build() -> ServingBackend:
        from anchorcredit.runner import Scorer
        from anchorcredit.runner.layers import LayerChoiceError

        device = resolve_device(config.device)
        try:
            return Scorer.from_pretrained(
                config.model,
                device=device,
                dtype=resolve_dtype(config.dtype, device),
                layers=config.layer_list,
                policy_version=config.policy_version,
                entropy=config.entropy,
            )
        except LayerChoiceError as e:  # the operator's setting: name the flag and variable
            raise LayerChoiceError(f"--layers / ANCHORCREDIT_LAYERS: {e}", e.scorable) from None

    return build


def grpc_options(config: ServeConfig) -> list[tuple[str, Any]]:
    opts: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", config.max_receive_bytes),
        # No send cap: a response is bounded by the request limits above, but its head lists
        # scale with len(layers) x num_heads per sequence (model-dependent), so any fixed cap
        # could turn a finished computation into RESOURCE_EXHAUSTED. Sizing it from the model
        # would only re-derive a bound the receive limit and the model already impose; the
        # client's own receive limit is what protects the client.
        ("grpc.max_send_message_length", -1),
        # Permit client keepalive pings (trainers hold long-lived channels) ...
        ("grpc.keepalive_permit_without_calls", 1),
        (
            "grpc.http2.min_recv_ping_interval_without_data_ms",
            int(config.keepalive_min_ping_s * 1000),
        ),
        ("grpc.http2.max_ping_strikes", 2),
        # ... and ping idle clients ourselves so dead peers are noticed.
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        # Refuse to share a port with another process silently.
        ("grpc.so_reuseport", 0),
    ]
    if config.max_connection_age_s > 0:
        # Clients reconnect (and re-resolve DNS) so new pods behind a headless Service get
        # traffic; the grace lets a long request on the old connection finish.
        opts += [
            ("grpc.max_connection_age_ms", int(config.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(max(config.grace_s, 1) * 1000)),
        ]
    return opts


class MalformedFrameLog(logging.Filter):
    """grpc logs a full traceback for every request frame that does not parse (logger
    `grpc._cython.cygrpc`, "Unexpected [DecodeError] raised by servicer method"): anyone
    could flood the log. This filter lets one such record through per `interval_s`, as one
    line without the traceback and with the count of those dropped since; other records
    pass untouched. Installed once per process by CreditServer.start()."""

    LOGGER = "grpc._cython.cygrpc"

    def __init__(self, interval_s: float = 60.0) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._next = 0.0
        self.dropped = 0

    @staticmethod
    def _is_malformed(record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            return type(exc).__name__ == "DecodeError"
        return "[DecodeError]" in str(record.msg)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._is_malformed(record):
            return True
        now = time.monotonic()
        if now < self._next:
            self.dropped += 1
            return False
        self._next = now + self.interval_s
        exc = record.exc_info[1] if record.exc_info else None
        detail = " ".join(str(exc).split())[:200] if exc is not None else record.getMessage()
        record.msg = "malformed request frame (%s); %d more dropped in the last %.0f s"
        record.args = (detail, self.dropped, self.interval_s)
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info = record.exc_text = None
        self.dropped = 0
        return True

    @classmethod
    def install(cls) -> MalformedFrameLog:
        logger = logging.getLogger(cls.LOGGER)
        for f in logger.filters:
            if isinstance(f, cls):
                return f
        f = cls()
        logger.addFilter(f)
        return f


def _warn_security(cfg: ServeConfig) -> None:
    """One warning per weakened default, at start."""
    if cfg.allow_unauthenticated_weights and not cfg.admin_token:
        log.warning(
            "--allow-unauthenticated-weights (DEVELOPMENT ONLY): anyone who can %s may change "
            "the weights%s",
            "present the scoring token" if cfg.auth_token else "reach this port",
            "" if cfg.weights_dir else ", and UpdateWeights loads any path this process can read",
        )
    elif not cfg.admin_token:
        log.info("no --admin-token: weight-changing RPCs answer PERMISSION_DENIED")
    if (
        (cfg.admin_token or cfg.auth_token)
        and not cfg.tls_cert
        and cfg.host not in ("127.0.0.1", "::1", "localhost")
    ):
        log.warning(
            "tokens arrive in cleartext: no --tls-cert on %s (terminate TLS in front)", cfg.host
        )


def _read(path: str, flag: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as e:
        raise StartupError(f"{flag}: cannot read {path} ({e.strerror or e})") from None


def _server_credentials(cfg: ServeConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the configured files, or None for plaintext."""
    if not (cfg.tls_cert and cfg.tls_key):
        return None
    key = _read(cfg.tls_key, "--tls-key / ANCHORCREDIT_TLS_KEY")
    cert = _read(cfg.tls_cert, "--tls-cert / ANCHORCREDIT_TLS_CERT")
    ca = None
    if cfg.tls_client_ca:
        ca = _read(cfg.tls_client_ca, "--tls-client-ca / ANCHORCREDIT_TLS_CLIENT_CA")
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )


def port_in_use(host: str, port: int) -> OSError | None:
    """The error of binding a plain socket to (host, port), None when it binds: asked before
    gRPC binds, so a taken port is reported by us alone (gRPC's own bind failure logs a
    C-core error line first). Port 0 (pick one) is never in use."""
    if port == 0:
        return None
    host = host.strip("[]")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as probe:
            # As gRPC binds: connections the previous server on this port closed (TIME_WAIT,
            # up to a minute) must not block a restart; a live listener still does.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(addr)
    except OSError as e:
        return e
    return None


def _bind(server: grpc.aio.Server, address: str, creds: grpc.ServerCredentials | None) -> int:
    """Listen on `address`; StartupError naming --port when the address is taken (or the TLS
    files are not a certificate and its key)."""
    host, _, port_text = address.rpartition(":")
    port = 0
    if port_in_use(host, int(port_text)) is None:
        try:
            port = (
                server.add_insecure_port(address)
                if creds is None
                else server.add_secure_port(address, creds)
            )
        except RuntimeError:  # grpcio raises "Failed to bind to address ..."
            port = 0
    if port == 0:
        tls = " or the TLS certificate and key do not match" if creds is not None else ""
        raise StartupError(
            f"--port / ANCHORCREDIT_PORT: cannot listen on {address}: the port is in use "
            f"(another anchorcredit serve?) or the address is not this machine's{tls}; pick "
            "another --port (0 picks a free one) or --host"
        )
    return port


def _metrics_port_error(cfg: ServeConfig, e: OSError) -> StartupError:
    return StartupError(
        f"--metrics-port / ANCHORCREDIT_METRICS_PORT: cannot listen on "
        f"{cfg.metrics_host}:{cfg.metrics_port} ({e.strerror or e}); pick a free port (0 picks "
        "one, -1 turns /metrics off)"
    )


class CreditServer:
    """One server instance. `backend` (already built) or `backend_factory` (built in load());
    the default factory builds the runner's Scorer from the config."""

    def __init__(
        self,
        config: ServeConfig,
        backend: ServingBackend | None = None,
        backend_factory: Callable[[], ServingBackend] | None = None,
    ) -> None:
        self.config = config
        self.metrics = ServerMetrics()
        self.state = ServerState(config=config, metrics=self.metrics)
        self._prebuilt = backend
        self._factory = backend_factory or default_backend_factory(config)
        # The device thread: every model call (load, score, reload) runs here, one at a time.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="device")
        self.health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self.servicer: CreditServicer | None = None
        self._http: Any = None
        self.port = 0
        self.metrics_port = -1
        self._stopping = False
        self._unobserve = observe_abandoned(self.metrics.abandoned_threads.set)

    async def start(self) -> int:
        """Bind and start serving; returns the bound gRPC port."""
        cfg = self.config
        if cfg.metrics_port > 0:  # checked before anything starts or logs: one line
            taken = port_in_use(cfg.metrics_host, cfg.metrics_port)
            if taken is not None:
                raise _metrics_port_error(cfg, taken)
        server = grpc.aio.server(
            # Outermost first: metrics time every RPC, denied ones included.
            interceptors=[
                MetricsInterceptor(self.metrics),
                BearerTokenInterceptor(
                    cfg.auth_token,
                    admin_token=cfg.admin_token,
                    allow_unauthenticated_weights=cfg.allow_unauthenticated_weights,
                    on_denied=self.metrics.failures.labels("unauthenticated").inc,
                    on_forbidden=self.metrics.failures.labels("permission_denied").inc,
                ),
                # Innermost: only calls that passed auth get their frame parsed.
                MalformedFrameInterceptor(self.metrics.failures.labels("invalid_argument").inc),
            ],
            options=grpc_options(cfg),
            maximum_concurrent_rpcs=cfg.max_concurrent_rpcs or None,
        )
        self.servicer = CreditServicer(self.state)
        credit_pb2_grpc.add_CreditServiceServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        names = (
            credit_pb2.DESCRIPTOR.services_by_name["CreditService"].full_name,
            health.SERVICE_NAME,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(names, server)
        address = f"{cfg.host}:{cfg.port}"
        self.port = _bind(server, address, _server_credentials(cfg))
        _warn_security(cfg)
        MalformedFrameLog.install()
        await server.start()
        self._server = server
        if cfg.metrics_port >= 0:
            try:
                self._http = self.metrics.serve_http(cfg.metrics_port, cfg.metrics_host)
            except OSError as e:  # taken meanwhile: stop the started gRPC server first
                await server.stop(0)
                self._server = None
                raise _metrics_port_error(cfg, e) from None
            self.metrics_port = int(self._http[0].server_port)
        log.info(
            "gRPC on %s:%d (%s), metrics %s",
            cfg.host,
            self.port,
            ("mutual TLS" if cfg.tls_client_ca else "TLS") if cfg.tls_cert else "plaintext",
            f"on {cfg.metrics_host}:{self.metrics_port}" if self._http else "off",
        )
        return self.port

    async def load(self) -> None:
        """Build the backend on the device thread, then start batching and report SERVING."""
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        backend = self._prebuilt
        if backend is None:
            backend = await loop.run_in_executor(self._executor, self._factory)
        cfg = self.config
        batcher = Batcher(backend, self._executor, self.metrics, cfg.limits)
        batcher.start()
        self.state.backend = backend
        info = self.state.refresh_info()
        self.state.batcher = batcher  # last: `ready` flips here
        self.metrics.watch_memory(memory_probe(info.device))
        self.metrics.ready.set(1)
        if not self._stopping:
            await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "model %s (policy %s, statistics v%s) loaded in %.1f s: %d of %d parameters "
            "(%.0f%%), layers %s of %d",
            info.model_id,
            info.policy_version,
            info.stat_version,
            time.perf_counter() - t0,
            info.loaded_param_count,
            info.total_param_count,
            100.0 * info.loaded_param_count / max(1, info.total_param_count),
            ",".join(map(str, info.layers)),
            info.num_layers,
        )

    async def stop(self, grace: float | None = None) -> None:
        """Graceful: NOT_SERVING, (delay), stop accepting, finish in-flight, drain, close."""
        if self._stopping:
            return
        self._stopping = True
        cfg = self.config
        grace = cfg.grace_s if grace is None else grace
        self.metrics.ready.set(0)
        await self.health.enter_graceful_shutdown()
        if cfg.shutdown_delay_s > 0:
            await asyncio.sleep(cfg.shutdown_delay_s)
        if self._server is not None:
            inflight = self.metrics.registry.get_sample_value("anchorcredit_inflight_requests")
            log.info(
                "stopping: %d RPCs in flight, %d queued, grace %.0f s",
                int(inflight or 0),
                self.state.batcher.depth if self.state.batcher else 0,
                grace,
            )
            # Running handlers get `grace` seconds; shortly before it ends, what is still
            # running is refused with UNAVAILABLE (a client retries it elsewhere) instead of
            # being CANCELLED by gRPC at the end. New calls are refused with UNAVAILABLE at
            # once for `margin` seconds, so callers learn to go elsewhere before the port
            # stops taking calls (one arriving as gRPC stops would be CANCELLED).
            margin = min(DRAIN_MARGIN_S, 0.25 * grace)
            out_of_time = self.state.out_of_time
            timer = asyncio.get_running_loop().call_later(
                max(0.0, grace - margin), lambda: out_of_time.done() or out_of_time.set_result(None)
            )
            self.state.draining = True
            try:
                await asyncio.sleep(margin)
                await self._server.stop(max(0.0, grace - margin))
            finally:
                timer.cancel()
        if self.state.batcher is not None:
            try:  # normally instant: the handlers that fed the queue are done by now
                await asyncio.wait_for(self.state.batcher.close(), EXIT_WAIT_S)
            except TimeoutError:
                log.warning("batcher still busy after the grace period; exiting anyway")
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self.servicer is not None:
            self.servicer.weights.close()  # weight groups and their worker threads
        if self._http is not None:
            http_server, thread = self._http
            http_server.shutdown()
            http_server.server_close()
            thread.join(timeout=5)
            self._http = None
        self._unobserve()
        log.info("server stopped")

    async def __aenter__(self) -> CreditServer:
        await self.start()
        try:
            await self.load()
        except BaseException:
            await self.stop(0)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def serve(
    config: ServeConfig,
    backend: ServingBackend | None = None,
    backend_factory: Callable[[], ServingBackend] | None = None,
) -> int:
    """Run until SIGTERM/SIGINT; 0 after a clean drain, 1 if the model fails to load.
    backend / backend_factory: as CreditServer (default: the runner's Scorer)."""
    server = CreditServer(config, backend=backend, backend_factory=backend_factory)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    loading = asyncio.ensure_future(server.load())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if loading.done() and loading.exception() is not None:
        log.error("model failed to load: %s", loading.exception())
        code = 1
    else:
        await stop.wait()
        log.info("signal received: draining (grace %.0f s)", config.grace_s)
    if not loading.done():
        loading.cancel()  # the device thread finishes its load; nothing waits for it
    await server.stop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
    return code


def exit_after_drain(code: int, wait_s: float = EXIT_WAIT_S) -> NoReturn:
    """End the process with `code` once the drain is over, whatever is still running.

    Threads that exit would wait for (worker pools are joined at exit: a forward past the
    grace period) get `wait_s`; an abandoned collective's thread may sit in torch's C++
    code forever (and crash an interpreter shutting down around it). Interpreter shutdown
    itself (freeing torch and the model) takes seconds on a busy CPU. So: flush the logs
    and the standard streams, and exit now, within --grace-s plus about two seconds."""
    deadline = time.monotonic() + wait_s
    for t in threading.enumerate():
        if t is not threading.current_thread() and not t.daemon:
            t.join(max(0.0, deadline - time.monotonic()))
    stuck = [
        t.name
        for t in threading.enumerate()
        if t.is_alive() and not t.daemon and t is not threading.current_thread()
    ]
    abandoned = abandoned_threads()
    if stuck or abandoned:
        log.warning(
            "exiting with threads still running (%s%d abandoned collective steps)",
            "".join(f"{n}, " for n in stuck),
            abandoned,
        )
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
