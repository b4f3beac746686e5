"""Head classes and their means (SPEC.md "Head classes")."""

from __future__ import annotations

import pytest
import torch

from anchorcredit.engine import SpanStats, aggregate, span_stats


def fake_stats(spans: list[float], r: int = 3, offset: float = 0.0) -> SpanStats:
    h = len(spans)
    waad = torch.arange(h * r, dtype=torch.float64).view(h, r) + offset
    return SpanStats(span=torch.tensor(spans, dtype=torch.float64), waad=waad, fai=-waad)


def test_lowest_span_heads_are_local_and_highest_global():
    # 2 layers x 4 heads = 8 heads -> n = floor(0.3 * 8) = 2
    a = fake_stats([5.0, 1.0, 9.0, 3.0])
    b = fake_stats([2.0, 8.0, 0.5, 7.0], offset=100)
    m = aggregate([a, b], layer_ids=[12, 15])
    assert m.local_heads == [(15, 2), (12, 1)]
    assert m.global_heads == [(15, 1), (12, 2)]
    torch.testing.assert_close(m.waad, (b.waad[2] + a.waad[1]) / 2)
    torch.testing.assert_close(m.fai, (b.fai[1] + a.fai[2]) / 2)
    assert m.head_span.shape == (2, 4)


def test_ties_go_to_earlier_layer_then_lower_head():
    m = aggregate([fake_stats([1.0] * 4), fake_stats([1.0] * 4)])
    assert m.local_heads == [(0, 0), (0, 1)]
    assert m.global_heads == [(1, 2), (1, 3)]  # the last n of the same ascending order


def test_at_least_one_head_and_quantile_parameter():
    m = aggregate([fake_stats([3.0, 1.0])])  # floor(0.3 * 2) = 0 -> max(1, 0) = 1
    assert m.local_heads == [(0, 1)] and m.global_heads == [(0, 0)]
    m = aggregate([fake_stats([3.0, 1.0, 2.0, 4.0])], head_quantile=0.5)
    assert m.local_heads == [(0, 1), (0, 2)] and m.global_heads == [(0, 0), (0, 3)]


def test_fixed_head_set():
    a, b = fake_stats([5.0, 1.0]), fake_stats([2.0, 8.0], offset=10)
    m = aggregate([a, b], layer_ids=[3, 4], local_heads=[(4, 0)], global_heads=[(3, 0), (4, 1)])
    torch.testing.assert_close(m.waad, b.waad[0])
    torch.testing.assert_close(m.fai, (a.fai[0] + b.fai[1]) / 2)
    with pytest.raises(ValueError, match="not among layers"):
        aggregate([a], local_heads=[(7, 0)], global_heads=[(0, 0)])
    with pytest.raises(ValueError, match="both"):
        aggregate([a], local_heads=[(0, 0)])


def test_bad_aggregate_arguments():
    with pytest.raises(ValueError, match="at least one"):
        aggregate([])
    with pytest.raises(ValueError, match="share"):
        aggregate([fake_stats([1.0, 2.0]), fake_stats([1.0, 2.0, 3.0])])
    with pytest.raises(ValueError, match="head_quantile"):
        aggregate([fake_stats([1.0])], head_quantile=0.0)


def test_real_statistics_pipeline_shapes():
    gen = torch.Generator().manual_seed(0)
    layers = [
        span_stats(torch.randn(4, 40, 8, generator=gen), torch.randn(2, 40, 8, generator=gen), 5)
        for _ in range(3)
    ]
    m = aggregate(layers, layer_ids=[2, 3, 4])
    assert m.waad.shape == (35,) and m.fai.shape == (35,)
    spans = {
        (layer, h): float(layers[i].span[h]) for i, layer in enumerate([2, 3, 4]) for h in range(4)
    }
    assert max(spans[x] for x in m.local_heads) <= min(spans[x] for x in m.global_heads)


def test_non_finite_span_is_an_error_not_a_silent_misclassification():
    bad = fake_stats([5.0, float("nan"), 9.0, 3.0])
    with pytest.raises(ValueError, match="finite"):
        aggregate([bad, fake_stats([1.0, 2.0, 3.0, 4.0])])


def test_class_size_is_robust_to_float_noise():
    from anchorcredit.engine.aggregate import num_class_heads

    assert num_class_heads(180, 0.35) == 63  # 0.35 * 180 = 62.99999999999999 in binary
    assert num_class_heads(90, 0.7) == 63
    assert num_class_heads(8, 0.3) == 2 and num_class_heads(2, 0.3) == 1
