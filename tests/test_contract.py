"""anchorcredit.contract: SPEC defaults, ranges and strategy names in one validated object."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from anchorcredit.contract import (
    DEFAULTS,
    STRATEGIES,
    CreditParams,
    check_horizon,
    check_positions,
)
from anchorcredit.errors import InputError
from anchorcredit.v1 import credit_pb2 as pb


def test_defaults_are_the_specs():
    # SPEC.md: q 0.4, gamma_amp 1.5, k 3, W 10, H_lo 10, H_hi 100, quantile 0.3;
    # ours: alpha 0.5, medians for the thresholds, seed 0.
    assert DEFAULTS.record() == {
        "strategy": "coupled_rhythm",
        "q": 0.4,
        "gamma_amp": 1.5,
        "alpha": 0.5,
        "k": 3,
        "tau_waad": None,
        "tau_delta": None,
        "seed": 0,
        "window": 10,
        "h_lo": 10,
        "h_hi": 100,
        "head_quantile": 0.3,
    }
    assert STRATEGIES == (
        "uniform", "local_chunk", "global_anchor", "coupled_rhythm", "random", "entropy",
    )  # fmt: skip


@pytest.mark.parametrize(
    "values, field",
    [
        (dict(q=1.5), "params.q"),
        (dict(q=math.nan), "params.q"),
        (dict(gamma_amp=0.9), "params.gamma_amp"),
        (dict(gamma_amp=2e6), "params.gamma_amp"),
        (dict(alpha=-0.1), "params.alpha"),
        (dict(k=0), "params.k"),
        (dict(k=2.5), "params.k"),
        (dict(seed=-1), "params.seed"),
        (dict(seed=2**64), "params.seed"),
        (dict(window=0), "params.window"),
        (dict(h_lo=20, h_hi=5), "params.h_hi"),
        (dict(h_hi="soon"), "params.h_hi"),
        (dict(head_quantile=0.0), "params.head_quantile"),
        (dict(tau_waad=math.inf), "params.tau_waad"),
        (dict(q=True), "params.q"),
        (dict(nope=1), "params"),
    ],
)
def test_bad_values_name_their_field(values, field):
    with pytest.raises(InputError) as info:
        CreditParams.build(**values)
    assert info.value.field == field and str(info.value).startswith(field)


def test_build_semantics():
    assert CreditParams.build() == DEFAULTS and CreditParams.build(q=None) == DEFAULTS
    assert CreditParams.build(q=0.4, k=3.0) == DEFAULTS  # one value, one object, one hash
    assert hash(CreditParams.build(k=3.0)) == hash(DEFAULTS)
    end = CreditParams.build(h_hi="end")
    assert end.h_hi is None and end == CreditParams.build(h_hi=None) == CreditParams.build(
        h_hi="none"
    )
    assert end.record()["h_hi"] == "end" and json.dumps(end.record())
    with pytest.raises(InputError, match="strategy"):
        CreditParams.build("nope")


@given(
    strategy=st.sampled_from(STRATEGIES),
    q=st.floats(0, 1),
    k=st.integers(1, 2**32 - 1),
    seed=st.integers(0, 2**64 - 1),
    h_lo=st.integers(0, 1000),
    span=st.one_of(st.none(), st.integers(0, 1000)),
)
def test_proto_round_trip(strategy, q, k, seed, h_lo, span):
    params = CreditParams.build(
        strategy, q=q, k=k, seed=seed, h_lo=h_lo, h_hi=None if span is None else h_lo + span
    )
    msg = pb.CreditParams(**params.proto_fields())
    back = CreditParams.from_proto(
        params.strategy, pb.CreditParams.FromString(msg.SerializeToString())
    )
    assert back == params


def test_proto_unset_fields_take_defaults_and_positions_bound_what_was_set():
    assert CreditParams.from_proto("", pb.CreditParams()) == DEFAULTS
    with pytest.raises(InputError, match="h_hi or h_hi_to_end"):
        CreditParams.from_proto("", pb.CreditParams(h_hi=5, h_hi_to_end=True))
    with pytest.raises(InputError) as info:  # the model's limit is named first
        CreditParams.from_proto("", pb.CreditParams(h_lo=513), max_positions=512)
    assert info.value.field == "params.h_lo" and "512" in str(info.value)
    # defaults are never refused for a small model: only what the caller set
    assert CreditParams.from_proto("", pb.CreditParams(), max_positions=64) == DEFAULTS
    check_positions({"window": 64}, 64)


def test_check_horizon_returns_ints():
    assert check_horizon(10.0, 0, None) == {"window": 10, "h_lo": 0, "h_hi": None}
    with pytest.raises(InputError, match="window"):
        check_horizon(0, 0, None)
