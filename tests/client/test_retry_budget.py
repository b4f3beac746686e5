"""The client's retry policy: a busy server is retried within a time budget after its hint
plus exponential backoff with full jitter; a down one by count or by the reconnect budget.

Budgets are checked on a fake clock that moves only when the client sleeps, so the counts
and times asserted are exact however loaded the machine is (a real clock flaked here)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from anchorcredit.client import CreditServiceError
from anchorcredit.client.transport import Transport


class _Err(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, hint_ms: int | None = None) -> None:
        self._code, self._hint = code, hint_ms

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "busy"

    def trailing_metadata(self) -> Any:
        return () if self._hint is None else (("retry-after-ms", str(self._hint)),)


def _transport(**kw: Any) -> Transport:
    return Transport(["127.0.0.1:1"], **kw)


class _FakeClock:
    """Monotonic time that passes only when the client sleeps (at least a microsecond, as
    real time would: a sleep of what is left of a budget always reaches its end)."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(1e-6, seconds)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _FakeClock:
    """The transport's and the retry policy's clock and sleep, faked."""
    from anchorcredit.client import retry_policy, transport

    fake = _FakeClock()
    fake_time = SimpleNamespace(monotonic=fake.monotonic, sleep=fake.sleep)
    monkeypatch.setattr(retry_policy, "time", fake_time)
    monkeypatch.setattr(transport, "time", fake_time)
    # RetryClock's start defaults to the real clock (bound when the class was made)
    monkeypatch.setattr(
        transport,
        "RetryClock",
        lambda budget_s: retry_policy.RetryClock(budget_s, started=fake.monotonic()),
    )
    return fake


def test_waits_are_at_least_the_hint_and_spread_over_it():
    t = _transport(backoff_base_s=0.05, backoff_max_s=5.0)
    err = _Err(grpc.StatusCode.RESOURCE_EXHAUSTED, hint_ms=400)
    waits = [t._delay(err, attempt=0, next_untried=False) for _ in range(400)]
    assert min(waits) >= 0.4  # never sooner than told
    assert max(waits) <= 0.8 + 1e-9  # hint + uniform(0, max(hint, backoff))
    assert max(waits) - min(waits) > 0.2  # full jitter: spread over the drain time, no wave
    late = [t._delay(err, attempt=8, next_untried=False) for _ in range(400)]
    assert max(late) > 1.0  # the backoff window grows past the hint with the attempts


def test_busy_is_bounded_by_time_and_down_by_count(
    monkeypatch: pytest.MonkeyPatch, clock: _FakeClock
):
    t = _transport(retries=2, backoff_base_s=0.001, backoff_max_s=0.01, retry_budget_s=0.3)
    calls: list[float] = []

    def busy(ti: int, method: str, request: Any, timeout: float | None = None) -> Any:
        calls.append(clock.monotonic())
        raise _Err(grpc.StatusCode.RESOURCE_EXHAUSTED, hint_ms=20)

    monkeypatch.setattr(t, "_invoke", busy)
    began = clock.monotonic()
    with pytest.raises(CreditServiceError) as e:
        t.call("Score", None)
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    # waits of 20-40 ms in a 0.3 s budget: more than `retries`, a busy server is retried by
    # time; the last wait is cut to the budget, so the last attempt starts exactly at it
    assert 0.3 / 0.04 <= len(calls) - 1 <= 0.3 / 0.02 + 1
    assert calls[-1] - began == pytest.approx(0.3, abs=1e-4)

    calls.clear()

    def down(ti: int, method: str, request: Any, timeout: float | None = None) -> Any:
        calls.append(clock.monotonic())
        raise _Err(grpc.StatusCode.UNAVAILABLE)

    monkeypatch.setattr(t, "_invoke", down)
    with pytest.raises(CreditServiceError) as e:
        t.call("Score", None)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE and len(calls) == 3  # 1 + retries=2
    t.close()


class _Verdict(_Err):
    """An error with the server's retry verdict (and a hint only in its message)."""

    def __init__(self, code: grpc.StatusCode, retryable: str) -> None:
        super().__init__(code)
        self._retryable = retryable

    def details(self) -> str:
        return "request queue full (3 waiting); retry after ~400 ms"

    def trailing_metadata(self) -> Any:
        return (("anchorcredit-retryable", self._retryable),)


def test_the_status_tables_verdict_decides_and_messages_are_never_parsed(
    monkeypatch: pytest.MonkeyPatch,
):
    t = _transport(backoff_base_s=0.001, backoff_max_s=0.01, retry_budget_s=5.0)
    assert t._delay(_Verdict(grpc.StatusCode.RESOURCE_EXHAUSTED, "1"), 0, False) < 0.05
    calls: list[str] = []

    def oom(ti: int, method: str, request: Any, timeout: float | None = None) -> Any:
        calls.append(method)
        raise _Verdict(grpc.StatusCode.RESOURCE_EXHAUSTED, "0")

    monkeypatch.setattr(t, "_invoke", oom)
    with pytest.raises(CreditServiceError) as e:
        t.call("Score", None)
    assert len(calls) == 1 and not e.value.retryable  # answered once: no split can help
    t.close()


def test_no_target_answering_is_retried_for_the_reconnect_budget(
    monkeypatch: pytest.MonkeyPatch, clock: _FakeClock
):
    t = _transport(backoff_base_s=0.001, backoff_max_s=0.02, reconnect_budget_s=0.3)
    assert t.retries is None  # the default: time, not a count, bounds reconnection
    calls: list[float] = []

    def down(ti: int, method: str, request: Any, timeout: float | None = None) -> Any:
        calls.append(clock.monotonic())
        raise _Err(grpc.StatusCode.UNAVAILABLE)

    monkeypatch.setattr(t, "_invoke", down)
    began = clock.monotonic()
    with pytest.raises(CreditServiceError) as e:
        t.call("Score", None)
    assert "reconnect_budget_s=0.3" in str(e.value)
    # waits of at most 20 ms (full jitter; the window starts at 1 ms) in a 0.3 s budget
    assert len(calls) - 1 >= 0.3 / 0.02 and calls[-1] - began == pytest.approx(0.3, abs=1e-4)
    t.close()


def test_the_retry_policy_refuses_nonsense_and_windows_grow_to_the_cap():
    from anchorcredit.client.retry_policy import RetryPolicy

    with pytest.raises(ValueError, match="reconnect_budget_s"):
        RetryPolicy(reconnect_budget_s=float("nan"))
    p = RetryPolicy(base_s=0.05, max_s=5.0)
    assert [p.window(n) for n in (0, 1, 2)] == [0.05, 0.1, 0.2] and p.window(99) == 5.0
    assert all(0.4 <= p.wait(0, hint_s=0.4) <= 0.8 for _ in range(200))


def test_a_call_a_stopping_server_cancelled_goes_to_another_address(
    monkeypatch: pytest.MonkeyPatch,
):
    """The client never cancels its own calls: CANCELLED means gRPC dropped it on a server
    that stopped under it (a drain), so it is tried again elsewhere, not lost."""
    t = Transport(["127.0.0.1:1", "127.0.0.1:2"], backoff_base_s=0.001)
    tried: list[int] = []

    def first_stops(ti: int, method: str, request: Any, timeout: float | None = None) -> Any:
        tried.append(ti)
        if len(tried) == 1:
            raise _Err(grpc.StatusCode.CANCELLED)
        return "answered"

    monkeypatch.setattr(t, "_invoke", first_stops)
    assert t.call("Score", None) == "answered" and tried[0] != tried[1]
    t.close()
