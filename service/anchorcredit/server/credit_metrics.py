"""What an RL engineer watches during a run: does credit still look sane, and is the policy
being scored the one being trained (docs/OBSERVABILITY.md).

Per scored response, labelled by strategy only (the contract's six names: a bounded set):
the gamma_t distribution, the shares of response tokens that are WAAD onsets, FAI anchors
and amplified, the head-class sizes and the response length. Per server: the served policy
version, seconds since the weights last changed and how many versions were scored in the
last minute.

Cheap enough to leave on: `observe` handles a whole request at once, with numpy over all its
tokens (per-response medians by one sort, bucket counts by one search), and feeds histograms
that take a bucket-count array per call instead of one locked observe() per value
(bench/credit_metrics.py measures it against scoring).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Info
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from anchorcredit.peaks import segment_peaks

GAMMA = (1.0, 1.05, 1.1, 1.25, 1.5, 1.75, 2.0, 3.0, 5.0)
FRACTION = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 0.95, 0.99, 1.0)
HEADS = tuple(float(2**i) for i in range(0, 11))  # 1 .. 1024
LENGTH = tuple(float(2**i) for i in range(0, 17))  # 1 .. 64K tokens
FRACTION_KINDS = ("onset", "anchor", "amplified")
RECENT_WINDOW_S = 60.0
PENDING_REQUESTS = 256  # answered requests waiting to be observed; beyond it they are skipped
log = logging.getLogger(__name__)


class BulkHistogram(Collector):
    """A labelled histogram fed an array of values per call: one bucket count by
    searchsorted/bincount instead of one locked observe() per value. Exposed through
    prometheus_client's public collector API as an ordinary histogram."""

    def __init__(
        self, name: str, documentation: str, labels: Sequence[str], buckets: Sequence[float]
    ) -> None:
        self.name, self.documentation, self.labels = name, documentation, tuple(labels)
        self.edges = np.asarray(buckets, dtype=np.float64)
        self._lock = threading.Lock()
        self._series: dict[tuple[str, ...], tuple[np.ndarray, list[float]]] = {}

    def observe_all(self, label_values: tuple[str, ...], values: np.ndarray) -> None:
        # bucket i holds the values v with edges[i-1] < v <= edges[i]; the last one is +Inf
        counts = np.bincount(
            np.searchsorted(self._edges_as(values.dtype), values, side="left"),
            minlength=len(self.edges) + 1,
        )
        total = float(np.sum(values, dtype=np.float64))
        with self._lock:
            buckets, acc = self._series.setdefault(
                label_values, (np.zeros(len(self.edges) + 1, dtype=np.int64), [0.0])
            )
            buckets += counts
            acc[0] += total

    def _edges_as(self, dtype: np.dtype) -> np.ndarray:
        """The edges in the values' float dtype, each the largest such number <= the edge, so
        `v <= edge` answers as in float64 (and the search needs no cast of the values: a
        float32 array against float64 edges searches 3-4x slower)."""
        if dtype == np.float64 or dtype.kind != "f":
            return self.edges
        low = self.edges.astype(dtype)
        return np.where(low > self.edges, np.nextafter(low, dtype.type(-np.inf)), low)

    def collect(self) -> Any:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        bounds = [floatToGoString(e) for e in (*self.edges.tolist(), float("inf"))]
        with self._lock:
            series = {k: (b.copy(), acc[0]) for k, (b, acc) in self._series.items()}
        for label_values, (buckets, total) in series.items():
            cumulative = np.cumsum(buckets).tolist()
            family.add_metric(list(label_values), list(zip(bounds, cumulative, strict=True)), total)
        yield family


def credit_fractions(results: Sequence[Any]) -> dict[str, np.ndarray]:
    """Per response: the share of its tokens that are WAAD onsets (WAAD peaks, the chunk
    onsets local heads mark), FAI anchors (FAI peaks) and amplified (gamma > 1). Peaks are
    anchorcredit.peaks' (the definition `anchorcredit analyze` uses), all responses at once."""
    lengths = np.fromiter((len(r.gamma) for r in results), dtype=np.int64, count=len(results))
    starts = np.zeros_like(lengths)
    np.cumsum(lengths[:-1], out=starts[1:])

    def share(mask: np.ndarray) -> np.ndarray:
        return np.add.reduceat(mask, starts, dtype=np.int64) / lengths

    def joined(name: str) -> np.ndarray:
        return np.concatenate([getattr(r, name) for r in results])

    return {
        "onset": share(segment_peaks(joined("waad"), lengths)),
        "anchor": share(segment_peaks(joined("fai"), lengths)),
        "amplified": share(joined("gamma") > 1.0),
    }


class VersionClock:
    """The served version, when it last changed, and the versions scored recently."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.changed_at = clock()
        self._scored: deque[tuple[float, str]] = deque()

    def changed(self) -> None:
        self.changed_at = self._clock()

    def seconds_since_change(self) -> float:
        return self._clock() - self.changed_at

    def scored(self, version: str) -> None:
        with self._lock:
            now = self._clock()
            if self._scored and self._scored[-1][1] == version:
                self._scored[-1] = (now, version)  # one entry per run of a version: stays small
            else:
                self._scored.append((now, version))
            self._expire(now)

    def distinct_recent(self) -> int:
        with self._lock:
            self._expire(self._clock())
            return len({v for _, v in self._scored})

    def _expire(self, now: float) -> None:
        while self._scored and now - self._scored[0][0] > RECENT_WINDOW_S:
            self._scored.popleft()


class CreditMetrics:
    """The credit and policy-freshness series on the server's registry."""

    def __init__(
        self, registry: CollectorRegistry, clock: Callable[[], float] = time.monotonic
    ) -> None:
        r = registry
        self.gamma = BulkHistogram(
            "anchorcredit_credit_gamma",
            "gamma_t of every scored response token, by strategy",
            ["strategy"],
            GAMMA,
        )
        self.fraction = BulkHistogram(
            "anchorcredit_credit_token_fraction",
            "per response: share of its tokens that are WAAD onsets, FAI anchors or amplified",
            ["strategy", "kind"],
            FRACTION,
        )
        self.heads = BulkHistogram(
            "anchorcredit_credit_heads",
            "per response: number of local / global heads",
            ["strategy", "head_class"],
            HEADS,
        )
        self.response_tokens = BulkHistogram(
            "anchorcredit_credit_response_tokens",
            "per response: its length in tokens",
            ["strategy"],
            LENGTH,
        )
        for histogram in (self.gamma, self.fraction, self.heads, self.response_tokens):
            r.register(histogram)
        self.responses = Counter(
            "anchorcredit_credit_responses",
            "responses scored, by strategy",
            ["strategy"],
            registry=r,
        )
        self.policy = Info("anchorcredit_policy", "the policy version served now", registry=r)
        self.versions = VersionClock(clock)
        Gauge(
            "anchorcredit_policy_seconds_since_change",
            "seconds since the served weights last changed (load included)",
            registry=r,
        ).set_function(self.versions.seconds_since_change)
        Gauge(
            "anchorcredit_policy_versions_scored_recent",
            f"distinct policy versions that scored requests in the last {RECENT_WINDOW_S:g} s",
            registry=r,
        ).set_function(self.versions.distinct_recent)
        self.skipped = Counter(
            "anchorcredit_credit_metrics_skipped",
            f"answered requests left out of the credit metrics ({PENDING_REQUESTS} were "
            "already waiting to be observed)",
            registry=r,
        )
        self._pending: queue.Queue[tuple[str, Sequence[Any]]] = queue.Queue(PENDING_REQUESTS)
        self._worker: threading.Thread | None = None
        self._worker_lock = threading.Lock()

    def observe_later(self, strategy: str, results: Sequence[Any]) -> None:
        """Observe off the request path: a worker thread does it after the answer is sent, so
        the metrics never add to a call's latency (numpy releases the GIL for the big parts)."""
        if self._worker is None:
            with self._worker_lock:
                if self._worker is None:
                    self._worker = threading.Thread(
                        target=self._drain, name="credit-metrics", daemon=True
                    )
                    self._worker.start()
        try:
            self._pending.put_nowait((strategy, results))
        except queue.Full:
            self.skipped.inc()

    def flush(self) -> None:
        """Wait until every request handed to observe_later has been observed."""
        self._pending.join()

    def _drain(self) -> None:
        while True:
            strategy, results = self._pending.get()
            try:
                self.observe(strategy, results)
            except Exception:  # a metric must never take the server down
                log.exception("credit metrics: could not observe a request")
            finally:
                self._pending.task_done()

    def policy_changed(self, version: str) -> None:
        """The served weights changed (or were loaded): now `version`."""
        self.policy.info({"version": version})
        self.versions.changed()

    def observe(self, strategy: str, results: Sequence[Any]) -> None:
        """One answered request's ScoreResults (backend.ScoreResult; one policy version)."""
        if not results:
            return
        self.gamma.observe_all((strategy,), np.concatenate([r.gamma for r in results]))
        for kind, shares in credit_fractions(results).items():
            self.fraction.observe_all((strategy, kind), shares)
        for head_class, attr in (("local", "local_heads"), ("global", "global_heads")):
            counts = np.fromiter((len(getattr(r, attr)) for r in results), dtype=np.float64)
            self.heads.observe_all((strategy, head_class), counts)
        self.response_tokens.observe_all(
            (strategy,), np.fromiter((len(r.gamma) for r in results), dtype=np.float64)
        )
        self.responses.labels(strategy).inc(len(results))
        self.versions.scored(results[0].policy_version)
