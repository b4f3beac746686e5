"""Prometheus metrics of the server on their own registry, plus the grpc.aio interceptor
that times every RPC (authentication is server/auth.py's).

Own registry (not the global one) so several servers in one test process do not collide
and nothing unrelated leaks onto /metrics. Names follow CONVENTIONS.md, no colons; buckets
are 1-2-5 series. py-grpc-prometheus has no grpc.aio interceptor, hence `MetricsInterceptor`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily

from anchorcredit.server.credit_metrics import CreditMetrics


def one_two_five(lo_exp: int, hi_exp: int) -> tuple[float, ...]:
    """1, 2, 5 x 10^e for e in [lo_exp, hi_exp]."""
    return tuple(float(f"{m}e{e}") for e in range(lo_exp, hi_exp + 1) for m in (1, 2, 5))


SECONDS = one_two_five(-4, 1) + (100.0,)  # 100 us .. 100 s
TOKENS = tuple(float(2**i) for i in range(4, 21))  # 16 .. 1M, geometric
REQUESTS = tuple(float(2**i) for i in range(0, 11))  # 1 .. 1024


class ServerMetrics:
    """All server-side series. Attribute names mirror the metric names without the prefix."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self._add_latency(r)
        self._add_batching(r)
        self._add_outcomes(r)
        self._add_weight_changes(r)
        self._add_model(r)
        self._memory_probe: Callable[[], dict[str, float]] | None = None
        self.credit = CreditMetrics(r)  # credit sanity and policy freshness (own module)
        # Series that exist from the start read 0 instead of "no data", so rates, panels and
        # alerts over them work before the first event (the batcher's drop reasons, and the
        # refusal an overload alert watches).
        for reason in ("deadline", "cancelled"):
            self.dropped.labels(reason)
        self.failures.labels("queue_full")
        r.register(_SpanFallbacks())

    def _add_latency(self, r: CollectorRegistry) -> None:
        """How long: RPCs, the wait for the device, batches and runner stages."""
        self.request_duration = Histogram(
            "anchorcredit_request_duration_seconds",
            "RPC latency by method and status code",
            ["method", "code"],
            buckets=SECONDS,
            registry=r,
        )
        self.queue_duration = Histogram(
            "anchorcredit_queue_duration_seconds",
            "time a request waits for the device",
            buckets=SECONDS,
            registry=r,
        )
        self.inference_duration = Histogram(
            "anchorcredit_inference_duration_seconds",
            "wall time of one device batch (forward + statistics + credit)",
            buckets=SECONDS,
            registry=r,
        )
        self.stage_duration = Histogram(
            "anchorcredit_stage_duration_seconds",
            "per-batch time of a runner stage, when the runner reports it",
            ["stage"],
            buckets=SECONDS,
            registry=r,
        )

    def _add_batching(self, r: CollectorRegistry) -> None:
        """What the device gets: batch sizes, tokens, sequences, the queue."""
        self.batch_size = Histogram(
            "anchorcredit_batch_size",
            "requests merged into one device batch",
            buckets=REQUESTS,
            registry=r,
        )
        self.batch_tokens = Histogram(
            "anchorcredit_batch_tokens",
            "tokens (prompt + response) in one device batch",
            buckets=TOKENS,
            registry=r,
        )
        self.tokens = Counter(
            "anchorcredit_tokens", "tokens scored (prompt + response)", registry=r
        )
        self.sequences = Counter("anchorcredit_sequences", "sequences scored", registry=r)
        self.queue_size = Gauge(
            "anchorcredit_queue_size", "requests waiting for the device", registry=r
        )
        self.queue_capacity = Gauge(
            "anchorcredit_queue_capacity",
            "requests the queue holds before answering RESOURCE_EXHAUSTED (--max-queue)",
            registry=r,
        )

    def _add_outcomes(self, r: CollectorRegistry) -> None:
        """What happens to requests: in flight, failed, dropped unserved."""
        self.inflight = Gauge("anchorcredit_inflight_requests", "RPCs being handled", registry=r)
        self.failures = Counter(
            "anchorcredit_request_failures",
            "failed or dropped requests by reason",
            ["reason"],
            registry=r,
        )
        self.dropped = Counter(
            "anchorcredit_queue_dropped",
            "requests dropped from the queue unserved (caller cancelled, deadline passed)",
            ["reason"],
            registry=r,
        )

    def _add_weight_changes(self, r: CollectorRegistry) -> None:
        """Weight changes: count, by transport, bytes, abandoned collective steps."""
        self.weight_updates = Counter(
            "anchorcredit_weight_updates",
            "successful weight changes (UpdateWeights, PushWeights, ReceiveWeights)",
            registry=r,
        )
        self.weight_updates_by_transport = Counter(
            "anchorcredit_weight_updates_by_transport",
            "successful weight changes by transport (path, stream, collective)",
            ["transport"],
            registry=r,
        )
        self.weight_bytes = Counter(
            "anchorcredit_weight_bytes",
            "tensor bytes staged by weight changes (read, streamed or broadcast; failed "
            "changes included) by transport",
            ["transport"],
            registry=r,
        )
        self.abandoned_threads = Gauge(
            "anchorcredit_abandoned_threads",
            "threads given up on (a collective step past its timeout) that still run",
            registry=r,
        )

    def _add_model(self, r: CollectorRegistry) -> None:
        """What is served: the model's info, readiness, device memory."""
        self.model_info = Info(
            "anchorcredit_model", "model, policy version and limits served", registry=r
        )
        self.ready = Gauge(
            "anchorcredit_ready", "1 once the model is loaded and serving", registry=r
        )
        self.device_memory = Gauge(
            "anchorcredit_device_memory_bytes",
            "accelerator memory (cuda allocated, reserved, total) and host RSS",
            ["kind"],
            registry=r,
        )

    def set_model_info(self, info: dict[str, Any]) -> None:
        self.model_info.info(
            {
                k: ",".join(map(str, v)) if isinstance(v, list | tuple) else str(v)
                for k, v in info.items()
            }
        )

    def watch_memory(self, probe: Callable[[], dict[str, float]]) -> None:
        """Register a callable returning {kind: bytes}; sampled on every scrape."""
        self._memory_probe = probe
        for kind in probe():
            self.device_memory.labels(kind).set_function(
                lambda kind=kind: float(self._sample(kind))
            )

    def _sample(self, kind: str) -> float:
        try:
            return float((self._memory_probe or dict)().get(kind, 0.0))
        except Exception:  # a scrape must never fail because of a probe
            return 0.0

    def serve_http(self, port: int, host: str = "0.0.0.0") -> tuple[Any, Any]:
        """Start /metrics in a daemon thread; returns (server, thread); port 0 picks one."""
        return start_http_server(port, addr=host, registry=self.registry)


class _SpanFallbacks:
    """anchorcredit_span_fallback_total: span statistics calls the engine answered with the
    chunked backend because the Triton kernel failed to compile or launch on this device
    (anchorcredit.engine.span.fallback; process-wide, read at each scrape, 0 until the
    engine is loaded)."""

    def collect(self) -> Any:
        engine = sys.modules.get("anchorcredit.engine.span.fallback")
        yield CounterMetricFamily(
            "anchorcredit_span_fallback",
            "span statistics calls answered by the chunked backend after a triton failure",
            value=engine.total() if engine is not None else 0,
        )


def memory_probe(device: str) -> Callable[[], dict[str, float]]:
    """{kind: bytes}: cuda allocated/reserved when on cuda, always the host RSS."""
    page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def probe() -> dict[str, float]:
        out: dict[str, float] = {}
        try:
            with open("/proc/self/statm") as fh:
                out["host_rss"] = float(int(fh.read().split()[1]) * page)
        except OSError:
            out["host_rss"] = 0.0
        if device.startswith("cuda"):
            import torch

            out["cuda_allocated"] = float(torch.cuda.memory_allocated(device))
            out["cuda_reserved"] = float(torch.cuda.memory_reserved(device))
            # the device's capacity, so an alert can compare reserved against it
            out["cuda_total"] = float(torch.cuda.get_device_properties(device).total_memory)
        return out

    return probe


def _code_of(context: grpc.aio.ServicerContext) -> str:
    code = context.code()
    if code is None:
        return "OK"
    if isinstance(code, grpc.StatusCode):
        return code.name
    return str(code)


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Times every RPC into request_duration{method,code}; counts in-flight RPCs."""

    def __init__(
        self, metrics: ServerMetrics, timed_prefix: str = "/anchorcredit.v1.CreditService/"
    ) -> None:
        self.metrics = metrics
        self._prefix = timed_prefix

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return self._wrap(handler, method.rsplit("/", 1)[-1], method.startswith(self._prefix))

    def _wrap(
        self, handler: grpc.RpcMethodHandler, method: str, ours: bool
    ) -> grpc.RpcMethodHandler:
        m = self.metrics

        def cancelled_code(context: grpc.aio.ServicerContext) -> str:
            remaining = context.time_remaining()
            return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"

        @contextlib.asynccontextmanager
        async def observed(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
            """In-flight gauge and the latency histogram around one RPC."""
            start, code = time.perf_counter(), None
            m.inflight.inc()
            try:
                yield
            except asyncio.CancelledError:
                code = cancelled_code(context)
                raise
            except grpc.aio.AbortError:
                raise
            except Exception:
                code = "UNKNOWN"
                raise
            finally:
                m.inflight.dec()
                if code is None:
                    code = _code_of(context)
                m.request_duration.labels(method, code).observe(time.perf_counter() - start)

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                async with observed(context):
                    return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )

        if handler.stream_unary is not None and ours:
            inner_su = handler.stream_unary

            async def client_stream(requests: Any, context: grpc.aio.ServicerContext) -> Any:
                async with observed(context):
                    return await inner_su(requests, context)

            return grpc.stream_unary_rpc_method_handler(
                client_stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )

        # Only our own streams are wrapped: other services' stream handlers need not be
        # async generators (reflection's may write through the context instead).
        if handler.stream_stream is not None and ours:
            inner_ss = handler.stream_stream

            async def stream(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
                async with observed(context):
                    async for response in inner_ss(request_iterator, context):
                        yield response

            return grpc.stream_stream_rpc_method_handler(
                stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )

        # Anything else (health Watch, reflection) passes through untimed; only CreditService
        # is protected and all its methods are wrapped above.
        return handler
