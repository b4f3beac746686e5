"""Runner vs brute force: eager attention matrices -> reference stats -> aggregate -> credit.

Covers Llama, Qwen2 and Qwen3 debug models, one packed batch of unequal sequences including
prompt length 1, response length 1 and a response shorter than h_lo; entropy vs full logits.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from debug_model import ARCHITECTURES, build_debug_model

from anchorcredit import Scorer
from anchorcredit.engine import aggregate, credit
from anchorcredit.engine.span.reference import stats_from_attention

# (prompt_len, response_len): P=1, R=1, R < h_lo, and two ordinary ones.
SHAPES = [(1, 40), (7, 1), (12, 5), (30, 64), (3, 23)]
PARAMS = dict(q=0.4, gamma_amp=1.5, alpha=0.5, k=3)


def make_pairs(seed: int = 0, vocab: int = 256) -> list[tuple[list[int], list[int]]]:
    rng = np.random.default_rng(seed)
    return [
        (rng.integers(0, vocab, p).tolist(), rng.integers(0, vocab, r).tolist()) for p, r in SHAPES
    ]


def brute_force(model, pairs, layers, strategy, window=10, h_lo=10, h_hi=100):
    """Materialised attention of each sequence alone (no packing), then the engine oracle."""
    out = []
    with torch.no_grad():
        for p, r in pairs:
            ids = torch.tensor([p + r])
            res = model(ids, output_attentions=True, use_cache=False)
            stats = [
                stats_from_attention(res.attentions[layer][0].double(), len(p), window, h_lo, h_hi)
                for layer in layers
            ]
            agg = aggregate(stats, 0.3, layer_ids=layers)
            logp = torch.log_softmax(res.logits[0].double(), -1)
            ent = -(logp.exp() * logp).sum(-1)[len(p) - 1 : len(p) + len(r) - 1]
            waad, fai = agg.waad.numpy(), agg.fai.numpy()
            gamma = credit(strategy, waad=waad, fai=fai, entropy=ent.numpy(), **PARAMS)
            out.append((waad, fai, gamma, ent.numpy(), agg.local_heads, agg.global_heads))
    return out


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch_models(request):
    arch = request.param
    path = request.getfixturevalue(f"{arch}_model")  # tests/conftest.py, seed 0
    scorer = Scorer.from_pretrained(path, device="cpu", dtype="float32")
    eager = build_debug_model(arch, seed=0)
    eager.set_attn_implementation("eager")
    return arch, scorer, eager


@pytest.mark.parametrize("strategy", ["coupled_rhythm", "entropy"])
def test_runner_matches_brute_force(arch_models, strategy):
    arch, scorer, eager = arch_models
    pairs = make_pairs()
    got = scorer.score(pairs, strategy=strategy, with_entropy=True, **PARAMS)
    want = brute_force(eager, pairs, scorer.layers, strategy)
    assert scorer.layers == [2, 3, 4]
    for (_p, r), g, (waad, fai, gamma, ent, loc, glob) in zip(pairs, got, want, strict=True):
        assert g.waad.dtype == np.float32 and g.waad.shape == (len(r),)
        np.testing.assert_allclose(g.waad, waad, atol=1e-4, rtol=0)
        np.testing.assert_allclose(g.fai, fai, atol=1e-4, rtol=0)
        np.testing.assert_allclose(g.entropy, ent, atol=1e-4, rtol=0)
        np.testing.assert_array_equal(g.gamma, gamma.astype(np.float32))
        assert g.local_heads == loc and g.global_heads == glob
        assert g.policy_version == "0"


def test_runner_horizon_to_end_and_explicit_layers(arch_models):
    arch, _, eager = arch_models
    scorer = Scorer.from_pretrained(build_debug_model(arch, seed=0), layers=[5, 0])
    pairs = make_pairs(seed=1)
    got = scorer.score(pairs, strategy="global_anchor", h_hi=None, window=4, h_lo=3, **PARAMS)
    want = brute_force(eager, pairs, [0, 5], "global_anchor", window=4, h_lo=3, h_hi=None)
    for g, (waad, fai, gamma, *_rest) in zip(got, want, strict=True):
        np.testing.assert_allclose(g.waad, waad, atol=1e-4, rtol=0)
        np.testing.assert_allclose(g.fai, fai, atol=1e-4, rtol=0)
        np.testing.assert_array_equal(g.gamma, gamma.astype(np.float32))
        assert g.entropy is None
