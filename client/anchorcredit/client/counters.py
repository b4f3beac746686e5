"""The light client's own counters: a plain dict always, Prometheus metrics when possible.

Every CreditClient counts, for itself, what it did (`client.counters()`): cache hits and
misses by layer (memory: the in-process LRU; redis; custom: a cache object of yours),
retries, waits for a replica serving the pinned version, stale-version refusals, and the
seconds spent scoring and pushing weights. When `prometheus_client` is importable the same
events also go to `anchorcredit_client_*` metrics in the registry given (default: the global
one), shared by every client of the process that uses that registry. Without it nothing is
imported and the dict is the whole story. Labels are bounded: `layer` in LAYERS, `code` in
RETRY_CODES (other codes count as "other").
"""

from __future__ import annotations

import threading
from typing import Any

LAYERS = ("memory", "redis", "custom")
RETRY_CODES = ("UNAVAILABLE", "RESOURCE_EXHAUSTED", "CANCELLED", "other")

# The dict's keys, in a stable order (docs/OBSERVABILITY.md describes each).
FIELDS = (
    *(f"cache_{kind}_{layer}" for layer in LAYERS for kind in ("hits", "misses")),
    "retries",
    "replica_waits",
    "replica_wait_seconds",
    "stale_version_refusals",
    "score_calls",
    "score_seconds",
    "push_calls",
    "push_seconds",
)

_registries: dict[int, tuple[Any, dict[str, Any]]] = {}
_registries_lock = threading.Lock()


def cache_layer(cache: Any) -> str:
    """Which layer a cache object is: "memory", "redis" or "custom"."""
    from anchorcredit.client.cache import LRUBytesCache, RedisCache

    if isinstance(cache, LRUBytesCache):
        return "memory"
    if isinstance(cache, RedisCache):
        return "redis"
    return "custom"


def prometheus_metrics(registry: Any = None) -> dict[str, Any] | None:
    """The anchorcredit_client_* metrics registered in `registry` (None: the global one),
    created once per registry; None when prometheus_client does not import."""
    try:
        import prometheus_client as prom
    except ImportError:
        return None
    registry = prom.REGISTRY if registry is None else registry
    with _registries_lock:
        known = _registries.get(id(registry))
        if known is not None and known[0] is registry:
            return known[1]
        metrics = _create_metrics(prom, registry)
        _registries[id(registry)] = (registry, metrics)
        return metrics


def _create_metrics(prom: Any, registry: Any) -> dict[str, Any]:
    def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Any:
        return prom.Counter(f"anchorcredit_client_{name}", doc, labels, registry=registry)

    def histogram(name: str, doc: str) -> Any:
        return prom.Histogram(f"anchorcredit_client_{name}", doc, registry=registry)

    return {
        "cache_hits": counter("cache_hits", "Credit results served from a cache", ("layer",)),
        "cache_misses": counter("cache_misses", "Credit results not in a cache", ("layer",)),
        "retries": counter("retries", "RPC attempts retried (by status code)", ("code",)),
        "replica_waits": counter(
            "replica_waits", "Waits for a replica serving the pinned policy version"
        ),
        "replica_wait_seconds": counter(
            "replica_wait_seconds", "Seconds spent waiting for such a replica"
        ),
        "stale_version_refusals": counter(
            "stale_version_refusals", "Score pieces a replica refused: it serves other weights"
        ),
        "score_seconds": histogram("score_seconds", "Seconds per CreditClient.score call"),
        "push_seconds": histogram("push_seconds", "Seconds per weight push or update"),
    }


class ClientCounters:
    """One client's counts (thread-safe), mirrored into Prometheus when it is installed."""

    def __init__(self, registry: Any = None):
        self._lock = threading.Lock()
        self._values: dict[str, float] = dict.fromkeys(FIELDS, 0)
        self._prom = prometheus_metrics(registry)

    @property
    def exported(self) -> bool:
        """True when the counts also go to Prometheus metrics."""
        return self._prom is not None

    def _add(self, **amounts: float) -> None:
        with self._lock:
            for key, amount in amounts.items():
                self._values[key] += amount

    def cache(self, layer: str, hits: int, misses: int) -> None:
        """One cache read: `hits` values found, `misses` not, in `layer`."""
        layer = layer if layer in LAYERS else "custom"
        self._add(**{f"cache_hits_{layer}": hits, f"cache_misses_{layer}": misses})
        if self._prom is not None:
            self._prom["cache_hits"].labels(layer).inc(hits)
            self._prom["cache_misses"].labels(layer).inc(misses)

    def retry(self, code: str) -> None:
        """One attempt retried after status `code` (a grpc.StatusCode name)."""
        self._add(retries=1)
        if self._prom is not None:
            self._prom["retries"].labels(code if code in RETRY_CODES else "other").inc()

    def replica_wait(self, seconds: float) -> None:
        """One wait for a replica that serves the pinned version."""
        self._add(replica_waits=1, replica_wait_seconds=seconds)
        if self._prom is not None:
            self._prom["replica_waits"].inc()
            self._prom["replica_wait_seconds"].inc(seconds)

    def stale_refusal(self) -> None:
        """A replica refused a piece: it serves another policy version."""
        self._add(stale_version_refusals=1)
        if self._prom is not None:
            self._prom["stale_version_refusals"].inc()

    def scored(self, seconds: float) -> None:
        """One score() call took `seconds`."""
        self._add(score_calls=1, score_seconds=seconds)
        if self._prom is not None:
            self._prom["score_seconds"].observe(seconds)

    def pushed(self, seconds: float) -> None:
        """One weight push or update took `seconds`."""
        self._add(push_calls=1, push_seconds=seconds)
        if self._prom is not None:
            self._prom["push_seconds"].observe(seconds)

    def snapshot(self) -> dict[str, float]:
        """Every count so far, as {name: value} (FIELDS, in order)."""
        with self._lock:
            return dict(self._values)
