"""The batcher's scheduling (server/batcher.py) against a fake backend the test steps
forward by forward: batches, budget, queue limit, drops, reload order, failure isolation,
out-of-memory halving and fairness. Ordered by events, never by sleeping."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest

from anchorcredit.backend import BatchScores
from anchorcredit.errors import DeviceOutOfMemory, InputError, PolicyVersionMismatch
from anchorcredit.runner.inputs import validate_pairs
from anchorcredit.server import convert
from anchorcredit.server.batcher import Batcher, DeadlineExpired, QueueFull
from anchorcredit.server.metrics import ServerMetrics
from anchorcredit.v1 import credit_pb2 as pb


def _req(**kw) -> pb.ScoreRequest:
    seqs = kw.pop("sequences", [pb.Sequence(prompt_ids=[1, 2], response_ids=[3, 4, 5])])
    return pb.ScoreRequest(sequences=seqs, **kw)


class FakeBackend:
    """score_batch(pairs) -> one result per pair, tagged with the pair's first prompt id.

    Each forward records the tags it holds (`forwards`, sizes in `calls`) and says it
    started (`entered`); while `held`, it then waits for its own `go`. Tests order events
    by these, never by sleeping."""

    def __init__(self, held: bool = False) -> None:
        self.policy_version = "0"
        self.calls: list[int] = []
        self.forwards: list[list[int]] = []
        self.held = held
        self.entered = threading.Semaphore(0)
        self.go = threading.Semaphore(0)
        self.fail_on: int | None = None  # a token id that makes score_batch() raise
        self.oom_over: int | None = None  # raise an OOM above this many sequences
        self.oom_longer: int | None = None  # ... or when a sequence has more tokens

    def score_batch(self, pairs, params, with_entropy=False):
        self.forwards.append([int(p.prompt[0]) for p in pairs])
        self.entered.release()
        if self.held:
            assert self.go.acquire(timeout=30), "the test never let this forward run"
        self.calls.append(len(pairs))
        too_long = self.oom_longer is not None and any(
            p.num_tokens > self.oom_longer for p in pairs
        )
        if too_long or (self.oom_over is not None and len(pairs) > self.oom_over):
            raise type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory")
        if self.fail_on is not None and any(self.fail_on in p.prompt for p in pairs):
            raise InputError("bad id", field="sequences[0].prompt_ids", index=0)
        return BatchScores(
            [
                SimpleNamespace(
                    gamma=np.ones(len(p.response), np.float32),
                    tag=int(p.prompt[0]),
                    policy_version=self.policy_version,
                )
                for p in pairs
            ]
        )

    async def next_forward(self) -> list[int]:
        """Wait until the next forward started; the tags it holds."""
        assert await asyncio.to_thread(self.entered.acquire, True, 30)
        return self.forwards[-1]

    def release_all(self) -> None:
        """Let every forward run, held or still to come."""
        self.held = False
        self.go.release(1000)


def _parsed(tag: int, n_tokens: int = 4, version: str = "", strategy: str = "uniform"):
    req = _req(
        sequences=[pb.Sequence(prompt_ids=[tag] + [0] * (n_tokens - 2), response_ids=[1])],
        strategy=strategy,
        expected_policy_version=version,
    )
    parsed = convert.parse_request(req, 16, 10**6)
    parsed.pairs = validate_pairs(parsed.pairs, vocab_size=1000, max_positions=None)
    return parsed


def _run(coro_fn, scorer: FakeBackend, **kw):
    """Run coro_fn(batcher, metrics) with a fresh batcher on a fresh loop."""

    async def main():
        metrics = ServerMetrics()
        with ThreadPoolExecutor(1) as ex:
            b = Batcher(scorer, ex, metrics, **kw)
            b.start()
            try:
                return await asyncio.wait_for(coro_fn(b, metrics), 20)
            finally:
                scorer.release_all()
                await b.close()

    return asyncio.run(main())


async def _queued(b: Batcher, depth: int) -> None:
    """Until `depth` requests wait in the queue: submit() queues as soon as its task runs,
    so yielding to the loop (no wall-clock wait) is enough."""
    while b.depth < depth:
        await asyncio.sleep(0)


def _hist_count(metrics: ServerMetrics, name: str) -> tuple[float, float]:
    """(count, sum) of a histogram in the registry."""
    count = metrics.registry.get_sample_value(f"{name}_count") or 0.0
    total = metrics.registry.get_sample_value(f"{name}_sum") or 0.0
    return count, total


def test_requests_that_arrive_while_the_device_is_busy_share_the_next_batch_in_order():
    scorer = FakeBackend(held=True)

    async def go(b, metrics):
        first = asyncio.ensure_future(b.submit(_parsed(100)))
        assert await scorer.next_forward() == [100]  # the first batch holds the device
        rest = [asyncio.ensure_future(b.submit(_parsed(i))) for i in range(5)]
        await _queued(b, 5)
        scorer.go.release()
        assert await scorer.next_forward() == [0, 1, 2, 3, 4]
        scorer.release_all()
        outs = await asyncio.gather(first, *rest)
        return outs, metrics

    outs, metrics = _run(go, scorer, max_wait_s=0.01)
    assert scorer.calls == [1, 5]
    assert [o.results[0].tag for o in outs] == [100, 0, 1, 2, 3, 4]
    assert _hist_count(metrics, "anchorcredit_batch_size") == (2.0, 6.0)


def test_token_budget_and_keys_split_batches():
    scorer = FakeBackend(held=True)

    async def go(b, metrics):
        first = asyncio.ensure_future(b.submit(_parsed(100)))
        assert await scorer.next_forward() == [100]
        rest = [asyncio.ensure_future(b.submit(_parsed(i, n_tokens=10))) for i in range(4)]
        other = asyncio.ensure_future(b.submit(_parsed(7, strategy="random")))
        await _queued(b, 5)
        scorer.release_all()
        return await asyncio.gather(first, *rest, other)

    _run(go, scorer, max_batch_tokens=25, max_wait_s=0.0)
    # 2 x 10 tokens fit in 25; the other key waits until it is the oldest request
    assert scorer.calls == [1, 2, 2, 1]


def test_queue_full_gives_hint_and_recovers():
    scorer = FakeBackend(held=True)

    async def go(b, metrics):
        running = asyncio.ensure_future(b.submit(_parsed(1)))
        assert await scorer.next_forward() == [1]
        queued = [asyncio.ensure_future(b.submit(_parsed(2))) for _ in range(2)]
        await _queued(b, 2)
        with pytest.raises(QueueFull) as info:
            await b.submit(_parsed(3))
        assert info.value.retry_after_s > 0 and "retry after" in str(info.value)
        scorer.release_all()
        await asyncio.gather(running, *queued)
        return await b.submit(_parsed(4))

    out = _run(go, scorer, max_queue=2, max_wait_s=0.0)
    assert out.results[0].tag == 4


def test_cancelled_and_expired_requests_are_dropped_and_counted():
    scorer = FakeBackend(held=True)

    async def go(b, metrics):
        running = asyncio.ensure_future(b.submit(_parsed(1)))
        assert await scorer.next_forward() == [1]
        cancelled = asyncio.ensure_future(b.submit(_parsed(2)))
        expired = asyncio.ensure_future(b.submit(_parsed(3), deadline=time.monotonic()))
        # What the handler does: wait_for cancels the future once the deadline passed,
        # before the batcher sees it; still a deadline drop, not a cancel. (Its timeout is
        # longer than the deadline's 10 ms, so the cancel lands after the deadline however
        # late the loop runs the timer.)
        deadline = time.monotonic() + 0.01
        timed_out = asyncio.ensure_future(asyncio.wait_for(b.submit(_parsed(4), deadline), 0.1))
        await _queued(b, 3)
        cancelled.cancel()
        with pytest.raises(TimeoutError):
            await timed_out  # its deadline passed while the device was held
        scorer.release_all()
        await running
        with pytest.raises(DeadlineExpired):
            await expired
        return metrics

    metrics = _run(go, scorer, max_wait_s=0.0)
    assert scorer.calls == [1]  # neither dropped request reached the device
    reg = metrics.registry
    assert reg.get_sample_value("anchorcredit_queue_dropped_total", {"reason": "cancelled"}) == 1
    assert reg.get_sample_value("anchorcredit_queue_dropped_total", {"reason": "deadline"}) == 2


def test_weight_reload_is_ordered_with_batches():
    scorer = FakeBackend(held=True)

    async def go(b, metrics):
        running = asyncio.ensure_future(b.submit(_parsed(1, version="0")))
        assert await scorer.next_forward() == [1]
        before = asyncio.ensure_future(b.submit(_parsed(2, version="0")))
        reload = asyncio.ensure_future(
            b.run_exclusive(lambda: setattr(scorer, "policy_version", "1"))
        )
        after_new = asyncio.ensure_future(b.submit(_parsed(3, version="1")))
        after_old = asyncio.ensure_future(b.submit(_parsed(4, version="0")))
        await _queued(b, 3)  # the reload was queued between `before` and `after_new`
        scorer.release_all()
        outs = await asyncio.gather(
            running, before, reload, after_new, after_old, return_exceptions=True
        )
        return outs

    r1, r2, _, r3, r4 = _run(go, scorer, max_wait_s=0.0)
    assert r1.results[0].policy_version == "0" and r2.results[0].policy_version == "0"
    assert r3.results[0].policy_version == "1"
    assert isinstance(r4, PolicyVersionMismatch)


def test_bad_request_in_merged_batch_fails_alone():
    scorer = FakeBackend(held=True)
    scorer.fail_on = 66

    async def go(b, metrics):
        running = asyncio.ensure_future(b.submit(_parsed(1)))
        assert await scorer.next_forward() == [1]
        others = [asyncio.ensure_future(b.submit(_parsed(t))) for t in (2, 66, 3)]
        await _queued(b, 3)
        scorer.release_all()
        outs = await asyncio.gather(running, *others, return_exceptions=True)
        return outs, metrics

    outs, metrics = _run(go, scorer, max_wait_s=0.0)
    assert isinstance(outs[2], InputError)
    assert [o.results[0].tag for i, o in enumerate(outs) if i != 2] == [1, 2, 3]
    assert scorer.calls == [1, 3, 1, 1, 1]  # the merged batch failed and was re-run
    # queue time is observed once per request, not again for the re-runs
    assert _hist_count(metrics, "anchorcredit_queue_duration_seconds")[0] == 4


def test_oom_is_split_then_resource_exhausted():
    scorer = FakeBackend(held=True)
    scorer.oom_over = 1
    scorer.oom_longer = 40

    async def go(b, metrics):
        running = asyncio.ensure_future(b.submit(_parsed(1)))
        assert await scorer.next_forward() == [1]
        two = [asyncio.ensure_future(b.submit(_parsed(t))) for t in (2, 3)]
        pair = _parsed(8)
        pair.pairs = pair.pairs * 2  # two sequences in one request: split by sequence
        halved = asyncio.ensure_future(b.submit(pair))
        too_big = asyncio.ensure_future(b.submit(_parsed(9, n_tokens=50)))  # one sequence
        await _queued(b, 4)
        scorer.release_all()
        return await asyncio.gather(running, *two, halved, too_big, return_exceptions=True)

    outs = _run(go, scorer, max_wait_s=0.0)
    assert [o.results[0].tag for o in outs[:3]] == [1, 2, 3]
    assert [r.tag for r in outs[3].results] == [8, 8]
    assert isinstance(outs[4], DeviceOutOfMemory)


def test_the_batcher_cuts_a_request_over_the_budget_into_forwards():
    scorer = FakeBackend()

    async def go(b, metrics):
        big = _parsed(5, n_tokens=10)
        big.pairs = big.pairs * 5  # 50 tokens in one request, budget 25
        return await b.submit(big)

    out = _run(go, scorer, max_batch_tokens=25, max_wait_s=0.0)
    assert scorer.calls == [2, 2, 1] and [r.tag for r in out.results] == [5] * 5


def _many(tag: int, sequences: int, n_tokens: int):
    one = pb.Sequence(prompt_ids=[tag] + [0] * (n_tokens - 2), response_ids=[1])
    parsed = convert.parse_request(_req(sequences=[one] * sequences, strategy="uniform"), 16, 10**6)
    parsed.pairs = validate_pairs(parsed.pairs, vocab_size=1000, max_positions=None)
    return parsed


def test_a_small_call_waits_one_piece_behind_a_large_one():
    """Budget 10: a large request (6 x 5 tokens = 3 pieces) is on the device when a small
    one arrives. The next forward is the small one alone: the large one's rest goes behind
    what arrived while its piece ran (it went ahead of it before: two pieces of wait)."""
    scorer = FakeBackend(held=True)

    async def go(b, metrics):
        big = asyncio.ensure_future(b.submit(_many(1, 6, 5)))
        assert await scorer.next_forward() == [1, 1]
        small = asyncio.ensure_future(b.submit(_parsed(2, n_tokens=4)))
        await _queued(b, 2)  # the large one's rest and the small one
        scorer.go.release()
        assert await scorer.next_forward() == [2]
        scorer.go.release(10)
        await asyncio.gather(big, small)
        return scorer.forwards

    assert _run(go, scorer, max_batch_tokens=10, max_wait_s=0.0) == [[1, 1], [2], [1, 1], [1, 1]]


def test_a_small_calls_batch_is_not_topped_up_with_a_piece_of_a_large_one():
    """A small call queued just before a large one goes in a forward of its own: the large
    one joins a batch only whole (and is cut into pieces only when it leads one)."""
    scorer = FakeBackend(held=True)

    async def go(b, metrics):
        blocker = asyncio.ensure_future(b.submit(_parsed(9, n_tokens=4)))
        assert await scorer.next_forward() == [9]
        small = asyncio.ensure_future(b.submit(_parsed(2, n_tokens=4)))
        big = asyncio.ensure_future(b.submit(_many(1, 4, 5)))
        await _queued(b, 2)
        scorer.go.release()
        assert await scorer.next_forward() == [2]  # not [2, 1]: no piece of the large one
        scorer.go.release(10)
        await asyncio.gather(blocker, small, big)
        return scorer.forwards

    assert _run(go, scorer, max_batch_tokens=10, max_wait_s=0.0) == [[9], [2], [1, 1], [1, 1]]
