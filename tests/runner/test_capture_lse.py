"""The row LSE the capture hands to the statistics (the span kernel's one-pass path).

It must be the layer's own softmax normaliser: exact against float64 for plain causal GQA
attention (the CPU flash kernel, SDPA's own) and for soft-capped / sink layers (the eager
path); the stop layer, whose attention is never computed, gets none. Through the runner
with the triton backend (interpreter) and h_hi=end, the layers with an LSE are scored in one
pass and the results equal the chunked backend's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anchorcredit.runner.capture import CaptureState, StopForward, capturing
from anchorcredit.runner.scorer import Scorer

from .test_behaviour import assert_same, pairs
from .test_families import build as build_family


def exact_lse(q, k, scale, cu, variant):
    """float64 log-sum-exp of every row [Hq, T], per packed sequence, as the layer computes."""
    hq, t, _ = q.shape
    group = hq // k.shape[0]
    out = torch.empty(hq, t, dtype=torch.float64)
    for a, b in zip(cu[:-1], cu[1:], strict=True):
        kk = k[:, a:b].double().repeat_interleave(group, 0)
        s = torch.einsum("hid,hjd->hij", q[:, a:b].double(), kk) * scale
        if variant["softcap"] is not None:
            s = torch.tanh(s / variant["softcap"]) * variant["softcap"]
        i = torch.arange(b - a)
        hidden = i[None, :] > i[:, None]
        if variant["sliding_window"] is not None:
            hidden |= i[:, None] - i[None, :] >= variant["sliding_window"]
        s = s.masked_fill(hidden, float("-inf"))
        if variant["sinks"] is not None:
            s = torch.cat([s, variant["sinks"].double()[:, None, None].expand(hq, b - a, 1)], -1)
        out[:, a:b] = torch.logsumexp(s, -1)
    return out


def captured_lse(model, layers, stop_after, want_lse=True):
    seqs = [(p + r) for p, r in pairs()]
    cu = [0, *np.cumsum([len(s) for s in seqs]).tolist()]
    ids = torch.tensor([sum(seqs, [])])
    pos = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    seen = {}

    def sink(layer, q, k, scale, variant, lse):
        seen[layer] = (q.clone(), k.clone(), scale, variant, None if lse is None else lse.clone())

    state = CaptureState(cu, frozenset(layers), sink, stop_after=stop_after, want_lse=want_lse)
    with capturing(state), torch.no_grad():
        try:
            model.get_decoder()(input_ids=ids, position_ids=pos, use_cache=False)
        except StopForward:
            pass
    return seen, cu


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt_oss"])
def test_the_captured_lse_is_the_layers_own(family):
    """llama: plain causal GQA (the CPU flash kernel); gemma2: soft-capped, gpt_oss: sinks
    (the eager softmax); the stop layer (3) gets none."""
    if family == "llama":
        from debug_model import build_debug_model

        model = Scorer(build_debug_model("llama", seed=0)).model
        layers = [1, 2, 3]
    else:
        model = Scorer(build_family(family), layers=[1, 3]).model
        layers = [1, 3]  # full-attention layers of these alternating families
    seen, cu = captured_lse(model, layers, stop_after=3)
    assert seen[3][4] is None  # the stop layer's attention is never computed
    for layer in layers[:-1]:
        q, k, scale, variant, lse = seen[layer]
        assert lse is not None and lse.dtype == torch.float32 and lse.shape == q.shape[:2]
        want = exact_lse(q, k, scale, cu, variant)
        torch.testing.assert_close(lse.double(), want, rtol=1e-6, atol=1e-5)
    if family == "gemma2":
        assert seen[1][3]["softcap"] is not None
    if family == "gpt_oss":
        assert seen[1][3]["sinks"] is not None


def test_no_lse_unless_asked():
    from debug_model import build_debug_model

    model = Scorer(build_debug_model("llama", seed=0)).model
    seen, _ = captured_lse(model, [1, 2], stop_after=None, want_lse=False)
    assert all(v[4] is None for v in seen.values())


def test_runner_scores_h_hi_end_in_one_pass_where_the_lse_is(monkeypatch):
    """The triton backend (interpreter) at h_hi=end: layers 2 and 3 of the default [2, 3, 4]
    take the one-pass path, the stop layer 4 the two-pass one; the same numbers as chunked."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from debug_model import build_debug_model

    from anchorcredit.engine.span import fallback, triton_kernel

    model = build_debug_model("qwen3", seed=0)
    want = Scorer.from_pretrained(model, backend="chunked").score(pairs(), h_hi="end")
    scorer = Scorer.from_pretrained(model, backend="triton")
    assert scorer.layers == [2, 3, 4]
    paths = []
    real = triton_kernel.plan_packed

    def spy(*args, **kw):
        plan = real(*args, **kw)
        paths.append(plan.one_pass)
        return plan

    monkeypatch.setattr(triton_kernel, "plan_packed", spy)
    before = fallback.total()
    got = scorer.score(pairs(), h_hi="end")
    assert paths == [True, True, False] and fallback.total() == before
    assert_same(want, got, atol=1e-4)
    paths.clear()
    scorer.score(pairs())  # h_hi=100: the two-pass path everywhere (no LSE asked for)
    assert paths == [False, False, False]


@pytest.mark.gpu
def test_gpu_runner_one_pass_equals_chunked():
    """bf16 on the GPU, h_hi=end: the triton scorer (one pass where the flash LSE is, two at
    the stop layer) against the chunked scorer on the same model."""
    from debug_model import build_debug_model

    from anchorcredit.engine.span import fallback

    model = build_debug_model("qwen3", seed=0, head_dim=64)
    kw = dict(device="cuda", dtype="bfloat16")
    want = Scorer.from_pretrained(model, backend="chunked", **kw).score(pairs(), h_hi="end")
    before = fallback.total()
    got = Scorer.from_pretrained(model, backend="triton", **kw).score(pairs(), h_hi="end")
    assert fallback.total() == before
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.waad, w.waad, rtol=2e-3, atol=2e-3 * np.abs(w.waad).max())
        np.testing.assert_allclose(g.fai, w.fai, rtol=2e-3, atol=2e-3 * np.abs(w.fai).max())
