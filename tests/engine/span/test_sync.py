"""GPU: the runner's statistics path makes no host sync per layer (torch's sync debug mode).

A blocking host-to-device copy, a .item()/.tolist() or an isfinite check would each stall the
host at every selected layer; the kernel's launcher copies its tables once per batch layout
(pinned, non-blocking) and scans no values on this path.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("triton")


@pytest.fixture
def sync_debug():
    def use(mode: str) -> None:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode(mode)

    yield use
    torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_packed_front_makes_no_sync(sync_debug):
    from anchorcredit.engine import span_stats_packed

    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(8, 3000, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(2, 3000, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    sinks = torch.zeros(8, device="cuda")
    args = (10, 10, 100, 128**-0.5, "triton")
    for variant in ({}, {"softcap": 30.0, "sinks": sinks, "sliding_window": 256}):
        span_stats_packed(q, k, [0, 1000, 3000], [10, 100], *args, **variant)  # compiles
        sync_debug("error")
        # a new layout (tables built and copied) and the same one again (cached)
        span_stats_packed(q, k, [0, 2000, 3000], [10, 100], *args, **variant)
        out = span_stats_packed(q, k, [0, 2000, 3000], [10, 100], *args, **variant)
        sync_debug("default")
        assert torch.isfinite(out[1].fai).all() and out[0].span.shape == (8,)


@pytest.mark.gpu
def test_runner_syncs_do_not_grow_with_the_selected_layers(sync_debug):
    """A scoring forward through the runner: the sync count of 4 selected layers equals
    that of 1 (whatever the model's own forward does, the statistics add none per layer).
    Both selections end at layer 4, so the model runs the same layers either way."""
    from debug_model import build_debug_model

    from anchorcredit.backend import TokenPair
    from anchorcredit.runner.forward import Horizon
    from anchorcredit.runner.scorer import Scorer
    from anchorcredit.runner.timing import StageTimer

    model = build_debug_model("llama", head_dim=64)
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size
    pairs = [
        TokenPair(rng.integers(0, vocab, p), rng.integers(0, vocab, r), vocab)
        for p, r in ((20, 300), (5, 700), (64, 64))
    ]
    counts = {}
    for layers in ([4], [1, 2, 3, 4]):
        scorer = Scorer.from_pretrained(
            model, device="cuda", dtype="bfloat16", layers=layers, backend="triton"
        )
        timer = StageTimer(torch.device("cuda"))
        horizon = Horizon(10, 10, 100)
        scorer._forward_stats(pairs, horizon, timer, False)  # compiles, caches the tables
        sync_debug("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            stats, _ = scorer._forward_stats(pairs, horizon, timer, False)
        sync_debug("default")
        counts[len(layers)] = sum("synchroniz" in str(w.message) for w in caught)
        assert len(stats) == len(layers) and len(stats[0]) == 3  # per layer, per sequence
    assert counts[4] == counts[1], counts
