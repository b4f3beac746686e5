"""A span kernel that fails on the device never fails a request: the server answers it with
the chunked backend's numbers (engine.span.fallback) and counts it on /metrics as
anchorcredit_span_fallback_total."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from debug_model import build_debug_model

from anchorcredit.runner import Scorer
from anchorcredit.server.convert import from_f32_bytes
from anchorcredit.v1 import credit_pb2 as pb

triton = pytest.importorskip("triton")
from triton.runtime.errors import OutOfResources  # noqa: E402

from anchorcredit.engine.span import fallback, triton_kernel  # noqa: E402


@pytest.fixture
def failing_kernel(monkeypatch):
    """Every triton launch fails as one over the GPU's shared-memory limit does."""
    fallback.reset()
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the kernel path up to its launches, on CPU

    def run(self):
        raise OutOfResources(232448, 101376, "shared memory")

    monkeypatch.setattr(triton_kernel.Plan, "run", run)
    yield
    fallback.reset()


def test_a_failing_kernel_still_answers_and_is_counted(failing_kernel, start_server: Any):
    model = build_debug_model("llama", seed=0)
    scorer = Scorer.from_pretrained(model, backend="triton")
    want = Scorer.from_pretrained(build_debug_model("llama", seed=0), backend="chunked")
    rng = np.random.default_rng(0)
    pairs = [(rng.integers(0, 256, 6).tolist(), rng.integers(0, 256, 24).tolist())
             for _ in range(3)]  # fmt: skip
    server = start_server(None, scorer)  # stopped by the fixture
    assert server.sample("anchorcredit_span_fallback_total") == 0
    request = pb.ScoreRequest(
        sequences=[pb.Sequence(prompt_ids=p, response_ids=r) for p, r in pairs]
    )
    reply = server.stub.Score(request, timeout=60)
    expected = want.score(pairs)
    for got, exp in zip(reply.results, expected, strict=True):
        np.testing.assert_array_equal(from_f32_bytes(got.gamma), exp.gamma)
        np.testing.assert_allclose(from_f32_bytes(got.waad), exp.waad, rtol=1e-6)
    # one statistics call per selected layer, each answered by the chunked backend
    assert server.sample("anchorcredit_span_fallback_total") == len(scorer.layers)
    server.stub.Score(request, timeout=60)  # a known failure: straight to chunked
    assert server.sample("anchorcredit_span_fallback_total") == 2 * len(scorer.layers)
