"""Credit and policy-freshness metrics (server/credit_metrics.py): each series against a
brute-force recount of the same results, and through a real server's scoring and weight push."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram

from anchorcredit.offline.analysis import find_peaks
from anchorcredit.server.credit_metrics import (
    GAMMA,
    RECENT_WINDOW_S,
    BulkHistogram,
    CreditMetrics,
    credit_fractions,
)


def _response(waad, fai, gamma, version="v1"):
    return SimpleNamespace(
        waad=np.asarray(waad, float),
        fai=np.asarray(fai, float),
        gamma=np.asarray(gamma, float),
        local_heads=[(0, 0)],
        global_heads=[(0, 1), (1, 1)],
        policy_version=version,
    )


@pytest.mark.parametrize("seed", range(5))
def test_a_request_at_once_equals_each_response_by_hand(seed):
    """Peaks over a whole request (unequal lengths, length 1, plateaus and ties) are the ones
    `anchorcredit analyze` finds in each response."""
    rng = np.random.default_rng(seed)
    lengths = [1, *rng.integers(1, 30, 6).tolist(), 2]
    responses = [
        _response(
            rng.integers(0, 4, n).astype(float),  # small integers: plateaus and ties
            rng.integers(0, 3, n).astype(float),
            1 + 0.5 * (rng.random(n) < 0.4),
        )
        for n in lengths
    ]
    got = credit_fractions(responses)
    for i, r in enumerate(responses):  # analyze's find_peaks, one response at a time
        assert got["onset"][i] == len(find_peaks(r.waad)) / len(r.waad)
        assert got["anchor"][i] == len(find_peaks(r.fai)) / len(r.fai)
        assert got["amplified"][i] == np.mean(r.gamma > 1)


def test_fractions_count_onsets_anchors_and_amplified():
    flat = _response(np.ones(4), np.ones(4), np.ones(4))  # no peak in a flat response
    one = _response([3.0], [1.0], [1.5])  # a single token has no neighbours
    shaped = _response(
        [0.0, 5.0, 1.0, 1.0, 6.0, 2.0],  # WAAD peaks at 1 and 4
        [0.1, 0.9, 0.1, 0.1, 0.1, 0.1],  # one FAI peak, at 1
        [1.5, 1.0, 1.25, 1.0, 1.0, 1.0],
    )
    got = credit_fractions([flat, one, shaped])
    assert got["onset"].tolist() == [0, 0, 2 / 6]
    assert got["anchor"].tolist() == [0, 0, 1 / 6]
    assert got["amplified"].tolist() == [0, 1, 2 / 6]


def _histogram_lines(registry: CollectorRegistry, name: str) -> dict[str, float]:
    return {
        f"{s.name}{sorted(s.labels.items())}": s.value
        for mf in registry.collect()
        for s in mf.samples
        if s.name.startswith(name)
    }


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_bulk_histogram_equals_one_observe_per_value(dtype):
    """Bulk bucket counts equal prometheus_client's own Histogram fed one value at a time,
    for float32 values too (on and next to the edges, where a float32 edge would round)."""
    rng = np.random.default_rng(0)
    edges = np.asarray(GAMMA, dtype)
    near = np.concatenate([edges, np.nextafter(edges, 0), np.nextafter(edges, 9)])
    values = np.concatenate([near, 1 + 4.5 * rng.random(200), [7.0, 0.5]]).astype(dtype)
    bulk, single = CollectorRegistry(), CollectorRegistry()
    hist = BulkHistogram("x_gamma", "doc", ["strategy"], GAMMA)
    bulk.register(hist)
    ref = Histogram("x_gamma", "doc", ["strategy"], buckets=GAMMA, registry=single)
    for part in np.array_split(values, 5):
        hist.observe_all(("coupled_rhythm",), part)
        for v in part:
            ref.labels("coupled_rhythm").observe(float(v))  # compared in float64
    got, want = _histogram_lines(bulk, "x_gamma"), _histogram_lines(single, "x_gamma")
    assert got.keys() == {k for k in want if "_created" not in k}
    for key, value in got.items():
        assert value == pytest.approx(want[key], rel=1e-12), key


def test_recent_versions_expire_after_the_window():
    now = [1000.0]
    m = CreditMetrics(CollectorRegistry(), clock=lambda: now[0])
    m.policy_changed("v1")
    m.observe("uniform", [_response(np.zeros(3), np.zeros(3), np.ones(3), "v1")])
    now[0] += 10
    m.observe("uniform", [_response(np.zeros(3), np.zeros(3), np.ones(3), "v2")])
    assert m.versions.distinct_recent() == 2
    assert m.versions.seconds_since_change() == 10
    now[0] += RECENT_WINDOW_S + 1
    assert m.versions.distinct_recent() == 0  # a trainer whose pushes stopped shows up


def test_a_real_server_exports_credit_and_freshness(llama_model, start_server, tmp_path):
    """Score through gRPC, push new weights, score again: every credit series counts the
    responses it saw, the policy info names the pushed version, two versions were scored."""

    from anchorcredit.client import CreditClient

    model = llama_model
    s = start_server(model, max_wait_ms=1.0)
    try:
        client = CreditClient([s.target], cache=None, timeout_s=60)
        rng = np.random.default_rng(3)
        prompts = [rng.integers(0, 200, 5).tolist() for _ in range(3)]
        responses = [rng.integers(0, 200, n).tolist() for n in (4, 17, 30)]
        info = client.model_info()
        first = client.score(prompts, responses, strategy="coupled_rhythm")
        state = {k: v + 0.01 for k, v in _state_dict(model).items()}
        client.push_weights(state, version="step-1")
        second = client.score(prompts, responses, strategy="global_anchor")
        assert {r.policy_version for r in second} == {"step-1"}
        s.server.metrics.credit.flush()  # observed off the request path

        tokens = sum(len(r) for r in responses)
        for strategy, results in (("coupled_rhythm", first), ("global_anchor", second)):
            label = {"strategy": strategy}
            assert s.sample("anchorcredit_credit_responses_total", label) == 3
            assert s.sample("anchorcredit_credit_gamma_count", label) == tokens
            gsum = sum(float(np.sum(r.gamma)) for r in results)
            assert s.sample("anchorcredit_credit_gamma_sum", label) == pytest.approx(gsum, 1e-5)
            amplified = [float(np.mean(np.asarray(r.gamma) > 1)) for r in results]
            assert s.sample(
                "anchorcredit_credit_token_fraction_sum", {**label, "kind": "amplified"}
            ) == pytest.approx(sum(amplified))
            for head_class in ("local", "global"):  # n = max(1, floor(0.3 * heads)) each
                assert s.sample(
                    "anchorcredit_credit_heads_sum", {**label, "head_class": head_class}
                ) == 3 * max(1, int(0.3 * len(info.layers) * info.num_heads))
        assert s.sample("anchorcredit_policy_info", {"version": "step-1"}) == 1
        assert s.registry_value("anchorcredit_policy_versions_scored_recent") == 2
        assert 0 <= s.registry_value("anchorcredit_policy_seconds_since_change") < 60
        client.close()
    finally:
        s.stop()


def _state_dict(model_dir):
    from safetensors.numpy import load_file

    files = sorted(model_dir.glob("*.safetensors"))
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out
