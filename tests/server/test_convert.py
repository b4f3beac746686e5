"""Proto <-> contract conversion (server/convert.py): request parsing with the contract's
defaults and ranges (errors name the field), and result encoding as little-endian float32."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from anchorcredit.contract import DEFAULTS, MAX_GAMMA_AMP, STRATEGIES
from anchorcredit.errors import InputError
from anchorcredit.runner.inputs import validate_pairs
from anchorcredit.server import convert
from anchorcredit.v1 import credit_pb2 as pb


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
