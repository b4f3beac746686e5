"""Server pieces without a model: config (flags == env vars), proto conversion and validation,
the batcher's scheduling against a fake backend (fast; the gRPC tests use the real runner)."""

from __future__ import annotations

import argparse
import asyncio
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest

from anchorcredit.backend import BatchScores
from anchorcredit.contract import DEFAULTS, MAX_GAMMA_AMP, STRATEGIES
from anchorcredit.errors import DeviceOutOfMemory, InputError, PolicyVersionMismatch
from anchorcredit.runner.inputs import validate_pairs
from anchorcredit.server import config as cfgmod
from anchorcredit.server import convert
from anchorcredit.server.batcher import Batcher, DeadlineExpired, QueueFull
from anchorcredit.server.metrics import ServerMetrics, one_two_five
from anchorcredit.v1 import credit_pb2 as pb

# ------------------------------------------------------------------------------- config


def test_flags_env_defaults_precedence():
    parser = argparse.ArgumentParser()
    cfgmod.add_arguments(parser)
    env = {
        "ANCHORCREDIT_PORT": "6000",
        "ANCHORCREDIT_MAX_WAIT_MS": "2.5",
        "ANCHORCREDIT_AUTH_TOKEN": "s3cret",
        "ANCHORCREDIT_MAX_BATCH_TOKENS": "4096",
    }
    args = parser.parse_args(["--port", "7000", "--model", "/m"])
    cfg = cfgmod.from_args(args, env)
    assert cfg.port == 7000  # flag beats env
    assert cfg.max_wait_ms == 2.5 and cfg.auth_token == "s3cret"  # env beats default
    assert cfg.metrics_port == 9400 and cfg.model == "/m"
    assert cfg.max_request_tokens == 8 * 4096  # derived from the budget
    assert cfg.max_receive_bytes > 5 * cfg.max_request_tokens


def test_every_field_has_flag_and_env_in_help():
    parser = argparse.ArgumentParser()
    cfgmod.add_arguments(parser)
    text = parser.format_help()
    for flag, env, _ in cfgmod.env_table():
        assert flag in text and env in text.replace("\n", " ").replace("  ", "")
    assert "s3cret" not in text


def test_bad_env_value_is_named():
    with pytest.raises(ValueError, match="ANCHORCREDIT_PORT"):
        cfgmod.ServeConfig.from_env({"ANCHORCREDIT_PORT": "x"})
    with pytest.raises(ValueError, match="tls"):
        cfgmod.ServeConfig(tls_cert="a.pem")


# ------------------------------------------------------------------------------- convert


def _req(**kw) -> pb.ScoreRequest:
    seqs = kw.pop("sequences", [pb.Sequence(prompt_ids=[1, 2], response_ids=[3, 4, 5])])
    return pb.ScoreRequest(sequences=seqs, **kw)


def test_strategy_list_is_the_contracts():
    import importlib

    credit_module = importlib.import_module("anchorcredit.engine.credit")
    assert credit_module.STRATEGIES is STRATEGIES  # one definition, imported, not restated


def test_parse_defaults_and_key():
    p = convert.parse_request(_req(), 16, 1000)
    assert p.params.strategy == "coupled_rhythm" and p.params == DEFAULTS
    assert p.outputs == (True, True, True, False) and not p.with_entropy
    assert p.num_tokens == 5
    q = convert.parse_request(_req(params=pb.CreditParams(h_hi_to_end=True, k=2)), 16, 1000)
    assert q.params.h_hi is None and q.params.k == 2 and q.key != p.key
    e = convert.parse_request(_req(strategy="entropy"), 16, 1000)
    assert e.with_entropy


@pytest.mark.parametrize(
    "request_kw, field",
    [
        (dict(strategy="nope"), "strategy"),
        (dict(params=pb.CreditParams(q=1.5)), "params.q"),
        (dict(params=pb.CreditParams(q=math.nan)), "params.q"),
        (dict(params=pb.CreditParams(k=0)), "params.k"),
        (dict(params=pb.CreditParams(gamma_amp=0.5)), "params.gamma_amp"),
        (dict(params=pb.CreditParams(alpha=-0.1)), "params.alpha"),
        (dict(params=pb.CreditParams(h_lo=20, h_hi=5)), "params.h_hi"),
        (dict(params=pb.CreditParams(h_hi=50, h_hi_to_end=True)), "params.h_hi"),
        (dict(params=pb.CreditParams(head_quantile=0.0)), "params.head_quantile"),
        (dict(params=pb.CreditParams(window=0)), "params.window"),
        (dict(params=pb.CreditParams(tau_waad=math.inf)), "params.tau_waad"),
        (dict(sequences=[]), "sequences"),
        (
            dict(
                sequences=[
                    pb.Sequence(prompt_ids=[1], response_ids=[2]),
                    pb.Sequence(prompt_ids=[], response_ids=[2]),
                ]
            ),
            "sequences[1].prompt_ids",
        ),
        (
            dict(sequences=[pb.Sequence(prompt_ids=[1], response_ids=[])]),
            "sequences[0].response_ids",
        ),
        (dict(sequences=[pb.Sequence(prompt_ids=[1] * 600, response_ids=[2] * 600)]), "sequences"),
    ],
)
def test_parse_rejects_naming_the_field(request_kw, field):
    with pytest.raises(InputError) as info:  # what the servicer's edge does: parse, validate
        parsed = convert.parse_request(_req(**request_kw), 16, 1000)
        validate_pairs(parsed.pairs, vocab_size=1000, max_positions=None)
    assert info.value.field == field and field in str(info.value)
    if field.startswith("sequences["):
        assert info.value.index == int(field[10]) and "sequence " in str(info.value)


@pytest.mark.parametrize(
    "params, field",
    [
        (pb.CreditParams(window=2**32 - 1), "params.window"),
        (pb.CreditParams(h_lo=513), "params.h_lo"),
        (pb.CreditParams(h_hi=2**32 - 1), "params.h_hi"),
        (pb.CreditParams(gamma_amp=1e308), "params.gamma_amp"),
        (pb.CreditParams(gamma_amp=MAX_GAMMA_AMP * 2), "params.gamma_amp"),
    ],
)
def test_parse_bounds_horizons_and_gamma_amp(params, field):
    with pytest.raises(InputError) as info:
        convert.parse_request(_req(params=params), 16, 1000, max_positions=512)
    assert info.value.field == field and field in str(info.value)


def test_parse_accepts_horizons_up_to_max_positions():
    msg = pb.CreditParams(window=512, h_lo=512, h_hi=512, gamma_amp=MAX_GAMMA_AMP)
    p = convert.parse_request(_req(params=msg), 16, 1000, max_positions=512).params
    assert (p.window, p.h_lo, p.h_hi, p.gamma_amp) == (512, 512, 512, 1e6)


@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e39])  # 1e39 overflows float32
def test_encode_refuses_non_finite(bad):
    r = SimpleNamespace(
        waad=np.array([0.5, bad]),
        fai=np.zeros(2),
        gamma=np.ones(2),
        entropy=None,
        local_heads=[],
        global_heads=[],
    )
    with pytest.raises(convert.NonFiniteResult, match="waad"):
        convert.encode_result(r, (True, True, True, False))
    assert convert.encode_result(r, (False, True, True, False)).gamma  # waad not asked for


def test_encode_roundtrip_little_endian():
    r = SimpleNamespace(
        waad=np.array([0.5, 2.0]),
        fai=np.array([1, 2], np.float32),
        gamma=np.array([1.0, 1.5], np.float32),
        entropy=None,
        local_heads=[(2, 1)],
        global_heads=[(3, 0), (4, 1)],
        policy_version="0",
    )
    msg = convert.encode_result(r, (True, False, True, True))
    assert msg.response_len == 2 and msg.fai == b"" and msg.entropy == b""
    assert msg.waad == np.array([0.5, 2.0], "<f4").tobytes()
    np.testing.assert_array_equal(convert.from_f32_bytes(msg.gamma), [1.0, 1.5])
    assert [(h.layer, h.head) for h in msg.global_heads] == [(3, 0), (4, 1)]


def test_buckets_are_one_two_five():
    assert one_two_five(-1, 0) == (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


# ------------------------------------------------------------------------------- batcher


class FakeBackend:
    """score_batch(pairs) -> one result per pair; optional gate to hold the device thread."""

    def __init__(self) -> None:
        self.policy_version = "0"
        self.calls: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail_on: int | None = None  # a token id that makes score_batch() raise
        self.oom_over: int | None = None  # raise an OOM above this many sequences
        self.oom_longer: int | None = None  # ... or when a sequence has more tokens

    def score_batch(self, pairs, params, with_entropy=False):
        self.gate.wait(10)
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
                scorer.gate.set()
                await b.close()

    return asyncio.run(main())


def _hist_count(metrics: ServerMetrics, name: str) -> tuple[float, float]:
    """(count, sum) of a histogram in the registry."""
    count = metrics.registry.get_sample_value(f"{name}_count") or 0.0
    total = metrics.registry.get_sample_value(f"{name}_sum") or 0.0
    return count, total


def test_concurrent_requests_share_a_batch_in_order():
    scorer = FakeBackend()
    scorer.gate.clear()

    async def go(b, metrics):
        first = asyncio.ensure_future(b.submit(_parsed(100)))
        await asyncio.sleep(0.05)  # first batch now holds the device
        rest = [asyncio.ensure_future(b.submit(_parsed(i))) for i in range(5)]
        await asyncio.sleep(0.05)
        scorer.gate.set()
        outs = await asyncio.gather(first, *rest)
        return outs, metrics

    outs, metrics = _run(go, scorer, max_wait_s=0.01)
    assert scorer.calls == [1, 5]
    assert [o.results[0].tag for o in outs] == [100, 0, 1, 2, 3, 4]
    assert _hist_count(metrics, "anchorcredit_batch_size") == (2.0, 6.0)


def test_token_budget_and_keys_split_batches():
    scorer = FakeBackend()
    scorer.gate.clear()

    async def go(b, metrics):
        first = asyncio.ensure_future(b.submit(_parsed(100)))
        await asyncio.sleep(0.05)
        rest = [asyncio.ensure_future(b.submit(_parsed(i, n_tokens=10))) for i in range(4)]
        other = asyncio.ensure_future(b.submit(_parsed(7, strategy="random")))
        await asyncio.sleep(0.05)
        scorer.gate.set()
        return await asyncio.gather(first, *rest, other)

    _run(go, scorer, max_batch_tokens=25, max_wait_s=0.0)
    # 2 x 10 tokens fit in 25; the other key waits until it is the oldest request
    assert scorer.calls == [1, 2, 2, 1]


def test_queue_full_gives_hint_and_recovers():
    scorer = FakeBackend()
    scorer.gate.clear()

    async def go(b, metrics):
        running = asyncio.ensure_future(b.submit(_parsed(1)))
        await asyncio.sleep(0.05)
        queued = [asyncio.ensure_future(b.submit(_parsed(2))) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull) as info:
            await b.submit(_parsed(3))
        assert info.value.retry_after_s > 0 and "retry after" in str(info.value)
        scorer.gate.set()
        await asyncio.gather(running, *queued)
        return await b.submit(_parsed(4))

    out = _run(go, scorer, max_queue=2, max_wait_s=0.0)
    assert out.results[0].tag == 4


def test_cancelled_and_expired_requests_are_dropped_and_counted():
    scorer = FakeBackend()
    scorer.gate.clear()

    async def go(b, metrics):
        running = asyncio.ensure_future(b.submit(_parsed(1)))
        await asyncio.sleep(0.05)
        cancelled = asyncio.ensure_future(b.submit(_parsed(2)))
        expired = asyncio.ensure_future(b.submit(_parsed(3), deadline=time.monotonic() + 0.01))
        # What the handler does: wait_for cancels the future at the deadline, before the
        # batcher sees it; still a deadline drop, not a cancel.
        deadline = time.monotonic() + 0.01
        timed_out = asyncio.ensure_future(asyncio.wait_for(b.submit(_parsed(4), deadline), 0.01))
        await asyncio.sleep(0.05)
        cancelled.cancel()
        scorer.gate.set()
        await running
        with pytest.raises(DeadlineExpired):
            await expired
        with pytest.raises(TimeoutError):
            await timed_out
        return metrics

    metrics = _run(go, scorer, max_wait_s=0.0)
    assert scorer.calls == [1]  # neither dropped request reached the device
    reg = metrics.registry
    assert reg.get_sample_value("anchorcredit_queue_dropped_total", {"reason": "cancelled"}) == 1
    assert reg.get_sample_value("anchorcredit_queue_dropped_total", {"reason": "deadline"}) == 2


def test_weight_reload_is_ordered_with_batches():
    scorer = FakeBackend()
    scorer.gate.clear()

    async def go(b, metrics):
        running = asyncio.ensure_future(b.submit(_parsed(1, version="0")))
        await asyncio.sleep(0.05)
        before = asyncio.ensure_future(b.submit(_parsed(2, version="0")))
        reload = asyncio.ensure_future(
            b.run_exclusive(lambda: setattr(scorer, "policy_version", "1"))
        )
        after_new = asyncio.ensure_future(b.submit(_parsed(3, version="1")))
        after_old = asyncio.ensure_future(b.submit(_parsed(4, version="0")))
        await asyncio.sleep(0.02)
        scorer.gate.set()
        outs = await asyncio.gather(
            running, before, reload, after_new, after_old, return_exceptions=True
        )
        return outs

    r1, r2, _, r3, r4 = _run(go, scorer, max_wait_s=0.0)
    assert r1.results[0].policy_version == "0" and r2.results[0].policy_version == "0"
    assert r3.results[0].policy_version == "1"
    assert isinstance(r4, PolicyVersionMismatch)


def test_bad_request_in_merged_batch_fails_alone():
    scorer = FakeBackend()
    scorer.gate.clear()
    scorer.fail_on = 66

    async def go(b, metrics):
        running = asyncio.ensure_future(b.submit(_parsed(1)))
        await asyncio.sleep(0.05)
        others = [asyncio.ensure_future(b.submit(_parsed(t))) for t in (2, 66, 3)]
        await asyncio.sleep(0.02)
        scorer.gate.set()
        outs = await asyncio.gather(running, *others, return_exceptions=True)
        return outs, metrics

    outs, metrics = _run(go, scorer, max_wait_s=0.0)
    assert isinstance(outs[2], InputError)
    assert [o.results[0].tag for i, o in enumerate(outs) if i != 2] == [1, 2, 3]
    assert scorer.calls == [1, 3, 1, 1, 1]  # the merged batch failed and was re-run
    # queue time is observed once per request, not again for the re-runs
    assert _hist_count(metrics, "anchorcredit_queue_duration_seconds")[0] == 4


def test_oom_is_split_then_resource_exhausted():
    scorer = FakeBackend()
    scorer.gate.clear()
    scorer.oom_over = 1
    scorer.oom_longer = 40

    async def go(b, metrics):
        running = asyncio.ensure_future(b.submit(_parsed(1)))
        await asyncio.sleep(0.05)
        two = [asyncio.ensure_future(b.submit(_parsed(t))) for t in (2, 3)]
        pair = _parsed(8)
        pair.pairs = pair.pairs * 2  # two sequences in one request: split by sequence
        halved = asyncio.ensure_future(b.submit(pair))
        too_big = asyncio.ensure_future(b.submit(_parsed(9, n_tokens=50)))  # one sequence
        await asyncio.sleep(0.02)
        scorer.gate.set()
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


class StepBackend(FakeBackend):
    """Each forward records the tags it holds, says it started, and waits for its own go:
    the test orders events by these, never by sleeping."""

    def __init__(self) -> None:
        super().__init__()
        self.forwards: list[list[int]] = []
        self.entered = threading.Semaphore(0)
        self.go = threading.Semaphore(0)

    def score_batch(self, pairs, params, with_entropy=False):
        self.forwards.append([int(p.prompt[0]) for p in pairs])
        self.entered.release()
        assert self.go.acquire(timeout=30), "the test never let this forward run"
        return super().score_batch(pairs, params, with_entropy)

    async def next_forward(self) -> list[int]:
        """Wait until the next forward started; the tags it holds."""
        assert await asyncio.to_thread(self.entered.acquire, True, 30)
        return self.forwards[-1]


def _many(tag: int, sequences: int, n_tokens: int):
    one = pb.Sequence(prompt_ids=[tag] + [0] * (n_tokens - 2), response_ids=[1])
    parsed = convert.parse_request(_req(sequences=[one] * sequences, strategy="uniform"), 16, 10**6)
    parsed.pairs = validate_pairs(parsed.pairs, vocab_size=1000, max_positions=None)
    return parsed


async def _queued(b: Batcher, depth: int) -> None:
    while b.depth < depth:  # submit() queues as soon as its task runs
        await asyncio.sleep(0)


def test_a_small_call_waits_one_piece_behind_a_large_one():
    """Budget 10: a large request (6 x 5 tokens = 3 pieces) is on the device when a small
    one arrives. The next forward is the small one alone: the large one's rest goes behind
    what arrived while its piece ran (it went ahead of it before: two pieces of wait)."""
    scorer = StepBackend()

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
    scorer = StepBackend()

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


def test_a_bad_layers_setting_names_the_flag_and_the_scorable_layers(tmp_path):
    from anchorcredit.offline.debug_model import save_debug_model
    from anchorcredit.runner.layers import LayerChoiceError
    from anchorcredit.server.app import CreditServer

    model = save_debug_model(tmp_path / "m", arch="llama")  # 6 layers
    cfg = cfgmod.ServeConfig(
        model=str(model), layers="99", host="127.0.0.1", port=0, metrics_port=-1,
        device="cpu", dtype="float32",
    )  # fmt: skip
    server = CreditServer(cfg)

    async def go():
        await server.start()
        try:
            await server.load()
        finally:
            await server.stop(0)

    with pytest.raises(LayerChoiceError, match=r"--layers / ANCHORCREDIT_LAYERS: layer 99 .*0-5"):
        asyncio.run(go())
