"""A Triton failure never fails a call of the engine's packed front (the runner's path): the
call is answered by the chunked backend once, with one warning per kind of call and a count
(anchorcredit.engine.span.fallback); later calls of that kind skip the kernel; an
out-of-memory error still reaches the scorer, which splits the batch."""

from __future__ import annotations

import logging

import pytest
import torch

from anchorcredit.engine import span_stats_packed
from anchorcredit.engine.span import fallback
from anchorcredit.engine.span.reference import max_relative_error, span_stats_reference

triton = pytest.importorskip("triton")
from triton.runtime.errors import OutOfResources  # noqa: E402

from anchorcredit.engine.span import triton_kernel  # noqa: E402


@pytest.fixture(autouse=True)
def clean_fallback():
    fallback.reset()
    yield
    fallback.reset()


@pytest.fixture
def failing_kernel(monkeypatch):
    """The kernel's launches fail as a launch over the shared-memory limit does."""
    calls = []

    def run(self):
        calls.append(self)
        raise OutOfResources(232448, 101376, "shared memory")

    monkeypatch.setattr(triton_kernel.Plan, "run", run)
    return calls


def _inputs():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(4, 70, 16, generator=gen)
    k = torch.randn(2, 70, 16, generator=gen)
    return q, k, [0, 30, 70], [5, 9]


def test_a_failing_kernel_is_answered_by_the_chunked_backend(interpret, failing_kernel, caplog):
    q, k, cu, prompts = _inputs()
    args = (q, k, cu, prompts, 10, 10, None, 0.25, "triton")
    with caplog.at_level(logging.WARNING, logger="anchorcredit.engine.span"):
        got = span_stats_packed(*args)
        again = span_stats_packed(*args)
    for stats in (got, again):
        for b, (lo, hi) in enumerate(zip(cu[:-1], cu[1:], strict=True)):
            ref = span_stats_reference(q[:, lo:hi].double(), k[:, lo:hi].double(), prompts[b],
                                       10, 10, None, 0.25)  # fmt: skip
            assert max_relative_error(stats[b], ref) <= 1e-5
    assert len(failing_kernel) == 1  # the second call of the kind went straight to chunked
    assert fallback.total() == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "OutOfResources" in warnings[0].getMessage()
    # Another kind of call (a finite horizon) tries the kernel again, and warns again.
    span_stats_packed(q, k, cu, prompts, 10, 10, 100, 0.25, "triton")
    assert len(failing_kernel) == 2 and fallback.total() == 3


def test_out_of_memory_is_not_a_fallback(interpret, monkeypatch):
    def run(self):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(triton_kernel.Plan, "run", run)
    q, k, cu, prompts = _inputs()
    with pytest.raises(torch.OutOfMemoryError):
        span_stats_packed(q, k, cu, prompts, 10, 10, 100, 0.25, "triton")
    assert fallback.total() == 0


def test_the_kernel_path_itself_does_not_fall_back(interpret):
    q, k, cu, prompts = _inputs()
    got = span_stats_packed(q, k, cu, prompts, 10, 10, 100, 0.25, "triton")
    assert fallback.total() == 0 and len(got) == 2
