"""Bad input to span_stats: a ValueError that names the argument, never a silent answer."""

from __future__ import annotations

import pytest
import torch

from anchorcredit.engine import span_stats


def qk(hq=4, hkv=2, n=20, d=8):
    return torch.randn(hq, n, d), torch.randn(hkv, n, d)


@pytest.mark.parametrize(
    "make,kwargs,match",
    [
        (lambda: qk(), dict(prompt_len=0), "prompt_len must be >= 1"),
        (lambda: qk(), dict(prompt_len=20), "empty response"),
        (lambda: qk(), dict(prompt_len=2.0), "prompt_len must be an int"),
        (lambda: (torch.randn(4, 20, 8), torch.randn(2, 19, 8)), {}, "shapes do not match"),
        (lambda: (torch.randn(4, 20, 8), torch.randn(2, 20, 4)), {}, "shapes do not match"),
        (lambda: qk(hq=3, hkv=2), {}, "multiple of Hkv"),
        (lambda: (torch.randn(20, 8), torch.randn(20, 8)), {}, r"q must be \[Hq, N, d\]"),
        (lambda: (torch.full((2, 20, 8), float("nan")), torch.randn(1, 20, 8)), {}, "finite"),
        (lambda: (torch.randn(2, 20, 8), torch.full((1, 20, 8), float("inf"))), {}, "finite"),
        (lambda: (torch.ones(2, 20, 8, dtype=torch.int64), torch.ones(1, 20, 8)), {}, "floating"),
        (lambda: (torch.randn(2, 20, 8).bfloat16(), torch.randn(1, 20, 8)), {}, "share a dtype"),
        (lambda: qk(), dict(h_hi=5), "h_hi: must be >= h_lo=10"),
        (lambda: qk(), dict(window=-1), "window"),
        (lambda: qk(), dict(scale=0.0), "scale"),
        (lambda: qk(), dict(backend="cuda-magic"), "unknown backend"),
    ],
)
def test_bad_input(make, kwargs, match):
    q, k = make()
    kwargs = {"prompt_len": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        span_stats(q, k, **kwargs)


def test_auto_backend_choice():
    from anchorcredit.engine import TRITON_MAX_HEAD_DIM, resolve_backend
    from anchorcredit.engine.span.triton_kernel import MAX_HEAD_DIM

    assert TRITON_MAX_HEAD_DIM == MAX_HEAD_DIM
    assert resolve_backend("auto", torch.device("cpu")) == "chunked"
    assert resolve_backend("auto", torch.device("cuda"), head_dim=128) == "triton"
    assert resolve_backend("auto", torch.device("cuda"), head_dim=512) == "chunked"
    assert resolve_backend("reference", torch.device("cuda")) == "reference"
