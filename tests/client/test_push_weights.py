"""push_weights / update_weights: encoding, every address behind a target, failures by address.

Unit tests run against small fake gRPC servers (in-process) that decode the stream; the
end-to-end tests run real CreditServers (tiny debug models) and compare scores after a push
with a Scorer freshly loaded with the same weights.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from fake_servicer import FakeServicer

from anchorcredit.client import CreditClient, CreditServiceError
from anchorcredit.client.transport import expand_target
from anchorcredit.client.weights import (
    CHUNK_BYTES,
    decode_chunks,
    prepare_weights,
    to_numpy,
    weight_chunks,
)
from anchorcredit.v1 import credit_pb2 as pb

torch = pytest.importorskip("torch")

P = [[1, 2, 3, 4], [7, 8, 9]]
R = [[5, 6, 7, 8, 9, 10, 11, 12], [3, 4, 5, 6, 7]]


# -- encoding ---------------------------------------------------------------------------------
def _roundtrip(weights, dtype=None, chunk_bytes=16):
    items = prepare_weights(weights, dtype)
    msgs = list(weight_chunks(items, pb.WeightUpdate(version="v"), chunk_bytes))
    assert all(len(m.data) <= chunk_bytes for m in msgs)
    update, got = decode_chunks(msgs)
    assert update.version == "v"
    return msgs, got


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_torch_round_trip_every_dtype(dtype):
    g = torch.Generator().manual_seed(0)
    w = {
        "a": torch.randn(3, 5, generator=g).to(getattr(torch, dtype)),
        "b.t": torch.randn(4, 6, generator=g).to(getattr(torch, dtype)).t(),  # not contiguous
        "empty": torch.zeros(0, 3, dtype=getattr(torch, dtype)),
        "scalar": torch.tensor(2.5, dtype=getattr(torch, dtype)),
    }
    _, got = _roundtrip(w)
    for name, t in w.items():
        wire, shape, data = got[name]
        assert wire == dtype and shape == tuple(t.shape)
        want = t.float().numpy()
        np.testing.assert_array_equal(to_numpy(wire, shape, data), want)
        if dtype == "bfloat16":  # the bytes are exactly the uint16 view
            assert data == t.contiguous().view(torch.int16).numpy().tobytes()


@pytest.mark.parametrize("n", [3, 4, 5, 8, 9, 0, 1])
def test_chunk_boundaries(n):
    """chunk_bytes=16 = 4 float32: tensors of exactly, just under and just over k chunks."""
    t = torch.arange(n, dtype=torch.float32)
    msgs, got = _roundtrip({"x": t, "y": t + 1})
    sizes = [len(m.data) for m in msgs if m.data]
    assert sizes == ([16] * (n // 4) + ([n % 4 * 4] if n % 4 else [])) * 2
    headers = [m for m in msgs if m.HasField("tensor")]
    assert len(headers) == 2  # each header rides with its tensor's first bytes (if any)
    assert all(len(h.data) == min(16, 4 * n) for h in headers)
    np.testing.assert_array_equal(to_numpy(*got["y"]), (t + 1).numpy())


def test_numpy_input_and_casts():
    rng = np.random.default_rng(0)
    a64 = rng.standard_normal((7, 3))
    a16 = rng.standard_normal(11).astype(np.float16)
    _, got = _roundtrip({"a": a64, "h": a16}, dtype="float32")
    np.testing.assert_array_equal(to_numpy(*got["a"]), a64.astype(np.float32))
    np.testing.assert_array_equal(to_numpy(*got["h"]), a16.astype(np.float32))
    # numpy -> bfloat16 rounds exactly as torch does (round to nearest even)
    x = np.concatenate([rng.standard_normal(1000).astype(np.float32), [np.inf, -np.inf, 0.0]])
    _, got = _roundtrip([("x", x)], dtype="bfloat16")
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    assert got["x"][2] == want
    _, got = _roundtrip({"f": a16}, chunk_bytes=5)  # odd chunk size, no cast
    assert got["f"][0] == "float16" and got["f"][2] == a16.tobytes()


def test_casts_torch_to_bfloat16_one_tensor_at_a_time():
    t = torch.randn(5, 5)
    _, got = _roundtrip({"w": t}, dtype="bfloat16")
    assert got["w"][2] == t.to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    assert t.dtype == torch.float32  # the caller's tensor is untouched


@pytest.mark.parametrize(
    ("weights", "dtype", "match"),
    [
        ({"pos": torch.arange(3)}, None, "'pos': dtype int64 cannot travel"),
        ({"pos": torch.arange(3)}, "float32", "'pos': dtype int64 cannot travel"),
        ({"m": torch.ones(2, dtype=torch.bool)}, None, "'m': dtype bool"),
        ({"d": torch.ones(2, dtype=torch.float64)}, None, "'d': dtype float64 .* pass dtype="),
        ({"l": [1.0, 2.0]}, None, "'l': expected a torch.Tensor or numpy.ndarray"),
        ({"": torch.ones(1)}, None, "non-empty strings"),
        ([("a", torch.ones(1)), ("a", torch.ones(1))], None, "'a' is given twice"),
        ({}, None, "no tensors"),
        ({"a": torch.ones(1)}, "int8", "dtype must be one of"),
    ],
)
def test_bad_weights_are_refused_naming_the_tensor(weights, dtype, match):
    with pytest.raises((ValueError, TypeError), match=match):
        prepare_weights(weights, dtype)


# -- addresses --------------------------------------------------------------------------------
def test_expand_target_forms():
    assert expand_target("dns:///localhost:5005") == ["127.0.0.1:5005"]
    assert expand_target("dns://8.8.8.8/localhost:5005") == ["127.0.0.1:5005"]
    assert expand_target("localhost:5005") == ["127.0.0.1:5005"]
    assert expand_target("127.0.0.1:7") == ["127.0.0.1:7"]
    assert expand_target("ipv4:127.0.0.1:1,127.0.0.2:2") == ["127.0.0.1:1", "127.0.0.2:2"]
    assert expand_target("ipv6:[::1]:1,[::1]:2") == ["[::1]:1", "[::1]:2"]
    assert expand_target("[::1]:9") == ["[::1]:9"]
    assert expand_target("unix:/tmp/x.sock") == ["unix:/tmp/x.sock"]
    with pytest.raises(OSError):
        expand_target("dns:///no-such-host.invalid:1")


# -- fake servers -----------------------------------------------------------------------------
@pytest.fixture
def fakes(fake_server):
    """fakes(n, **knobs) -> [(FakeServicer serving version "0", port)] * n."""

    def start(n=1, **kw):
        out = []
        for _ in range(n):
            impl = FakeServicer("0", **{"dtype": "bfloat16", **kw})
            out.append((impl, fake_server(impl)))
        return out

    return start


def test_multi_address_target_reaches_every_address(fakes):
    (a, pa), (b, pb_) = fakes(2)
    w = {"x": torch.arange(10, dtype=torch.float32), "y": np.ones((2, 2), np.float16)}
    gen = iter(w.items())  # one-shot: read once, sent to both
    with CreditClient(f"ipv4:127.0.0.1:{pa},127.0.0.1:{pb_}", cache=False) as client:
        out = client.push_weights(gen, "v1", chunk_bytes=8, replaces="0", dtype=None)
        assert list(out) == [f"127.0.0.1:{pa}", f"127.0.0.1:{pb_}"]
        assert all(r.policy_version == "v1" and r.tensors == 2 for r in out.values())
    for impl in (a, b):
        ((update, tensors),) = impl.pushes
        assert (update.version, update.replaces, update.partial) == ("v1", "0", False)
        np.testing.assert_array_equal(to_numpy(*tensors["x"]), np.arange(10))
        assert tensors["y"][0] == "float16"


def test_dns_name_and_auto_dtype(fakes):
    ((a, port),) = fakes(1)
    with CreditClient(f"dns:///localhost:{port}", cache=False) as client:
        client.push_weights({"w": torch.ones(3)}, "v2", dtype="auto", partial=True)
    ((update, tensors),) = a.pushes
    assert update.partial and tensors["w"][0] == "bfloat16"  # the fake serves bfloat16


def test_dead_address_is_reported_while_the_live_one_is_updated(fakes, free_port):
    ((live, port),) = fakes(1)
    dead = f"127.0.0.1:{free_port()}"
    target = f"ipv4:{dead},127.0.0.1:{port}"
    with CreditClient(target, cache=False, timeout_s=5) as client:
        with pytest.raises(CreditServiceError) as e:
            client.push_weights({"w": torch.ones(3)}, "v3")
        assert list(e.value.failed) == [dead]
        assert dead in str(e.value) and "1 of 2 addresses" in str(e.value)
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        assert live.version == "v3"
        with pytest.raises(CreditServiceError) as e:
            client.update_weights("/some/path", "v4")
        assert list(e.value.failed) == [dead] and live.paths == ["/some/path"]


def test_server_refusal_is_reported_by_address(fakes):
    ((a, pa), (_b, pb_)) = (fakes(1)[0], fakes(1, fail="tensor 'x': unknown name")[0])
    with CreditClient([f"127.0.0.1:{pa}", f"127.0.0.1:{pb_}"], cache=False) as client:
        with pytest.raises(CreditServiceError) as e:
            client.push_weights({"x": torch.ones(1)}, "v5")
    assert list(e.value.failed) == [f"127.0.0.1:{pb_}"]
    assert "tensor 'x': unknown name" in str(e.value)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert a.version == "v5"


def test_bad_input_is_refused_before_any_rpc(fakes):
    ((a, port),) = fakes(1)
    with CreditClient(f"127.0.0.1:{port}", cache=False) as client:
        w = {"w": torch.ones(2)}
        with pytest.raises(ValueError, match="version"):
            client.push_weights(w, "")
        with pytest.raises(ValueError, match="transport"):
            client.push_weights(w, "v", transport="nccl")
        with pytest.raises(ValueError, match="'pos': dtype int64"):
            client.push_weights({"w": torch.ones(2), "pos": torch.arange(2)}, "v")
        with pytest.raises(ValueError, match="chunk_bytes"):
            client.push_weights(w, "v", chunk_bytes=0)
        with pytest.raises(ValueError, match="chunk_bytes"):  # over the servers' limit
            client.push_weights(w, "v", chunk_bytes=CHUNK_BYTES + 1)
        with pytest.raises(ValueError, match="dtype"):
            client.push_weights(w, "v", dtype="float64")
        with pytest.raises(ValueError, match="replace itself"):
            client.update_weights("/p", "v", replaces="v")
    assert a.pushes == [] and a.paths == []


def test_version_check_rides_on_the_push_acknowledgement(fakes):
    """An address whose answer to the push names another version is an error, found
    without asking GetModelInfo; a push acknowledged with the new version asks nothing."""
    ((a, port),) = fakes(1, ack="other")
    with CreditClient(f"127.0.0.1:{port}", cache=False) as client:
        with pytest.raises(CreditServiceError, match="serves policy version 'other'"):
            client.push_weights({"w": torch.ones(2)}, "v6", dtype="float32")
        assert a.info_calls == 0
    ((b, port),) = fakes(1)
    with CreditClient(f"127.0.0.1:{port}", cache=False) as client:
        client.push_weights({"w": torch.ones(2)}, "v7", dtype="float32")
        assert b.info_calls == 0


def test_a_bfloat16_server_gets_bfloat16_by_default_rounded_as_torch_rounds(fakes):
    """The default push sends what the server serves: float32 tensors arrive as bfloat16
    bits equal to torch's own cast (half the bytes); the dtype is asked once per client."""
    ((a, port),) = fakes(1)
    w = torch.randn(64, generator=torch.Generator().manual_seed(0))
    with CreditClient(f"127.0.0.1:{port}", cache=False) as client:
        out = client.push_weights({"w": w, "n": w.numpy().astype(np.float64)}, "v1")
        client.push_weights({"w": w}, "v2", partial=True)
    assert a.info_calls == 1
    assert out[f"127.0.0.1:{port}"].bytes == 2 * 64 * 2
    (_, first), _ = a.pushes
    want = w.to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    assert first["w"] == ("bfloat16", (64,), want)
    assert first["n"] == ("bfloat16", (64,), want)  # numpy float64: the same rounding


def test_a_float32_server_gets_float32_and_16_bit_tensors_as_they_are(fakes):
    """A float32 server gets float32, but a tensor already in bfloat16 or float16 travels
    as it is (the server widens it exactly); float64 is cast to float32."""
    ((a, port),) = fakes(1, dtype="float32")
    w = {
        "f32": torch.ones(3),
        "bf16": torch.ones(3, dtype=torch.bfloat16),
        "f16": np.ones(3, np.float16),
        "f64": np.ones(3, np.float64),
    }
    with CreditClient(f"127.0.0.1:{port}", cache=False) as client:
        client.push_weights(w, "v1")
    ((_, got),) = a.pushes
    assert {k: v[0] for k, v in got.items()} == {
        "f32": "float32",
        "bf16": "bfloat16",
        "f16": "float16",
        "f64": "float32",
    }


def test_an_acknowledgement_without_a_version_is_checked_with_model_info(fakes):
    """An older server's answer names no version: the client asks GetModelInfo, and an
    address that serves another version is an error."""
    ((a, port),) = fakes(1, ack="", report="other")
    with CreditClient(f"127.0.0.1:{port}", cache=False) as client:
        with pytest.raises(CreditServiceError, match="serves policy version 'other'"):
            client.push_weights({"w": torch.ones(2)}, "v6", dtype="float32")
    assert a.info_calls == 1


# -- real servers -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(other_llama_model, llama_model):
    return str(llama_model), str(other_llama_model)


def _state(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)


def _reference(model_dir):
    from anchorcredit.runner import Scorer

    return Scorer.from_pretrained(model_dir).score(list(zip(P, R, strict=True)))


def _same_scores(got, ref):
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_array_equal(g.waad, r.waad)
        np.testing.assert_array_equal(g.fai, r.fai)
        np.testing.assert_array_equal(g.gamma, r.gamma)


def test_push_then_scores_equal_a_fresh_scorer(models, start_server):
    from anchorcredit.client.weights import full_state_items

    a, b = start_server(models[0]), start_server(models[0])
    try:
        with CreditClient([a.target, b.target], cache=False) as client:
            before = client.score(P, R)
            out = client.push_weights(full_state_items(_state(models[1])), "b1", replaces="0")
            assert set(out) == {a.target, b.target}
            assert all(r.policy_version == "b1" and r.bytes > 0 for r in out.values())
            for s in (a, b):  # each replica, on its own
                with CreditClient(s.target, cache=False) as one:
                    got = one.score(P, R, policy_version="b1")
                    assert {x.policy_version for x in got} == {"b1"}
                    _same_scores(got, _reference(models[1]))
            assert not np.array_equal(before[0].waad, got[0].waad)
    finally:
        a.stop()
        b.stop()


def test_push_to_a_dead_target_is_reported_live_one_updated(models, start_server, free_port):
    s = start_server(models[0])
    dead = f"127.0.0.1:{free_port()}"
    try:
        with CreditClient([dead, s.target], cache=False, timeout_s=10) as client:
            weights = dict(full_state_items_of(models[1]))
            with pytest.raises(CreditServiceError) as e:
                client.push_weights(weights, "b2")
            assert list(e.value.failed) == [dead]
        with CreditClient(s.target, cache=False) as client:
            assert client.model_info().policy_version == "b2"
            _same_scores(client.score(P, R), _reference(models[1]))
    finally:
        s.stop()


def full_state_items_of(model_dir):
    from anchorcredit.client.weights import full_state_items

    return full_state_items(_state(model_dir))


def test_multi_address_real_servers_and_update_weights(models, start_server):
    a, b = start_server(models[0]), start_server(models[0])
    port_a, port_b = a.target.rsplit(":", 1)[1], b.target.rsplit(":", 1)[1]
    try:
        with CreditClient(f"ipv4:127.0.0.1:{port_a},127.0.0.1:{port_b}", cache=False) as c:
            out = c.update_weights(models[1], "p1", replaces="0")
            assert list(out) == [a.target, b.target]
            out = c.push_weights(dict(full_state_items_of(models[0])), "p2", dtype="auto")
            assert len(out) == 2
        for s in (a, b):
            with CreditClient(s.target, cache=False) as one:
                assert one.model_info().policy_version == "p2"
                _same_scores(one.score(P, R), _reference(models[0]))
    finally:
        a.stop()
        b.stop()


def test_collective_push_over_gloo(models, start_server):
    s = start_server(models[0])
    try:
        with CreditClient(s.target, cache=False) as client:
            group = client.open_weight_group(timeout_s=60)
            assert group.backend == "gloo" and group.port > 0
            out = client.push_weights(full_state_items_of(models[1]), "c1", transport="collective")
            assert out[s.target].policy_version == "c1"
            _same_scores(client.score(P, R, policy_version="c1"), _reference(models[1]))
            # the same group again
            client.push_weights(
                full_state_items_of(models[0]), "c2", transport="collective", replaces="c1"
            )
            assert client.model_info(refresh=True).policy_version == "c2"
            _same_scores(client.score(P, R), _reference(models[0]))
        # close() left the group: a new client opens a new one on first use
        with CreditClient(s.target, cache=False) as client:
            client.push_weights(dict(full_state_items_of(models[1])), "c3", transport="collective")
            assert client.model_info().policy_version == "c3"
    finally:
        s.stop()


def test_serialized_chunks_are_the_messages_of_weight_chunks():
    """The pre-serialized stream parses, message by message, to exactly the WeightChunks of
    weight_chunks (the reference), for tensors of every wire dtype, empty ones and pieces
    that split elements."""
    from anchorcredit.client.weights import prepare_weights, weight_chunk_bytes, weight_chunks

    g = torch.Generator().manual_seed(0)
    w = {
        "a": torch.randn(300, generator=g),
        "b": torch.randn(7, 3, generator=g).to(torch.bfloat16),
        "empty": torch.zeros(0),
        "c": np.arange(1000, dtype=np.float16),
    }
    update = pb.WeightUpdate(version="v9", replaces="v8", partial=True)
    for chunk_bytes in (1, 5, 128, 200_000):
        items = prepare_weights(w)
        want = [m.SerializeToString() for m in weight_chunks(items, update, chunk_bytes)]
        got = list(weight_chunk_bytes(items, update, chunk_bytes))
        assert len(got) == len(want)
        for g_bytes, w_bytes in zip(got, want, strict=True):
            assert pb.WeightChunk.FromString(g_bytes) == pb.WeightChunk.FromString(w_bytes)
