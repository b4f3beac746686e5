"""reweight against hand-worked examples: both signs, both paddings, numpy and torch."""

from __future__ import annotations

import numpy as np
import pytest

from anchorcredit.client import gamma_matrix, reweight

# Row 0 right-padded (3 response tokens), row 1 left-padded (3 response tokens).
MASK = np.array([[1, 1, 1, 0], [0, 1, 1, 1]], dtype=bool)
GAMMAS = [np.array([1.5, 2.0, 1.25], np.float32), np.array([1.0, 2.0, 1.5], np.float32)]
ADV = np.array([[2.0, -1.0, 4.0, 9.0], [9.0, -2.0, 1.0, -4.0]], np.float32)


def test_both_signs_numpy():
    out = reweight(ADV, GAMMAS, MASK)
    want = np.array([[3.0, -2.0, 5.0, 9.0], [9.0, -2.0, 2.0, -6.0]], np.float32)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, want)


def test_positive_only_numpy():
    out = reweight(ADV, GAMMAS, MASK, sign="positive_only")
    # gamma only where A >= 0: row 0 position 1 (A=-1) and row 1 position 3 (A=-4) untouched
    want = np.array([[3.0, -1.0, 5.0, 9.0], [9.0, -2.0, 2.0, -4.0]], np.float32)
    np.testing.assert_array_equal(out, want)


def test_sequence_level_advantages_broadcast():
    # TRL-style [B] advantages become [B, T]; padding positions keep A (the loss masks them).
    out = reweight(np.array([2.0, -1.0]), GAMMAS, MASK)
    want = np.array([[3.0, 4.0, 2.5, 2.0], [-1.0, -1.0, -2.0, -1.5]])
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, want)
    out = reweight(np.array([2.0, -1.0]), GAMMAS, MASK, sign="positive_only")
    np.testing.assert_array_equal(out[1], [-1.0, -1.0, -1.0, -1.0])


def test_dense_gamma_and_holes():
    # A hole in the mask (tool output in a multi-turn response) keeps the order of the rest.
    mask = np.array([[1, 0, 1, 1]], dtype=bool)
    out = reweight(np.ones((1, 4)), [np.array([2.0, 3.0, 4.0])], mask)
    np.testing.assert_array_equal(out, [[2.0, 1.0, 3.0, 4.0]])
    dense = np.array([[2.0, 7.0, 3.0, 4.0]])
    np.testing.assert_array_equal(reweight(np.ones((1, 4)), dense, mask), [[2.0, 1.0, 3.0, 4.0]])
    np.testing.assert_array_equal(gamma_matrix(GAMMAS, MASK)[1], [1.0, 1.0, 2.0, 1.5])


def test_errors():
    with pytest.raises(ValueError, match="row 1"):
        reweight(ADV, [GAMMAS[0], GAMMAS[1][:2]], MASK)
    with pytest.raises(ValueError, match="sign"):
        reweight(ADV, GAMMAS, MASK, sign="negative")
    with pytest.raises(ValueError, match="3 rows|2 rows|batch"):
        reweight(ADV, GAMMAS[:1], MASK)


def test_torch_keeps_dtype_device_and_matches_numpy():
    torch = pytest.importorskip("torch")
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        adv = torch.tensor(ADV, dtype=dtype)
        out = reweight(adv, [torch.tensor(g) for g in GAMMAS], torch.tensor(MASK).long())
        assert out.dtype == dtype and out.device == adv.device
        want = reweight(ADV.astype(np.float64), GAMMAS, MASK)
        np.testing.assert_allclose(out.float().numpy(), want, rtol=1e-2)
    out = reweight(torch.tensor(ADV), GAMMAS, torch.tensor(MASK), sign="positive_only")
    np.testing.assert_array_equal(out.numpy(), reweight(ADV, GAMMAS, MASK, sign="positive_only"))
    seq = reweight(torch.tensor([2.0, -1.0]), GAMMAS, torch.tensor(MASK))
    assert tuple(seq.shape) == (2, 4)
    assert not seq.requires_grad
