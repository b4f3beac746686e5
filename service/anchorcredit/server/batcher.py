"""Dynamic batching: one asyncio task owns the queue, the device and the token budget.

Handlers `await batcher.submit(parsed, deadline)`; the loop task forms batches of requests
that share a parameter key, bounded by a token budget and a request cap, waiting at most
`max_wait_s` after the oldest request when the device is idle (when it was busy, the queue
filled meanwhile and no wait is added). The backend (anchorcredit.backend.ScoringBackend)
runs in ONE worker thread (`run_in_executor`), so model calls never overlap and a weight
reload (`run_exclusive`) is ordered with the batches around it: no request is ever answered
by weights other than the ones it was checked against.

The budget is applied here and only here, once: `_take` forms each batch within the token
budget (a request larger than the budget is cut into budget-sized pieces; one sequence
larger than it goes alone) and the backend runs that batch as ONE forward; a forward that
runs out of device memory is halved (anchorcredit.budget.halve_on_oom) down to one
sequence, which then fails alone with DeviceOutOfMemory (RESOURCE_EXHAUSTED). The limits
are the serve config's (server/config.py BatchLimits).

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
from dataclasses import dataclass, field, replace
from typing import Any

from anchorcredit.backend import (
    BatchScores,
    Cancelled,
    ScoreResult,
    ScoringBackend,
    TokenPair,
    cancellable,
    check_cancelled,
)
from anchorcredit.budget import halve_on_oom
from anchorcredit.contract import CreditParams
from anchorcredit.errors import (  # QueueFull & co. are re-exported (their old home)
    DeadlineExpired,
    PolicyVersionMismatch,
    QueueFull,
    ShuttingDown,
)
from anchorcredit.server.config import DEFAULT_LIMITS, BatchLimits
from anchorcredit.server.convert import ParsedRequest
from anchorcredit.server.metrics import ServerMetrics

log = logging.getLogger(__name__)


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
    # Fairness: a request is scored in budget-sized pieces; `next` is its first pair not
    # yet taken, `results` what its pieces returned so far, `compute_s` their seconds.
    next: int = 0
    results: list[ScoreResult] = field(default_factory=list)
    compute_s: float = 0.0
    settled: bool = False  # dropped and counted already (a partial one still queued)

    @property
    def tokens_left(self) -> int:
        if self.next == 0:
            return self.parsed.num_tokens
        return sum(p.num_tokens for p in self.parsed.pairs[self.next :])

    def dead(self, now: float) -> bool:
        """Its caller gave up: cancelled, or the deadline passed (read from any thread)."""
        return self.future.done() or (self.deadline is not None and now >= self.deadline)


# One piece of a request: pairs[lo:hi] of a _Work.
_Piece = tuple[_Work, int, int]


@dataclass
class _Control:
    fn: Callable[[], Any]
    future: asyncio.Future


def run_forward(
    backend: ScoringBackend,
    pairs: list[TokenPair],
    params: CreditParams,
    with_entropy: bool,
    should_stop: Callable[[], bool] | None = None,
) -> BatchScores:
    """Score one batch the batcher already sized (`Batcher._take`: within the token budget,
    or one sequence larger than it, alone), halving a forward that runs out of device
    memory (blocking: runs on the device thread). Stage seconds add up over the halves.

    `should_stop`: checked before each forward and (through anchorcredit.backend.cancellable)
    between the layers of each; true -> Cancelled, the rest is not computed."""
    stages: Counter[str] = Counter()

    def forward(chunk: list[TokenPair]) -> list[ScoreResult]:
        check_cancelled()
        got = backend.score_batch(chunk, params, with_entropy=with_entropy)
        stages.update(got.stage_seconds)
        return got.results

    with cancellable(should_stop or (lambda: False)):
        results = halve_on_oom(forward, pairs)
    return BatchScores(results, dict(stages))


class Batcher:
    """Queue + the one task that owns the device. Create inside a running event loop."""

    def __init__(
        self,
        backend: ScoringBackend,
        executor: Executor,
        metrics: ServerMetrics,
        limits: BatchLimits = DEFAULT_LIMITS,
        *,
        max_batch_tokens: int | None = None,
        max_wait_s: float | None = None,
        max_batch_requests: int | None = None,
        max_queue: int | None = None,
    ) -> None:
        """`limits` come from the serve config (ServeConfig.limits); the keywords override
        one limit each (tests and embedders that set one and keep the other defaults)."""
        given = {
            "max_batch_tokens": max_batch_tokens,
            "max_wait_s": max_wait_s,
            "max_batch_requests": max_batch_requests,
            "max_queue": max_queue,
        }
        limits = replace(limits, **{k: v for k, v in given.items() if v is not None})
        self._backend = backend
        self._executor = executor
        self._metrics = metrics
        self.limits = limits
        self.max_batch_tokens = limits.max_batch_tokens
        self.max_wait_s = limits.max_wait_s
        self.max_batch_requests = limits.max_batch_requests
        self.max_queue = limits.max_queue
        self._queue: collections.deque[_Work | _Control] = collections.deque()
        self._rest: list[_Work] = []  # split requests whose piece is running (_take)
        self._wakeup = asyncio.Event()
        self._room = asyncio.Event()  # set whenever requests leave the queue
        self._closing = False
        self._task: asyncio.Task | None = None
        # Moving averages for the retry hint (the queue's drain time).
        self._ema_batch_s = 0.05
        self._ema_s_per_token = 0.0  # 0 until the first batch was timed
        self._busy_since: float | None = None  # when the running batch started

    # -- public -----------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

    @property
    def depth(self) -> int:
        """Requests waiting (the rest of a split one whose piece runs included)."""
        return sum(isinstance(w, _Work) for w in self._queue) + len(self._rest)

    @property
    def queued_tokens(self) -> int:
        waiting = [w for w in self._queue if isinstance(w, _Work)] + self._rest
        return sum(w.tokens_left for w in waiting)

    def retry_after_s(self) -> float:
        """When the queue will have drained: the tokens waiting times the measured seconds
        per token, plus what is left of the running batch (at least one batch time before
        the first batch was timed); 50 ms to 30 s."""
        now = time.monotonic()
        running = 0.0
        if self._busy_since is not None:
            running = max(0.0, self._ema_batch_s - (now - self._busy_since))
        if self._ema_s_per_token > 0:
            drain = running + self.queued_tokens * self._ema_s_per_token
        else:
            per_batch = max(1.0, self.max_batch_requests / 4)
            drain = running + max(1.0, self.depth / per_batch) * self._ema_batch_s
        return min(30.0, max(0.05, drain))

    async def submit(
        self, parsed: ParsedRequest, deadline: float | None = None, block: bool = False
    ) -> Outcome:
        """Queue one request and wait for its results. Cancelling the caller drops it.

        A full queue raises QueueFull, or with `block` waits for room (streams use that:
        backpressure on the stream instead of failing it).
        """
        while True:
            if self._closing:
                raise ShuttingDown("server is shutting down; retry on another replica")
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
            raise ShuttingDown("server is shutting down; retry on another replica")
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
            self._requeue_rest()

    async def _fill(self, head: _Work) -> None:
        """Wait (at most max_wait after the head arrived) for more work of the head's key."""
        until = head.enqueued + self.max_wait_s
        while True:
            tokens, count = 0, 0
            for w in self._queue:
                if isinstance(w, _Control):
                    return  # a reload is waiting: do not hold it up
                if w.parsed.key == head.parsed.key:
                    tokens += w.tokens_left
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
        if w.settled:  # stopped in flight and counted then; its remaining pieces go
            return True
        # Deadline first: the handler's wait_for cancels the future at the deadline, so a
        # done future past its deadline is a deadline drop, not a caller's cancel.
        if w.deadline is not None and now >= w.deadline:
            self._settle(w, "deadline")
            return True
        if w.future.cancelled():  # cancelled by its caller
            self._settle(w, "cancelled")
            return True
        return w.future.done()  # failed already (a piece of it raised): nothing to count

    def _settle(self, w: _Work, reason: str) -> None:
        """Count a request dropped unserved (queued, between pieces or in flight) once."""
        if w.settled:
            return
        w.settled = True
        self._metrics.dropped.labels(reason).inc()
        if not w.future.done():
            w.future.set_exception(DeadlineExpired(f"deadline expired ({reason})"))

    def _take(self) -> list[_Piece]:
        """Pop the next batch: FIFO from the first live request's key, within budget and
        request cap; stop at control work (nothing jumps over a reload).

        Fairness (a small call waits about one budget-sized forward behind a large one):
        only the request that leads a batch is cut into a budget-sized piece; the others
        join whole or not at all, so a small call's batch is never topped up with a piece
        of a large one. What is left of the leader waits in `_rest` while its piece runs
        and then goes behind everything that arrived meanwhile (still before any reload,
        so one version scores all of it: `_requeue_rest`)."""
        now = time.monotonic()
        loaded = str(self._backend.policy_version)
        batch: list[_Piece] = []
        kept: collections.deque[_Work | _Control] = collections.deque()
        key, tokens, blocked = None, 0, False
        budget = self.max_batch_tokens
        while self._queue:
            w = self._queue.popleft()
            if blocked or isinstance(w, _Control):
                blocked = True
                kept.append(w)
                continue
            if self._drop_if_dead(w, now):
                continue
            expected = w.parsed.expected_policy_version
            if w.next == 0 and expected and expected != loaded:
                w.future.set_exception(PolicyVersionMismatch(expected, loaded))
                continue
            if key is None:
                key = w.parsed.key
            full = len(batch) >= self.max_batch_requests or (batch and tokens >= budget)
            if w.parsed.key != key or full:
                kept.append(w)
                continue
            hi = self._piece_end(w, tokens, leads=not batch)
            if hi == w.next:
                kept.append(w)
                continue
            tokens += sum(p.num_tokens for p in w.parsed.pairs[w.next : hi])
            batch.append((w, w.next, hi))
            w.next = hi
            if hi < len(w.parsed.pairs):
                self._rest.append(w)
        self._queue = kept
        return batch

    def _piece_end(self, w: _Work, tokens: int, leads: bool) -> int:
        """Where the piece of `w` taken now ends: the leader takes what fits the budget (at
        least one sequence: one larger than the budget goes alone); another request joins
        whole if it fits, else not at all (w.next)."""
        pairs, budget = w.parsed.pairs, self.max_batch_tokens
        if not leads:
            return len(pairs) if tokens + w.tokens_left <= budget else w.next
        hi = w.next
        while hi < len(pairs) and (hi == w.next or tokens + pairs[hi].num_tokens <= budget):
            tokens += pairs[hi].num_tokens
            hi += 1
        return hi

    def _requeue_rest(self) -> None:
        """The unscored rest of split requests: behind what arrived while their piece ran,
        before the first reload."""
        if not self._rest:
            return
        items = list(self._queue)
        cut = next((i for i, w in enumerate(items) if isinstance(w, _Control)), len(items))
        self._queue = collections.deque([*items[:cut], *self._rest, *items[cut:]])
        self._rest = []

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

    async def _run_batch(self, batch: list[_Piece]) -> None:
        """Score one batch on the device thread, then hand each request its results."""
        start = time.monotonic()
        self._mark_started(batch, start)
        pairs = [p for w, lo, hi in batch for p in w.parsed.pairs[lo:hi]]
        works = [w for w, _, _ in batch]
        t0 = time.perf_counter()
        self._busy_since = time.monotonic()
        try:
            scored = await self._score_on_device(batch, pairs)
        except Exception as exc:
            self._busy_since = None
            if isinstance(exc, Cancelled):  # every caller gave up: dropped, by reason
                self._settle_stopped(works)
            else:
                await self._recover(batch, exc)
            return
        self._busy_since = None
        elapsed = time.perf_counter() - t0
        self._record(batch, pairs, scored, elapsed)
        if len(scored.results) != len(pairs):
            err = RuntimeError(f"runner returned {len(scored.results)} results for {len(pairs)}")
            for w in works:
                if not w.future.done():
                    w.future.set_exception(err)
            return
        self._deliver(batch, scored.results, elapsed, start)

    def _mark_started(self, batch: list[_Piece], start: float) -> None:
        """Time queued: once per request (its later pieces and _recover re-runs keep it)."""
        for w, _, _ in batch:
            if w.started is None:
                w.started = start
                self._metrics.queue_duration.observe(start - w.enqueued)

    async def _score_on_device(self, batch: list[_Piece], pairs: list[TokenPair]) -> BatchScores:
        """The batch's one forward on the device thread; it stops early (Cancelled) once
        every caller of the batch gave up."""
        head = batch[0][0].parsed
        works = [w for w, _, _ in batch]

        def should_stop() -> bool:  # device thread
            now = time.monotonic()
            return all(w.dead(now) for w in works)

        return await asyncio.get_running_loop().run_in_executor(
            self._executor,
            lambda: run_forward(self._backend, pairs, head.params, head.with_entropy, should_stop),
        )

    def _settle_stopped(self, works: list[_Work]) -> None:
        """A batch stopped in flight: counted like queued drops, by reason."""
        now = time.monotonic()
        for w in works:
            deadline = w.deadline is not None and now >= w.deadline
            self._settle(w, "deadline" if deadline else "cancelled")

    def _record(
        self, batch: list[_Piece], pairs: list[TokenPair], scored: BatchScores, elapsed: float
    ) -> None:
        """The batch's metrics, and the moving averages behind the retry hint."""
        m = self._metrics
        ntok = sum(p.num_tokens for p in pairs)
        m.inference_duration.observe(elapsed)
        m.batch_size.observe(len(batch))
        m.batch_tokens.observe(ntok)
        m.tokens.inc(ntok)
        m.sequences.inc(len(pairs))
        for stage, seconds in scored.stage_seconds.items():
            m.stage_duration.labels(stage).observe(float(seconds))
        self._ema_batch_s = 0.8 * self._ema_batch_s + 0.2 * elapsed
        per_token = elapsed / max(1, ntok)
        self._ema_s_per_token = (
            per_token
            if self._ema_s_per_token == 0
            else 0.8 * self._ema_s_per_token + 0.2 * per_token
        )

    def _deliver(
        self, batch: list[_Piece], results: list[ScoreResult], elapsed: float, start: float
    ) -> None:
        """Each piece's results to its request; a request whose last piece this was is
        answered (never with numbers from weights other than the one version it asked for)."""
        offset = 0
        for w, lo, hi in batch:
            mine = results[offset : offset + hi - lo]
            offset += hi - lo
            if w.future.done():
                continue  # its caller gave up while the batch ran
            w.results += mine
            w.compute_s += elapsed
            if hi < len(w.parsed.pairs):
                continue  # more pieces of it are queued
            expected = w.parsed.expected_policy_version
            served = {str(r.policy_version) for r in w.results}
            if (expected and served != {expected}) or len(served) > 1:
                # Belt and braces: never hand out numbers from other weights than asked for.
                w.future.set_exception(
                    PolicyVersionMismatch(expected or "one version", ",".join(sorted(served)))
                )
                continue
            queued = (w.started if w.started is not None else start) - w.enqueued
            w.future.set_result(Outcome(w.results, queued, w.compute_s))

    async def _recover(self, batch: list[_Piece], exc: Exception) -> None:
        """Isolate failures: retry the pieces one by one; a lone failure is final."""
        live = [piece for piece in batch if not piece[0].future.done()]
        if not live:
            return
        if len(live) == 1:
            live[0][0].future.set_exception(exc)
            return
        log.info("batch of %d requests failed (%s); retrying one by one", len(live), exc)
        for piece in live:
            await self._run_batch([piece])
