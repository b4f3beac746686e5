"""Client caching: keys, value codec, the byte-bounded LRU, and a real private redis-server.

The Redis tests score through a real CreditServer on a tiny debug model, so a hit is a
result the service really computed.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest

from anchorcredit.client import CreditClient, LRUBytesCache, RedisCache, codec
from anchorcredit.client.keys import SCHEMA_VERSION, KeyBuilder, ModelKey
from anchorcredit.contract import CreditParams

MODEL = ModelKey("m", "rev", "float32", (2, 3, 4), "1")
RNG = np.random.default_rng(0)
PROMPTS = [RNG.integers(0, 256, n).tolist() for n in (4, 7, 5)]
RESPONSES = [RNG.integers(0, 256, n).tolist() for n in (20, 33, 26)]
PREFIX = f"anchorcredit:v{SCHEMA_VERSION}:"
# two sequences of different lengths
TWO_PROMPTS = [[1, 2, 3, 4], [7, 8, 9]]
TWO_RESPONSES = [[5, 6, 7, 8, 9, 10, 11, 12], [3, 4, 5, 6, 7]]


# -- keys ------------------------------------------------------------------------------------
def _key(model=MODEL, version="0", strategy="coupled_rhythm", params=None, p=(1, 2), r=(3, 4)):
    kb = KeyBuilder(model, version, CreditParams.build(strategy, **(params or {})))
    return kb.key(np.array(p, np.uint32), np.array(r, np.uint32))


def test_key_changes_with_everything_that_changes_the_numbers():
    base = _key()
    others = [
        _key(version="1"),
        _key(strategy="local_chunk"),
        _key(params={"q": 0.3}),
        _key(params={"h_hi": "end"}),
        _key(model=ModelKey("m", "rev2", "float32", (2, 3, 4), "1")),
        _key(model=ModelKey("m", "rev", "bfloat16", (2, 3, 4), "1")),
        _key(model=ModelKey("m", "rev", "float32", (2, 3), "1")),
        _key(model=ModelKey("m", "rev", "float32", (2, 3, 4), "2")),
        _key(p=(1,), r=(2, 3, 4)),  # same ids, another prompt/response split
        _key(r=(3, 5)),
    ]
    assert len({base, *others}) == len(others) + 1
    assert base.startswith(PREFIX) and len(base) == len(PREFIX) + 64


def test_key_is_canonical_and_stable_across_processes():
    assert _key(params={"q": 0.4, "k": 3}) == _key(params={"k": 3.0, "q": 0.40, "seed": None})
    # Every effective parameter is keyed: the defaults given explicitly are the same request.
    assert _key(params={"q": 0.4, "h_hi": 100, "window": 10.0}) == _key()
    assert _key(params={"h_hi": None}) == _key(params={"h_hi": "end"}) != _key()
    code = (
        "import numpy as np;from anchorcredit.client.keys import *;"
        "from anchorcredit.contract import CreditParams;"
        "m=ModelKey('m','rev','float32',(2,3,4),'1');"
        "print(KeyBuilder(m,'0',CreditParams()).key(np.array([1,2]),np.array([3,4])))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == _key()  # no salted hash(): same key in every process
    with pytest.raises(ValueError, match="unknown credit parameter"):
        _key(params={"qq": 1})
    with pytest.raises(ValueError, match="params.k: must be an integer"):
        _key(params={"k": 2.5})


# -- codec -----------------------------------------------------------------------------------
def test_codec_roundtrip_and_corruption_is_a_miss():
    arrays = {n: RNG.random(7).astype(np.float32) for n in ("waad", "fai", "gamma")}
    v = codec.encode(arrays, 7)
    assert len(v) == codec.HEADER_BYTES + 3 * 7 * 4
    out = codec.decode(v, 7, ("waad", "fai", "gamma"))
    for n in arrays:
        np.testing.assert_array_equal(out[n], arrays[n])
    half = codec.decode(codec.encode(arrays, 7, "float16"), 7, ("gamma",))
    np.testing.assert_allclose(half["gamma"], arrays["gamma"], rtol=1e-3)
    assert half["gamma"].dtype == np.float32
    assert codec.decode(v[:-1], 7, ("gamma",)) is None  # wrong length
    assert codec.decode(v + b"\0", 7, ("gamma",)) is None
    assert codec.decode(v, 8, ("gamma",)) is None  # another response length
    assert codec.decode(b"XXXX" + v[4:], 7, ("gamma",)) is None  # foreign value
    assert codec.decode(v, 7, ("entropy",)) is None  # array not stored
    assert codec.decode(b"", 7, ("gamma",)) is None
    bad = bytearray(v)
    bad[-4:] = np.float32(np.nan).tobytes()
    assert codec.decode(bytes(bad), 7, ("gamma",)) is None


# -- in-process LRU --------------------------------------------------------------------------
def test_lru_is_bounded_in_bytes_and_evicts_least_recent():
    cache = LRUBytesCache(max_bytes=10_000)
    cache.set_many([(f"k{i}", bytes(1000)) for i in range(5)])
    cache.get_many(["k0"])  # k0 is now the most recent
    cache.set_many([(f"n{i}", bytes(1000)) for i in range(5)])
    assert cache.current_bytes <= 10_000
    got = cache.get_many(["k0", "k1", "n4"])
    assert got[0] is not None and got[1] is None and got[2] is not None
    cache.set_many([("huge", bytes(20_000))])  # larger than the cache: refused, no error
    assert cache.get_many(["huge"]) == [None]


# -- Redis, with a real service --------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(llama_model):
    return llama_model


@pytest.fixture(scope="module")
def server(model_dir, start_server):
    s = start_server(model_dir)
    yield s
    s.stop()


@pytest.fixture
def redis_proc(redis_process):
    r = redis_process()
    yield r
    r.kill()


def _same(a, b):
    for x, y in zip(a, b, strict=True):
        for n in ("waad", "fai", "gamma"):
            np.testing.assert_array_equal(getattr(x, n), getattr(y, n))


def test_redis_hits_misses_ttl_and_corrupt_values(server, redis_proc):
    import redis

    r = redis.Redis.from_url(redis_proc.url)
    with CreditClient([server.target], cache=redis_proc.url, cache_ttl_s=600) as client:
        first = client.score(PROMPTS, RESPONSES)
        assert client.last_stats == {"hits": 0, "misses": 3}
        keys = r.keys(PREFIX + "*")
        assert len(keys) == 3
        assert all(0 < r.ttl(k) <= 600 for k in keys)  # SET ... EX ttl
        second = client.score(PROMPTS, RESPONSES)
        assert client.last_stats == {"hits": 3, "misses": 0}
        assert all(x.cached for x in second) and not any(x.cached for x in first)
        _same(first, second)
        # Truncate one stored value: a miss, recomputed, written back whole.
        k = keys[0]
        r.set(k, r.get(k)[:-3])
        third = client.score(PROMPTS, RESPONSES)
        assert client.last_stats == {"hits": 2, "misses": 1}
        _same(first, third)
        client.score(PROMPTS, RESPONSES)
        assert client.last_stats == {"hits": 3, "misses": 0}
        # Other parameters: other keys, nothing reused.
        client.score(PROMPTS, RESPONSES, q=0.3)
        assert client.last_stats == {"hits": 0, "misses": 3}
        assert len(r.keys(PREFIX + "*")) == 6


def test_redis_keys_follow_the_served_policy_version(server, redis_proc, model_dir):
    import redis

    r = redis.Redis.from_url(redis_proc.url)
    with CreditClient([server.target], cache=redis_proc.url) as client:
        client.score(PROMPTS, RESPONSES)  # policy_version=None: keyed on "0", what is served
        assert client.model_info().policy_version == "0"
        client.update_weights(str(model_dir), "1")  # same weights, new version: new keys
        try:
            res = client.score(PROMPTS, RESPONSES)
            assert client.last_stats["misses"] == 3
            assert {x.policy_version for x in res} == {"1"}
            assert len(r.keys(PREFIX + "*")) == 6
            again = client.score(PROMPTS, RESPONSES, policy_version="1")
            assert client.last_stats["hits"] == 3
            _same(res, again)
            # Version 0 results stay cached under their own keys: served without the server.
            old = client.score(PROMPTS, RESPONSES, policy_version="0")
            assert client.last_stats["hits"] == 3 and {x.policy_version for x in old} == {"0"}
        finally:
            client.update_weights(str(model_dir), "0")


class _Counting:
    """A Redis client that counts the commands it is asked for."""

    def __init__(self, inner: object) -> None:
        self.inner, self.used = inner, []

    def __getattr__(self, name: str) -> object:
        self.used.append(name)
        return getattr(self.inner, name)


def test_redis_killed_mid_run_calls_still_succeed(server, redis_proc, caplog):
    caplog.set_level(logging.WARNING, logger="anchorcredit.client.cache")
    with CreditClient([server.target], cache=redis_proc.url) as client:
        first = client.score(PROMPTS, RESPONSES)
        redis_proc.kill()
        client.cache.retry_after_s = 600  # the outage outlasts the test, however slow
        client.cache._redis = counting = _Counting(client.cache._redis)
        for _ in range(3):
            again = client.score(PROMPTS, RESPONSES)
            _same(first, again)
            assert client.last_stats["misses"] == 3  # served by the service
        # one read found Redis gone; no call after it waited on Redis again
        assert counting.used == ["mget"]
    warnings = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(warnings) == 1  # logged once per outage, not per call


def test_slow_redis_times_out_into_the_service(server, caplog):
    # A TCP listener that accepts and never answers: every Redis command hits the timeout.
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        lsock.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(lsock.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        url = f"redis://127.0.0.1:{lsock.getsockname()[1]}/0"
        import redis

        silent = _Counting(
            redis.Redis.from_url(url, socket_timeout=0.2, socket_connect_timeout=0.2)
        )
        cache = RedisCache(url, retry_after_s=600, client=silent)
        with CreditClient([server.target], cache=cache) as client:
            res = client.score(PROMPTS, RESPONSES)
            res2 = client.score(PROMPTS, RESPONSES)  # Redis skipped now: no second timeout
            _same(res, res2)
        assert silent.used[:1] == ["mget"] and silent.used.count("mget") == 1  # one timeout
        assert "pipeline" not in silent.used  # results were not written to a dead Redis
    finally:
        stop.set()
        t.join(5)
        for s in held:
            s.close()
        lsock.close()


def test_custom_cache_errors_are_misses_and_float16_option(server):
    class Broken:
        def get_many(self, keys):
            raise RuntimeError("boom")

        def set_many(self, items):
            raise RuntimeError("boom")

    with CreditClient([server.target], cache=Broken()) as client:
        assert len(client.score(PROMPTS, RESPONSES)) == 3
    lru = LRUBytesCache()
    with CreditClient([server.target], cache=lru, cache_dtype="float16") as client:
        a = client.score(PROMPTS, RESPONSES)
        b = client.score(PROMPTS, RESPONSES)
        assert client.last_stats["hits"] == 3
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x.gamma, y.gamma)  # gamma levels are exact in f16
            np.testing.assert_allclose(x.waad, y.waad, rtol=1e-3, atol=1e-3)
    with CreditClient([server.target], cache=False) as client:
        client.score(PROMPTS, RESPONSES)
        assert client.cache is None


# -- what a cached result is keyed on: the served weights, the value dtype, unsigned seeds ----
def _scores_of(model_dir):
    from anchorcredit.runner import Scorer

    pairs = list(zip(TWO_PROMPTS, TWO_RESPONSES, strict=True))
    return Scorer.from_pretrained(str(model_dir)).score(pairs)


def test_cached_calls_follow_weights_updated_by_another_client(
    server, llama_model, other_llama_model
):
    shared = LRUBytesCache()
    with (
        CreditClient([server.target], cache=shared) as worker,
        CreditClient([server.target], cache=False) as trainer,
    ):
        before = worker.score(TWO_PROMPTS, TWO_RESPONSES)
        assert {x.policy_version for x in before} == {"0"}
        assert worker.score(TWO_PROMPTS, TWO_RESPONSES)[0].cached  # now all cached
        trainer.update_weights(str(other_llama_model), "seed-1")  # a label new to this server
        try:
            after = worker.score(TWO_PROMPTS, TWO_RESPONSES)  # cache on, policy_version=None
            assert worker.model_info().policy_version == "seed-1"
            assert {x.policy_version for x in after} == {"seed-1"}
            assert not any(x.cached for x in after)
            for got, ref in zip(after, _scores_of(str(other_llama_model)), strict=True):
                np.testing.assert_allclose(got.waad, ref.waad, rtol=1e-6, atol=1e-6)
                np.testing.assert_array_equal(got.gamma, ref.gamma)
            assert not np.array_equal(after[0].waad, before[0].waad)
        finally:
            trainer.update_weights(str(llama_model), "0")


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
        c16.score(TWO_PROMPTS, TWO_RESPONSES)
    with (
        CreditClient([server.target], cache=shared) as c32,
        CreditClient([server.target], cache=False) as plain,
    ):
        got = c32.score(TWO_PROMPTS, TWO_RESPONSES)
        assert c32.last_stats == {"hits": 0, "misses": 2}
        for g, ref in zip(got, plain.score(TWO_PROMPTS, TWO_RESPONSES), strict=True):
            np.testing.assert_array_equal(g.waad, ref.waad)  # full float32, not f16-rounded
        assert all(x.cached for x in c32.score(TWO_PROMPTS, TWO_RESPONSES))


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
        a = client.score(TWO_PROMPTS, TWO_RESPONSES, strategy="random", seed=2**64 - 1)
        b = client.score(TWO_PROMPTS, TWO_RESPONSES, strategy="random", seed=2**64 - 1)
        assert all(x.cached for x in b)
        np.testing.assert_array_equal(a[0].gamma, b[0].gamma)
