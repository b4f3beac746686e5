"""Every popular attention family: sliding-window hybrids (Gemma 3), sinks (gpt-oss) and
logit soft-capping (Gemma 2), on tiny random models built from transformers' own configs.

The runner's scores must equal SPEC.md's statistics computed from the model's own eager
attention probabilities (output_attentions=True) at the layers chosen, with default
settings, on sequences longer than the sliding window; and the hybrid default layer rule
(runner/layers.py) must pick the nearest full-attention layers.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from anchorcredit import Scorer
from anchorcredit.engine import aggregate, credit
from anchorcredit.engine.span.reference import stats_from_attention
from anchorcredit.runner.layers import LayerChoiceError, select_layers

WINDOW = 8  # the models' sliding window: most sequences below are longer
FAMILIES = ("gemma3", "gpt_oss", "gemma2")
# (prompt_len, response_len): P=1, R=1, R < h_lo, and ones longer than the window.
SHAPES = [(1, 40), (7, 1), (12, 5), (30, 64), (3, 23)]
PARAMS = dict(q=0.4, gamma_amp=1.5, alpha=0.5, k=3)


def family_config(family: str):
    import transformers

    common = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=1024, tie_word_embeddings=False, sliding_window=WINDOW,
    )  # fmt: skip
    if family == "gemma3":  # layers 0-4 sliding, 5 full
        return transformers.Gemma3TextConfig(**common, query_pre_attn_scalar=16)
    if family == "gemma2":  # alternating, soft-capped logits (a small cap so it bites)
        return transformers.Gemma2Config(
            **common, query_pre_attn_scalar=16, attn_logit_softcapping=2.0
        )
    if family == "gpt_oss":  # alternating, sinks
        return transformers.GptOssConfig(
            **common, num_local_experts=4, num_experts_per_tok=2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )  # fmt: skip
    raise ValueError(family)


def build(family: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family)).float().eval()
    if family == "gpt_oss":  # random sinks large enough to take a visible share
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_(0.0, 2.0)
    return model


def make_pairs(seed: int = 0) -> list[tuple[list[int], list[int]]]:
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 256, p).tolist(), rng.integers(0, 256, r).tolist()) for p, r in SHAPES]


def brute_force(model, pairs, layers, strategy, **horizon):
    """The model's eager attention probabilities of each sequence alone -> the engine oracle."""
    window, h_lo, h_hi = (
        horizon.get("window", 10),
        horizon.get("h_lo", 10),
        horizon.get("h_hi", 100),
    )
    out = []
    with torch.no_grad():
        for p, r in pairs:
            res = model(torch.tensor([p + r]), output_attentions=True, use_cache=False)
            stats = [
                stats_from_attention(res.attentions[layer][0].double(), len(p), window, h_lo, h_hi)
                for layer in layers
            ]
            agg = aggregate(stats, 0.3, layer_ids=layers)
            waad, fai = agg.waad.numpy(), agg.fai.numpy()
            gamma = credit(strategy, waad=waad, fai=fai, **PARAMS)
            out.append((waad, fai, gamma, agg.local_heads, agg.global_heads))
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    fam = request.param
    eager = build(fam)
    eager.set_attn_implementation("eager")
    return fam, eager


def check(got, want):
    for g, (waad, fai, gamma, loc, glob) in zip(got, want, strict=True):
        np.testing.assert_allclose(g.waad, waad, atol=1e-4, rtol=0)
        np.testing.assert_allclose(g.fai, fai, atol=1e-4, rtol=0)
        np.testing.assert_array_equal(g.gamma, gamma.astype(np.float32))
        assert g.local_heads == loc and g.global_heads == glob


DEFAULT_LAYERS = {"gemma3": [5], "gpt_oss": [1, 3], "gemma2": [1, 3]}


def test_default_settings_match_the_models_eager_attention(family):
    fam, eager = family
    scorer = Scorer.from_pretrained(build(fam))
    assert scorer.layers == DEFAULT_LAYERS[fam]
    assert scorer.info().layers == tuple(DEFAULT_LAYERS[fam])
    pairs = make_pairs()
    got = scorer.score(pairs, strategy="coupled_rhythm", **PARAMS)
    check(got, brute_force(eager, pairs, scorer.layers, "coupled_rhythm"))


def test_every_layer_sliding_ones_included_and_horizon_to_end(family):
    fam, eager = family
    layers = list(range(6))
    scorer = Scorer.from_pretrained(build(fam), layers=layers)
    pairs = make_pairs(seed=1)
    got = scorer.score(pairs, strategy="global_anchor", h_hi=None, window=4, h_lo=3, **PARAMS)
    want = brute_force(eager, pairs, layers, "global_anchor", window=4, h_lo=3, h_hi=None)
    check(got, want)


def test_layer_outputs_stay_model_true(family):
    """Entropy needs every layer's output: equal to the eager model's logits."""
    fam, eager = family
    scorer = Scorer.from_pretrained(build(fam))
    pairs = make_pairs(seed=2)
    got = scorer.score(pairs, strategy="entropy", **PARAMS)
    with torch.no_grad():
        for (p, r), g in zip(pairs, got, strict=True):
            logits = eager(torch.tensor([p + r]), use_cache=False).logits[0].double()
            logp = torch.log_softmax(logits, -1)
            ent = -(logp.exp() * logp).sum(-1)[len(p) - 1 : len(p) + len(r) - 1]
            np.testing.assert_allclose(g.entropy, ent.numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("fam", ["gpt_oss", "gemma2"])
def test_packed_triton_path_interpreted(monkeypatch, fam):
    """The packed Triton kernel inside the runner (interpreted on the CPU): sinks, soft-cap
    and sliding windows reach it too."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    eager = build(fam)
    eager.set_attn_implementation("eager")
    scorer = Scorer.from_pretrained(build(fam), layers=[0, 1], backend="triton")
    pairs = make_pairs(seed=3)[:3] + [([5, 6], list(range(30)))]
    got = scorer.score(pairs, strategy="coupled_rhythm", **PARAMS)
    check(got, brute_force(eager, pairs, [0, 1], "coupled_rhythm"))


def test_the_variant_matters():
    # Guard against a silent no-op: plain causal statistics differ from the model-true ones.
    from anchorcredit.engine.span.reference import span_stats_reference

    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(4, 30, 16, generator=gen), torch.randn(2, 30, 16, generator=gen)
    plain = span_stats_reference(q, k, 5, 10, 10, 100, 0.25)
    windowed = span_stats_reference(q, k, 5, 10, 10, 100, 0.25, sliding_window=WINDOW)
    assert not torch.allclose(plain.waad, windowed.waad)


# ---- the hybrid default rule ----------------------------------------------------------------
GEMMA3_270M = ["sliding_attention"] * 5 + ["full_attention"]


@pytest.mark.parametrize(
    "num_layers,types,want",
    [
        (36, None, [12, 15, 18, 21, 24]),  # SPEC unchanged without layer_types
        (30, ["full_attention"] * 30, [10, 12, 15, 18, 20]),  # all full: SPEC unchanged
        (18, GEMMA3_270M * 3, [5, 11]),  # Gemma-3-270M: 6->5, 8->5 (tie 5/11), 9,10,12->11
        (24, ["sliding_attention", "full_attention"] * 12, [7, 9, 11, 13, 15]),  # ties lower
        (6, ["sliding_attention"] * 6, [2, 3, 4]),  # no full layer: SPEC's, scored windowed
    ],
)
def test_hybrid_default_rule(num_layers, types, want):
    assert select_layers(num_layers, None, types) == want


def test_default_rule_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="anchorcredit.runner.layers"):
        select_layers(18, None, GEMMA3_270M * 3)
    assert "[5, 11]" in caplog.text and "[6, 8, 9, 10, 12]" in caplog.text


def test_layer_errors_list_what_can_be_scored():
    with pytest.raises(LayerChoiceError, match=r"layer 18 is out of range.*0-17 \(full "
                       r"attention: 5, 11, 17\)") as err:  # fmt: skip
        select_layers(18, [3, 18], GEMMA3_270M * 3)
    assert err.value.scorable == list(range(18))
    types = ["full_attention", "linear_attention", "full_attention", "linear_attention"]
    with pytest.raises(LayerChoiceError, match=r"linear_attention.*scored: 0, 2"):
        select_layers(4, [1], types)
    assert select_layers(4, None, types) == [0, 2]  # SPEC's [1, 2]: 1 -> 0 (tie 0/2), 2
    # Sliding-window layers are accepted when asked for.
    assert select_layers(18, [6, 8], GEMMA3_270M * 3) == [6, 8]
