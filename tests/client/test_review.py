"""Regressions from review: the served version is re-read per call, update_weights reaches
every target once, cache keys carry the value dtype and unsigned seeds, and bad-input errors
name the caller's index.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from anchorcredit.client import CreditClient, CreditServiceError, LRUBytesCache

P = [[1, 2, 3, 4], [7, 8, 9]]
R = [[5, 6, 7, 8, 9, 10, 11, 12], [3, 4, 5, 6, 7]]


@pytest.fixture(scope="module")
def models(other_llama_model, llama_model):
    a = llama_model
    b = other_llama_model
    return str(a), str(b)


@pytest.fixture(scope="module")
def server(models, start_server):
    s = start_server(models[0])
    yield s
    s.stop()


def _runner(model_dir):
    from anchorcredit.runner import Scorer

    return Scorer.from_pretrained(model_dir).score(list(zip(P, R, strict=True)))


def test_cached_calls_follow_weights_updated_by_another_client(server, models):
    shared = LRUBytesCache()
    with (
        CreditClient([server.target], cache=shared) as worker,
        CreditClient([server.target], cache=False) as trainer,
    ):
        before = worker.score(P, R)
        assert {x.policy_version for x in before} == {"0"}
        assert worker.score(P, R)[0].cached  # now all cached
        trainer.update_weights(models[1], "1")
        try:
            after = worker.score(P, R)  # cache on, policy_version=None
            assert worker.model_info().policy_version == "1"
            assert {x.policy_version for x in after} == {"1"}
            assert not any(x.cached for x in after)
            for got, ref in zip(after, _runner(models[1]), strict=True):
                np.testing.assert_allclose(got.waad, ref.waad, rtol=1e-6, atol=1e-6)
                np.testing.assert_array_equal(got.gamma, ref.gamma)
            assert not np.array_equal(after[0].waad, before[0].waad)
        finally:
            trainer.update_weights(models[0], "0")


def test_update_weights_calls_each_target_once_and_names_the_dead_one(server, models, free_port):
    dead = f"127.0.0.1:{free_port()}"
    reg = server.server.metrics.registry
    n0 = reg.get_sample_value("anchorcredit_weight_updates_total") or 0.0
    try:
        with CreditClient([dead, server.target], cache=False, timeout_s=5) as client:
            with pytest.raises(CreditServiceError) as e:
                client.update_weights(models[0], "7")
            assert dead in str(e.value) and list(e.value.failed) == [dead]
            assert e.value.code == grpc.StatusCode.UNAVAILABLE
            # the live server loaded exactly once: no failover of the dead target's load to it
            assert (reg.get_sample_value("anchorcredit_weight_updates_total") or 0.0) == n0 + 1
            assert client.model_info().policy_version == "7"
    finally:
        with CreditClient([server.target], cache=False) as client:
            client.update_weights(models[0], "0")


def test_float32_client_never_reads_float16_values(server):
    from anchorcredit.client import codec
    from anchorcredit.client.keys import KeyBuilder, ModelKey
    from anchorcredit.contract import CreditParams

    m = ModelKey("m", "rev", "float32", (2,), "1")
    ids = np.array([1, 2], np.uint32), np.array([3, 4], np.uint32)
    k32 = KeyBuilder(m, "0", CreditParams()).key(*ids)
    k16 = KeyBuilder(m, "0", CreditParams(), value_dtype="float16").key(*ids)
    assert k32 != k16
    arrays = {n: np.full(2, 0.1, np.float32) for n in ("waad", "fai", "gamma")}
    v16 = codec.encode(arrays, 2, "float16")
    assert codec.decode(v16, 2, ("gamma",), "float32") is None  # mismatch on decode: a miss
    assert codec.decode(v16, 2, ("gamma",), "float16") is not None

    shared = LRUBytesCache()
    with CreditClient([server.target], cache=shared, cache_dtype="float16") as c16:
        c16.score(P, R)
    with (
        CreditClient([server.target], cache=shared) as c32,
        CreditClient([server.target], cache=False) as plain,
    ):
        got = c32.score(P, R)
        assert c32.last_stats == {"hits": 0, "misses": 2}
        for g, ref in zip(got, plain.score(P, R), strict=True):
            np.testing.assert_array_equal(g.waad, ref.waad)  # full float32, not f16-rounded
        assert all(x.cached for x in c32.score(P, R))


def test_uint64_seed_keys_and_bounds():
    from anchorcredit.client.keys import KeyBuilder, ModelKey
    from anchorcredit.contract import CreditParams

    m = ModelKey("m", "rev", "float32", (2,), "1")
    ids = np.array([1, 2], np.uint32), np.array([3, 4], np.uint32)

    def params(**values):
        return CreditParams.build("random", **values)

    def key(**values):
        return KeyBuilder(m, "0", params(**values)).key(*ids)

    big = {key(seed=s) for s in (2**63, 2**64 - 1, 2**63 - 1, 0, 5)}
    assert len(big) == 5
    # pinned: the encoding of every effective parameter (sorted names, floats by IEEE bits,
    # ints as uint64: an ordinary seed has the 8 bytes the int64 encoding gave)
    import hashlib
    import struct

    from anchorcredit.client.keys import _fields

    def f(x):
        return b"f" + struct.pack("<d", x)

    def i(x):
        return b"i" + struct.pack("<Q", x)

    effective = [
        (b"alpha", f(0.5)),
        (b"gamma_amp", f(1.5)),
        (b"h_hi", i(100)),
        (b"h_lo", i(10)),
        (b"head_quantile", f(0.3)),
        (b"k", i(3)),
        (b"q", f(0.4)),
        (b"seed", b"i" + struct.pack("<q", 5)),
        (b"window", i(10)),
    ]
    assert (
        KeyBuilder(m, "0", params(seed=5))._base.digest()
        == hashlib.sha256(
            _fields(
                m.encode(),
                b"0",
                _fields(b"random", b"".join(_fields(n, v) for n, v in effective)),
                b"",
                b"float32",
            )
        ).digest()
    )
    for bad in (2**64, -1):
        with pytest.raises(ValueError, match="seed"):
            params(seed=bad)
    with pytest.raises(ValueError, match=r"params\.k: must be in \[1, 2\*\*32\)"):
        params(k=2**32)
    assert params(seed=2**64 - 1).proto_fields()["seed"] == 2**64 - 1
    assert key(seed=2**64 - 1) in big


def test_uint64_seed_reaches_the_server(server):
    with CreditClient([server.target]) as client:
        a = client.score(P, R, strategy="random", seed=2**64 - 1)
        b = client.score(P, R, strategy="random", seed=2**64 - 1)
        assert all(x.cached for x in b)
        np.testing.assert_array_equal(a[0].gamma, b[0].gamma)


def test_bad_input_error_names_the_callers_index(models, start_server):
    s = start_server(models[0], max_request_sequences=2)  # split the misses into chunks
    try:
        with CreditClient([s.target]) as client:
            good_p, good_r = [[1, 2]] * 4, [[3, 4], [3, 5], [3, 6], [3, 7]]
            client.score(good_p, good_r)  # cached: removed from what is sent next
            prompts = [*good_p, [1, 2], [1, 2], [1, 2]]
            responses = [*good_r, [4, 4], [4, 5], [4, 999]]  # caller 6 = chunk 1, index 0
            with pytest.raises(CreditServiceError) as e:
                client.score(prompts, responses)
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert e.value.index == 6
            assert str(e.value).count("sequence 6 (sent as 0): ") == 1
            with pytest.raises(CreditServiceError) as e:
                client.score([[1, 2]] * 3, [[3, 4], [9, 999], [3, 5]])  # 0 and 2 are hits
            assert e.value.index == 1 and "sequence 1 (sent as 0)" in str(e.value)
    finally:
        s.stop()
