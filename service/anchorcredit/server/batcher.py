"""Dynamic batching: one asyncio task owns the queue, the device and the token budget.

Handlers `await batcher.submit(parsed, deadline)`; the loop task forms batches of requests
that share a parameter key, bounded by a token budget and a request cap, waiting at most
`max_wait_s` after the oldest request when the device is idle (when it was busy, the queue
filled meanwhile and no wait is added). The backend (anchorcredit.backend.ScoringBackend)
runs in ONE worker thread (`run_in_executor`), so model calls never overlap and a weight
reload (`run_exclusive`) is ordered with the batches around it: no request is ever answered
by weights other than the ones it was checked against.

The budget is applied here and only here: a batch's sequences go to the backend in
budget-sized forwards (anchorcredit.budget.greedy_chunks; a request larger than the budget
is cut the same way), and a forward that runs out of device memory is halved
(anchorcredit.budget.halve_on_oom) down to one sequence, which then fails alone with
DeviceOutOfMemory (RESOURCE_EXHAUSTED).

Failure isolation: if a merged batch raises, its requests are retried one by one so a bad
request fails alone.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from anchorcredit.backend import BatchScores, ScoreResult, ScoringBackend, TokenPair
from anchorcredit.budget import greedy_chunks, halve_on_oom
from anchorcredit.contract import CreditParams
from anchorcredit.errors import PolicyVersionMismatch
from anchorcredit.server.convert import ParsedRequest
from anchorcredit.server.metrics import ServerMetrics

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The bounded queue is full; `retry_after_s` is an estimate of when it drains."""

    def __init__(self, depth: int, retry_after_s: float) -> None:
        super().__init__(
            f"request queue full ({depth} waiting); retry after ~{retry_after_s * 1000:.0f} ms"
        )
        self.depth = depth
        self.retry_after_s = retry_after_s


class DeadlineExpired(Exception):
    """The request's deadline passed while it waited in the queue."""


class ShuttingDown(Exception):
    """The batcher no longer accepts work."""


@dataclass
class Outcome:
    """What a handler gets back for its request."""

    results: list[ScoreResult]
    queue_seconds: float
    compute_seconds: float


@dataclass
class _Work:
    parsed: ParsedRequest
    future: asyncio.Future
    deadline: float | None  # time.monotonic() based
    enqueued: float = field(default_factory=time.monotonic)
    started: float | None = None  # when it first reached the device (retries keep it)


@dataclass
class _Control:
    fn: Callable[[], Any]
    future: asyncio.Future


def run_budgeted(
    backend: ScoringBackend,
    pairs: list[TokenPair],
    params: CreditParams,
    with_entropy: bool,
    max_batch_tokens: int,
) -> BatchScores:
    """Score `pairs` in budget-sized forwards, halving any that runs out of device memory
    (blocking: runs on the device thread). Stage seconds add up over the forwards."""
    stages: Counter[str] = Counter()

    def forward(chunk: list[TokenPair]) -> list[ScoreResult]:
        got = backend.score_batch(chunk, params, with_entropy=with_entropy)
        stages.update(got.stage_seconds)
        return got.results

    results: list[ScoreResult] = []
    for idx in greedy_chunks([p.num_tokens for p in pairs], max_batch_tokens):
        results += halve_on_oom(forward, [pairs[i] for i in idx])
    return BatchScores(results, dict(stages))


class Batcher:
    """Queue + the one task that owns the device. Create inside a running event loop."""

    def __init__(
        self,
        backend: ScoringBackend,
        executor: Executor,
        metrics: ServerMetrics,
        max_batch_tokens: int = 16384,
        max_wait_s: float = 0.005,
        max_batch_requests: int = 64,
        max_queue: int = 256,
    ) -> None:
        self._backend = backend
        self._executor = executor
        self._metrics = metrics
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self.max_batch_requests = max_batch_requests
        self.max_queue = max_queue
        self._queue: collections.deque[_Work | _Control] = collections.deque()
        self._wakeup = asyncio.Event()
        self._room = asyncio.Event()  # set whenever requests leave the queue
        self._closing = False
        self._task: asyncio.Task | None = None
        # Moving averages for the retry hint.
        self._ema_batch_s = 0.05
        self._ema_batch_requests = 1.0

    # -- public -----------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

    @property
    def depth(self) -> int:
        return sum(isinstance(w, _Work) for w in self._queue)

    def retry_after_s(self) -> float:
        batches_ahead = max(1.0, self.depth / max(1.0, self._ema_batch_requests))
        return min(30.0, max(0.05, batches_ahead * self._ema_batch_s))

    async def submit(
        self, parsed: ParsedRequest, deadline: float | None = None, block: bool = False
    ) -> Outcome:
        """Queue one request and wait for its results. Cancelling the caller drops it.

        A full queue raises QueueFull, or with `block` waits for room (streams use that:
        backpressure on the stream instead of failing it).
        """
        while True:
            if self._closing:
                raise ShuttingDown("server is shutting down")
            depth = self.depth
            if depth < self.max_queue:
                break
            if not block:
                raise QueueFull(depth, self.retry_after_s())
            self._room.clear()
            await self._room.wait()
        work = _Work(parsed, asyncio.get_running_loop().create_future(), deadline)
        self._queue.append(work)
        self._metrics.queue_size.set(depth + 1)
        self._wakeup.set()
        # Cancelling the caller cancels this future: the loop sees it done and drops the
        # work unserved (counted) when it reaches it.
        return await work.future

    async def run_exclusive(self, fn: Callable[[], Any]) -> Any:
        """Run fn() on the device thread between batches, in queue order (weight reloads).

        Never refused for a full queue: control work is rare and must not starve.
        """
        if self._closing:
            raise ShuttingDown("server is shutting down")
        ctl = _Control(fn, asyncio.get_running_loop().create_future())
        self._queue.append(ctl)
        self._wakeup.set()
        return await ctl.future

    async def close(self) -> None:
        """Stop accepting; the loop finishes what is queued, then exits."""
        self._closing = True
        self._wakeup.set()
        self._room.set()
        if self._task is not None:
            await self._task

    # -- the device owner ---------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            while not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            head = self._queue[0]
            if isinstance(head, _Control):
                self._queue.popleft()
                await self._run_control(head)
                continue
            if self.max_wait_s > 0 and not self._closing:
                await self._fill(head)
            batch = self._take()
            self._metrics.queue_size.set(self.depth)
            self._room.set()
            if batch:
                await self._run_batch(batch)

    async def _fill(self, head: _Work) -> None:
        """Wait (at most max_wait after the head arrived) for more work of the head's key."""
        until = head.enqueued + self.max_wait_s
        while True:
            tokens, count = 0, 0
            for w in self._queue:
                if isinstance(w, _Control):
                    return  # a reload is waiting: do not hold it up
                if w.parsed.key == head.parsed.key:
                    tokens += w.parsed.num_tokens
                    count += 1
            if tokens >= self.max_batch_tokens or count >= self.max_batch_requests:
                return
            remaining = until - time.monotonic()
            if remaining <= 0 or self._closing:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _drop_if_dead(self, w: _Work, now: float) -> bool:
        # Deadline first: the handler's wait_for cancels the future at the deadline, so a
        # done future past its deadline is a deadline drop, not a caller's cancel.
        if w.deadline is not None and now >= w.deadline:
            self._metrics.dropped.labels("deadline").inc()
            if not w.future.done():
                w.future.set_exception(DeadlineExpired("deadline expired while queued"))
            return True
        if w.future.done():  # cancelled by its caller
            self._metrics.dropped.labels("cancelled").inc()
            return True
        return False

    def _take(self) -> list[_Work]:
        """Pop the batch: the first live request's key, FIFO, within budget; stop at control."""
        now = time.monotonic()
        loaded = str(self._backend.policy_version)
        batch: list[_Work] = []
        kept: collections.deque[_Work | _Control] = collections.deque()
        key, tokens, blocked = None, 0, False
        while self._queue:
            w = self._queue.popleft()
            if blocked or isinstance(w, _Control):
                blocked = True  # nothing may jump over a reload
                kept.append(w)
                continue
            if self._drop_if_dead(w, now):
                continue
            expected = w.parsed.expected_policy_version
            if expected and expected != loaded:
                w.future.set_exception(PolicyVersionMismatch(expected, loaded))
                continue
            if key is None:
                key = w.parsed.key
            fits = not batch or tokens + w.parsed.num_tokens <= self.max_batch_tokens
            if w.parsed.key == key and fits and len(batch) < self.max_batch_requests:
                batch.append(w)
                tokens += w.parsed.num_tokens
            else:
                kept.append(w)
        self._queue = kept
        return batch

    async def _run_control(self, ctl: _Control) -> None:
        if ctl.future.done():
            return
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(self._executor, ctl.fn)
        except Exception as exc:
            if not ctl.future.done():
                ctl.future.set_exception(exc)
        else:
            if not ctl.future.done():
                ctl.future.set_result(result)

    async def _run_batch(self, batch: list[_Work]) -> None:
        m = self._metrics
        start = time.monotonic()
        for w in batch:
            if w.started is None:  # once per request: _recover re-runs failed batches
                w.started = start
                m.queue_duration.observe(start - w.enqueued)
        pairs = [p for w in batch for p in w.parsed.pairs]
        head = batch[0].parsed
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        try:
            scored = await loop.run_in_executor(
                self._executor,
                lambda: run_budgeted(
                    self._backend, pairs, head.params, head.with_entropy, self.max_batch_tokens
                ),
            )
        except Exception as exc:
            await self._recover(batch, exc)
            return
        elapsed = time.perf_counter() - t0
        ntok = sum(w.parsed.num_tokens for w in batch)
        m.inference_duration.observe(elapsed)
        m.batch_size.observe(len(batch))
        m.batch_tokens.observe(ntok)
        m.tokens.inc(ntok)
        m.sequences.inc(len(pairs))
        for stage, seconds in scored.stage_seconds.items():
            m.stage_duration.labels(stage).observe(float(seconds))
        results = scored.results
        self._ema_batch_s = 0.8 * self._ema_batch_s + 0.2 * elapsed
        self._ema_batch_requests = 0.8 * self._ema_batch_requests + 0.2 * len(batch)
        if len(results) != len(pairs):
            err = RuntimeError(f"runner returned {len(results)} results for {len(pairs)}")
            for w in batch:
                if not w.future.done():
                    w.future.set_exception(err)
            return
        offset = 0
        for w in batch:
            n = len(w.parsed.pairs)
            mine = results[offset : offset + n]
            offset += n
            if w.future.done():
                continue  # its caller gave up while the batch ran
            expected = w.parsed.expected_policy_version
            served = {str(r.policy_version) for r in mine}
            if expected and served != {expected}:
                # Belt and braces: never hand out numbers from other weights than asked for.
                w.future.set_exception(PolicyVersionMismatch(expected, ",".join(sorted(served))))
                continue
            queued = (w.started if w.started is not None else start) - w.enqueued
            w.future.set_result(Outcome(mine, queued, elapsed))

    async def _recover(self, batch: list[_Work], exc: Exception) -> None:
        """Isolate failures: retry the requests one by one; a lone failure is final."""
        live = [w for w in batch if not w.future.done()]
        if not live:
            return
        if len(live) == 1:
            live[0].future.set_exception(exc)
            return
        log.info("batch of %d requests failed (%s); retrying one by one", len(live), exc)
        for w in live:
            await self._run_batch([w])
