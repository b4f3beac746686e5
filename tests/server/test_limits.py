"""Server limits are written once (server/config.BatchLimits) and the budget is applied once.

The serve config, the batcher, `anchorcredit score` and bench/service.py read the same
defaults; the batcher's device call runs the batch `_take` sized as one forward (halved only
when it runs out of memory); `score_batch` takes validated TokenPairs and never re-checks ids.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from anchorcredit.backend import BatchScores, TokenPair
from anchorcredit.contract import CreditParams
from anchorcredit.server.batcher import Batcher, run_forward
from anchorcredit.server.config import DEFAULT_LIMITS, BatchLimits, ServeConfig
from anchorcredit.server.metrics import ServerMetrics

ROOT = Path(__file__).resolve().parents[2]


class CountingBackend:
    """Records the size of every forward; runs out of memory above `fits` sequences."""

    policy_version = "0"

    def __init__(self, fits: int | None = None) -> None:
        self.fits = fits
        self.forwards: list[int] = []

    def score_batch(self, pairs, params, with_entropy=False):
        self.forwards.append(len(pairs))
        if self.fits is not None and len(pairs) > self.fits:
            raise type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory")
        results = [SimpleNamespace(tag=int(p.prompt[0]), policy_version="0") for p in pairs]
        return BatchScores(results, {"forward": 1.0})


def _pairs(n: int, tokens: int = 10) -> list[TokenPair]:
    return [TokenPair(np.array([i] + [0] * (tokens - 2)), np.array([1]), 1000) for i in range(n)]


def test_serve_config_batcher_and_score_cli_share_one_set_of_defaults():
    assert ServeConfig().limits == DEFAULT_LIMITS == BatchLimits()
    assert ServeConfig().max_wait_ms == pytest.approx(DEFAULT_LIMITS.max_wait_s * 1000)

    async def batcher_limits() -> BatchLimits:
        with ThreadPoolExecutor(1) as ex:
            return Batcher(CountingBackend(), ex, ServerMetrics()).limits

    assert asyncio.run(batcher_limits()) == DEFAULT_LIMITS

    from anchorcredit.cli import score

    p = argparse.ArgumentParser()
    score.add_arguments(p)
    args = p.parse_args(["in.jsonl", "-o", "out.jsonl"])
    assert args.max_batch_tokens == DEFAULT_LIMITS.max_batch_tokens


def test_no_module_restates_the_server_limit_defaults():
    """The literal defaults appear in server/config.py only (docs may quote them)."""
    sources = [
        ROOT / "service/anchorcredit/server/batcher.py",
        ROOT / "service/anchorcredit/cli/score.py",
        ROOT / "bench/service.py",
    ]
    for path in sources:
        text = path.read_text()
        assert "16384" not in text and "0.005" not in text, path


def test_configured_limits_reach_the_batcher_and_keywords_override_one():
    cfg = ServeConfig(max_batch_tokens=100, max_wait_ms=0, max_batch_requests=3, max_queue=7)
    assert cfg.limits == BatchLimits(100, 0.0, 3, 7)

    async def made() -> Batcher:
        with ThreadPoolExecutor(1) as ex:
            return Batcher(CountingBackend(), ex, ServerMetrics(), cfg.limits, max_queue=9)

    b = asyncio.run(made())
    assert (b.max_batch_tokens, b.max_wait_s, b.max_batch_requests, b.max_queue) == (
        100,
        0.0,
        3,
        9,
    )


def test_the_device_call_runs_the_batch_it_is_given_as_one_forward():
    backend = CountingBackend()
    got = run_forward(backend, _pairs(6), CreditParams(), False)
    assert backend.forwards == [6]  # no second cut by a budget
    assert [r.tag for r in got.results] == list(range(6))
    assert got.stage_seconds == {"forward": 1.0}


def test_the_device_call_halves_only_on_out_of_memory_and_keeps_the_order():
    backend = CountingBackend(fits=2)
    got = run_forward(backend, _pairs(6), CreditParams(), False)
    assert backend.forwards == [6, 3, 1, 2, 3, 1, 2]
    assert [r.tag for r in got.results] == list(range(6))
    assert got.stage_seconds == {"forward": 4.0}  # added up over the forwards that ran


def test_the_batcher_forms_budget_sized_batches_and_each_is_one_forward():
    """Requests of 10 tokens each under a 35-token budget: forwards of 3, 3, 3, 1."""
    backend = CountingBackend()

    async def main() -> list[int]:
        with ThreadPoolExecutor(1) as ex:
            b = Batcher(backend, ex, ServerMetrics(), BatchLimits(35, 0.0, 64, 256))
            from anchorcredit.server.convert import ParsedRequest

            params = CreditParams()
            works = [
                ParsedRequest(
                    pairs=[pair],
                    params=params,
                    with_entropy=False,
                    outputs=(True, True, True, False),
                    expected_policy_version="",
                    request_id=str(i),
                    num_tokens=pair.num_tokens,
                    key=(params, False),
                )
                for i, pair in enumerate(_pairs(10))
            ]
            # Tasks run in the order they were created: every submit queues its request
            # before the batcher's loop first runs, so batches form from a full queue.
            futures = [asyncio.ensure_future(b.submit(w)) for w in works]
            b.start()
            try:
                outcomes = await asyncio.wait_for(asyncio.gather(*futures), 60)
            finally:
                await b.close()
        assert [[r.tag for r in o.results] for o in outcomes] == [[i] for i in range(10)]
        return backend.forwards

    assert asyncio.run(main()) == [3, 3, 3, 1]


def test_score_batch_takes_validated_pairs_and_score_validates_raw_ids():
    from debug_model import build_debug_model

    from anchorcredit.errors import InputError
    from anchorcredit.runner import Scorer

    scorer = Scorer.from_pretrained(build_debug_model("llama", seed=0))
    raw = [([1, 2, 3], [4, 5, 6])]
    with pytest.raises(TypeError, match="validate"):
        scorer.score_batch(raw, CreditParams())
    assert len(scorer.score_batch(scorer.validate(raw), CreditParams()).results) == 1
    assert len(scorer.score(raw)) == 1
    with pytest.raises(InputError, match=r"sequences\[0\]"):
        scorer.score([([1, -2], [3])])


def test_the_light_defaults_module_imports_without_torch():
    """The score CLI and the benches read the limits without pulling in torch."""
    code = "import sys, anchorcredit.server.config; assert 'torch' not in sys.modules"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
