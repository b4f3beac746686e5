"""The batched credit stage (runner/credit_stage.py): the same numbers as the per-sequence
path of SPEC.md (engine.aggregate + engine.credit) on fresh random statistics, and ONE
device-to-host transfer per batch, whatever the batch size (CPU: counted by patching the
tensor methods that read device memory; GPU: torch's sync debug mode)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from anchorcredit.backend import TokenPair
from anchorcredit.contract import CreditParams
from anchorcredit.engine import PackedStats, aggregate, credit
from anchorcredit.runner.credit_stage import credit_results, sequence_seed

LAYERS = [3, 5, 8]
HQ = 4


def random_batch(lengths, seed, device="cpu", ties=True):
    """Per-layer PackedStats of sequences with these response lengths (spans with ties)."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    offsets = [0, *np.cumsum(lengths).tolist()]
    stats = []
    for _ in LAYERS:
        span = torch.rand(len(lengths), HQ, generator=gen) * 50
        if ties:  # equal spans across layers and heads: the order falls back to (layer, head)
            span[:, 1] = span[:, 0]
        stats.append(PackedStats(span, torch.rand(HQ, n, generator=gen) * 10,
                                 torch.rand(HQ, n, generator=gen) / 50, offsets))  # fmt: skip
    if ties:
        stats[1].span[:, 2] = stats[0].span[:, 2]
    entropy = torch.rand(n, generator=gen) * 3
    rng = np.random.default_rng(seed)
    pairs = [TokenPair(rng.integers(0, 100, 1 + b % 3), rng.integers(0, 100, r), 100)
             for b, r in enumerate(lengths)]  # fmt: skip
    moved = [PackedStats(s.span.to(device), s.waad.to(device), s.fai.to(device), s.offsets)
             for s in stats]  # fmt: skip
    return pairs, moved, entropy.to(device)


def per_sequence(pairs, stats, entropy, params, local=None, global_=None):
    """SPEC.md's path, one sequence at a time (what the runner did before)."""
    out = []
    for b, pair in enumerate(pairs):
        lo, hi = stats[0].offsets[b], stats[0].offsets[b + 1]
        agg = aggregate([s[b] for s in stats], params.head_quantile, LAYERS, local, global_)
        waad, fai = agg.waad.float().cpu().numpy(), agg.fai.float().cpu().numpy()
        ent = entropy[lo:hi].float().cpu().numpy()
        kw = {**params.credit_kwargs(), "seed": sequence_seed(params.seed, pair.prompt,
                                                              pair.response)}  # fmt: skip
        gamma = credit(params.strategy, waad=waad, fai=fai, entropy=ent, **kw)
        out.append((waad, fai, np.asarray(gamma, np.float32), ent, agg.local_heads,
                    agg.global_heads))  # fmt: skip
    return out


@pytest.mark.parametrize("strategy", ["coupled_rhythm", "entropy", "random", "global_anchor"])
@pytest.mark.parametrize("quantile", [0.3, 0.05])
def test_batched_equals_the_per_sequence_path(strategy, quantile):
    pairs, stats, entropy = random_batch([1, 7, 30, 2, 64], seed=len(strategy))
    params = CreditParams.build(strategy, head_quantile=quantile, q=0.4, seed=3)
    got = credit_results(pairs, stats, entropy, params, LAYERS, "v1")
    want = per_sequence(pairs, stats, entropy, params)
    for g, (waad, fai, gamma, ent, local, global_) in zip(got, want, strict=True):
        np.testing.assert_array_equal(g.waad, waad)  # bit for bit
        np.testing.assert_array_equal(g.fai, fai)
        np.testing.assert_array_equal(g.gamma, gamma)
        np.testing.assert_array_equal(g.entropy, ent)
        assert g.local_heads == local and g.global_heads == global_
        assert g.policy_version == "v1" and g.waad.dtype == np.float32


def test_fixed_head_sets_and_no_entropy():
    pairs, stats, _ = random_batch([5, 9], seed=1)
    local, global_ = [(5, 1), (3, 0)], [(8, 3)]
    params = CreditParams.build("coupled_rhythm")
    got = credit_results(pairs, stats, None, params, LAYERS, "v", local, global_)
    want = per_sequence(pairs, stats, torch.zeros(14), params, local, global_)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g.waad, w[0])
        np.testing.assert_array_equal(g.fai, w[1])
        assert g.entropy is None and g.local_heads == local and g.global_heads == global_
    with pytest.raises(ValueError, match=r"head \(4, 0\) is not among layers"):
        credit_results(pairs, stats, None, params, LAYERS, "v", [(4, 0)], global_)


def test_non_finite_spans_are_refused():
    pairs, stats, entropy = random_batch([5, 9], seed=2)
    stats[1].span[1, 2] = float("nan")
    with pytest.raises(ValueError, match="head spans must be finite"):
        credit_results(pairs, stats, entropy, CreditParams.build(None), LAYERS, "v")


READS = ("cpu", "tolist", "item", "numpy", "__bool__", "__float__", "__int__", "__index__")


@pytest.fixture
def count_reads(monkeypatch):
    """Counts calls of every tensor method that reads a tensor's values back to the host."""
    counts = []
    for name in READS:
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **kw):
            counts.append(_name)
            return _real(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


@pytest.mark.parametrize("batch", [1, 16])
def test_one_host_transfer_per_batch(count_reads, batch):
    pairs, stats, entropy = random_batch([3 + b for b in range(batch)], seed=batch)
    count_reads.clear()
    credit_results(pairs, stats, entropy, CreditParams.build("coupled_rhythm"), LAYERS, "v")
    assert count_reads == ["numpy"], count_reads  # the one payload, whatever the batch


def test_score_batch_reads_do_not_grow_with_the_batch(count_reads):
    """The whole scoring call: the forward's own reads (transformers) and the credit
    stage's one, the same for 2 and 12 sequences (it was 3 or more per sequence)."""
    from debug_model import build_debug_model

    from anchorcredit.runner.scorer import Scorer

    scorer = Scorer.from_pretrained(build_debug_model("llama", seed=0))
    rng = np.random.default_rng(0)
    counts = {}
    for batch in (2, 12):
        raw = [(rng.integers(0, 200, 5), rng.integers(0, 200, 20)) for _ in range(batch)]
        pairs = scorer.validate([(p.tolist(), r.tolist()) for p, r in raw])
        scorer.score_batch(pairs, CreditParams.build("coupled_rhythm"))  # warm
        count_reads.clear()
        scorer.score_batch(pairs, CreditParams.build("coupled_rhythm"))
        counts[batch] = len(count_reads)
    assert counts[2] == counts[12] and counts[2] <= 4, counts


@pytest.fixture
def sync_debug():
    def use(mode: str) -> None:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode(mode)

    yield use
    torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_gpu_credit_stage_makes_no_other_sync(sync_debug):
    """On the GPU the credit stage of a 512-sequence batch runs under sync debug mode
    "error": its one copy is asynchronous into pinned memory, awaited by an event."""
    pairs, stats, entropy = random_batch([40 + b % 50 for b in range(512)], 0, device="cuda")
    params = CreditParams.build("coupled_rhythm")
    want = credit_results(pairs, stats, entropy, params, LAYERS, "v")
    sync_debug("error")
    got = credit_results(pairs, stats, entropy, params, LAYERS, "v")
    sync_debug("default")
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g.gamma, w.gamma)
    cpu = [PackedStats(s.span.cpu(), s.waad.cpu(), s.fai.cpu(), s.offsets) for s in stats]
    reference = per_sequence(pairs, cpu, entropy.cpu(), params)
    for g, (waad, fai, *_rest) in zip(got, reference, strict=True):
        np.testing.assert_allclose(g.waad, waad, rtol=1e-6)
        np.testing.assert_allclose(g.fai, fai, rtol=1e-6)


@pytest.mark.gpu
def test_gpu_scoring_syncs_do_not_grow_with_the_batch(sync_debug):
    from debug_model import build_debug_model

    from anchorcredit.runner.scorer import Scorer

    scorer = Scorer.from_pretrained(build_debug_model("llama", head_dim=64), device="cuda",
                                    dtype="bfloat16", backend="triton")  # fmt: skip
    rng = np.random.default_rng(0)
    for h_hi in (100, None):  # the two-pass path, and the one-pass path at h_hi=end
        params = CreditParams.build("coupled_rhythm", h_hi=h_hi)
        counts = {}
        for batch in (2, 64):
            raw = [(rng.integers(0, 200, 30), rng.integers(0, 200, 300)) for _ in range(batch)]
            pairs = scorer.validate([(p.tolist(), r.tolist()) for p, r in raw])
            scorer.score_batch(pairs, params)  # compiles
            sync_debug("warn")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                scorer.score_batch(pairs, params)
            sync_debug("default")
            counts[batch] = sum("synchroniz" in str(w.message) for w in caught)
        assert counts[2] == counts[64], (h_hi, counts)
