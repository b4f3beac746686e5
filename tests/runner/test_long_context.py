"""Long context on the CPU: a 32K-token sequence is scored in O(N) memory (docs/MEMORY.md).

A tiny 2-layer model (2 query heads, 1 kv head) scores one 32,768-token pair with the
chunked span backend; layer 0 runs its attention (SDPA, no N x N mask) and layer 1 is read.
One head's N x N float32 attention alone would be 4 GiB. The process's peak resident memory
during the call (Linux VmHWM, reset just before) must stay far below that and grow at most
linearly from 8K to 32K tokens; and the per-head WAAD and FAI at sampled positions must equal
a float64 computation straight from the captured q/k.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from debug_model import build_debug_model

import anchorcredit.runner.forward as forward
from anchorcredit.contract import CreditParams
from anchorcredit.engine import aggregate
from anchorcredit.runner import Scorer

N = 32768
PROMPT = 256
QUADRATIC = N * N * 4  # one head's float32 attention matrix: 4 GiB
STATUS = Path("/proc/self/status")


def _status(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", STATUS.read_text()).group(1)) * 1024


def peak_bytes_during(fn: Any) -> tuple[Any, int]:
    """fn()'s result and how far the process's peak RSS rose above its RSS before it."""
    # Writing 5 to clear_refs resets VmHWM (the peak) to the current RSS (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status("VmRSS")
    assert _status("VmHWM") <= before + (16 << 20), "the peak did not reset"
    out = fn()
    return out, _status("VmHWM") - before


@pytest.fixture(scope="module")
def scorer() -> Scorer:
    model = build_debug_model(
        "llama", seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=N,
    )  # fmt: skip
    s = Scorer.from_pretrained(model, layers=[1], backend="chunked")
    s.score([([1, 2], [3, 4, 5])])  # warm up (first-call allocations are not the scoring's)
    return s


def _pair(n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(n)
    return rng.integers(0, 256, PROMPT), rng.integers(0, 256, n - PROMPT)


@pytest.mark.slow
@pytest.mark.skipif(not STATUS.exists(), reason="peak memory is read from Linux /proc")
def test_32k_tokens_in_linear_memory_match_a_float64_reference(scorer, monkeypatch):
    captured: dict[str, Any] = {}
    original = forward.span_stats_packed

    def keep(q, k, cu, prompt_lens, window, h_lo, h_hi, scale, backend, **variant):
        stats = original(q, k, cu, prompt_lens, window, h_lo, h_hi, scale, backend, **variant)
        captured.update(q=q.detach().clone(), k=k.detach().clone(), scale=scale, stats=stats)
        return stats

    monkeypatch.setattr(forward, "span_stats_packed", keep)
    _, small = peak_bytes_during(lambda: scorer.score([_pair(N // 4)]))
    (result,), peak = peak_bytes_during(lambda: scorer.score([_pair(N)]))
    print(f"peak RSS rise: {small / 2**20:.0f} MiB at {N // 4}, {peak / 2**20:.0f} MiB at {N}")
    assert peak < QUADRATIC / 8, f"{peak / 2**20:.0f} MiB while scoring {N} tokens"
    assert peak < 4 * small + (64 << 20), (small, peak)  # linear, not 16x from 8K to 32K
    assert len(result.waad) == len(result.gamma) == N - PROMPT
    assert all(np.isfinite(getattr(result, n)).all() for n in ("waad", "fai", "gamma"))

    # The result is the aggregate of the statistics the engine returned ...
    params = CreditParams()
    (stats,) = captured["stats"]
    agg = aggregate([stats], params.head_quantile, layer_ids=[1])
    np.testing.assert_array_equal(result.waad, agg.waad.float().numpy())
    np.testing.assert_array_equal(result.fai, agg.fai.float().numpy())
    # ... and those equal SPEC.md's definitions in float64 at sampled rows and columns.
    q, k = captured["q"].double(), captured["k"].double()  # [2, N, 16], [1, N, 16]
    w, h_lo, h_hi = params.window, params.h_lo, params.h_hi
    samples = np.random.default_rng(1).choice(np.arange(PROMPT, N - h_hi - 1), 8, replace=False)
    keys = torch.arange(N)
    for t in sorted(int(x) for x in samples):
        # Row t (its WAAD) and the rows of its FAI band T(t) = t+h_lo .. t+h_hi, whole.
        us = torch.tensor([t, *range(t + h_lo, t + h_hi + 1)])
        scores = (q[:, us] @ k[0].T) * captured["scale"]  # [Hq, rows, N]
        p = torch.softmax(scores.masked_fill(keys > us[:, None], float("-inf")), dim=-1)
        waad = (p[:, 0] * (t - keys).clamp(min=0, max=w)).sum(-1)
        fai = p[:, 1:, t].mean(-1)
        torch.testing.assert_close(stats.waad[:, t - PROMPT].double(), waad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(stats.fai[:, t - PROMPT].double(), fai, rtol=1e-3, atol=1e-7)
