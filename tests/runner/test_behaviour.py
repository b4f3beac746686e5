"""Runner mechanics: early exit, LM head only for entropy, packing, weight reload."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from debug_model import build_debug_model, save_debug_model

from anchorcredit import Scorer, ScoreResult
from anchorcredit.contract import DEFAULTS, STAT_VERSION
from anchorcredit.errors import InputError

PAIRS_SHAPES = [(1, 12), (9, 1), (20, 30), (4, 7)]


def pairs(seed: int = 0) -> list[tuple[list[int], list[int]]]:
    rng = np.random.default_rng(seed)
    return [
        (rng.integers(0, 256, p).tolist(), rng.integers(0, 256, r).tolist())
        for p, r in PAIRS_SHAPES
    ]


def assert_same(a: list[ScoreResult], b: list[ScoreResult], atol: float = 1e-5) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x.waad, y.waad, atol=atol, rtol=0)
        np.testing.assert_allclose(x.fai, y.fai, atol=atol, rtol=0)
        np.testing.assert_array_equal(x.gamma, y.gamma)
        assert x.local_heads == y.local_heads and x.global_heads == y.global_heads


@pytest.fixture(scope="module")
def scorer() -> Scorer:
    return Scorer.from_pretrained(build_debug_model("llama", seed=0), device="cpu", dtype="float32")


def count_calls(scorer: Scorer):
    """Forward-hook counters on every decoder layer, its MLP, and the LM head."""
    counts = {"layer": [0] * scorer.num_layers, "mlp": [0] * scorer.num_layers, "lm_head": 0}
    handles = []
    for i, layer in enumerate(scorer.decoder.layers):

        def bump(kind, i=i):
            def hook(*_):
                counts[kind][i] += 1

            return hook

        handles.append(layer.register_forward_pre_hook(bump("layer")))
        handles.append(layer.mlp.register_forward_pre_hook(bump("mlp")))

    def head_hook(*_):
        counts["lm_head"] += 1

    handles.append(scorer.lm_head.register_forward_pre_hook(head_hook))
    return counts, handles


def test_early_exit_skips_later_layers_and_lm_head(scorer):
    counts, handles = count_calls(scorer)
    try:
        scorer.score(pairs())
        last = scorer.layers[-1]
        assert scorer.layers == [2, 3, 4]
        # one packed forward: layers up to the last selected one are entered once ...
        assert counts["layer"] == [1] * (last + 1) + [0] * (scorer.num_layers - last - 1)
        # ... and the last selected layer stops right after its q/k: no MLP there or later
        assert counts["mlp"] == [1] * last + [0] * (scorer.num_layers - last)
        assert counts["lm_head"] == 0

        for c in counts["layer"], counts["mlp"]:
            c[:] = [0] * scorer.num_layers
        scorer.score(pairs(), with_entropy=True)
        assert counts["layer"] == [1] * scorer.num_layers
        assert counts["mlp"] == [1] * scorer.num_layers
        assert counts["lm_head"] >= 1
    finally:
        for h in handles:
            h.remove()


def test_deterministic(scorer):
    a = scorer.score(pairs(), with_entropy=True)
    b = scorer.score(pairs(), with_entropy=True)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.waad, y.waad)
        np.testing.assert_array_equal(x.fai, y.fai)
        np.testing.assert_array_equal(x.entropy, y.entropy)


def test_one_sequence_per_forward_gives_same_results(scorer):
    full = scorer.score(pairs(), strategy="coupled_rhythm", with_entropy=True)
    got = [
        scorer.score([pair], strategy="coupled_rhythm", with_entropy=True)[0] for pair in pairs()
    ]  # every sequence alone, as a tiny token budget would send them
    assert_same(full, got)
    for x, y in zip(full, got, strict=True):
        np.testing.assert_allclose(x.entropy, y.entropy, atol=1e-5, rtol=0)


def test_out_of_memory_reaches_the_caller_who_splits(scorer, monkeypatch):
    """The runner runs what it is given; the one OOM split is anchorcredit.budget's."""
    from anchorcredit.budget import halve_on_oom
    from anchorcredit.contract import DEFAULTS
    from anchorcredit.runner import scorer as scorer_module

    want = scorer.score(pairs())
    real = scorer_module.packed_forward
    sizes = []

    def flaky(decoder, lm_head, batch, *args, **kw):
        sizes.append(len(batch))
        if len(batch) > 1:
            raise torch.OutOfMemoryError("simulated")
        return real(decoder, lm_head, batch, *args, **kw)

    monkeypatch.setattr(scorer_module, "packed_forward", flaky)
    with pytest.raises(torch.OutOfMemoryError):
        scorer.score(pairs())
    splits = []
    got = halve_on_oom(
        lambda chunk: scorer.score_batch(chunk, DEFAULTS).results,
        scorer.validate(pairs()),
        on_split=splits.append,
    )
    assert_same(want, got)
    assert sizes[:4] == [4, 4, 2, 1] and splits[:2] == [4, 2] and len(splits) == 3


def test_load_weights_changes_results_and_version(tmp_path):
    scorer = Scorer.from_pretrained(build_debug_model("qwen3", seed=0), policy_version="base")
    before = scorer.score(pairs(), with_entropy=True)
    assert before[0].policy_version == "base" and scorer.info().policy_version == "base"

    new_dir = save_debug_model(tmp_path / "step1", arch="qwen3", seed=1)
    scorer.load_weights(new_dir, version="step-1")
    after = scorer.score(pairs(), with_entropy=True)
    assert scorer.policy_version == "step-1"
    assert all(r.policy_version == "step-1" for r in after)
    assert not np.allclose(before[2].waad, after[2].waad)
    # identical to a scorer built on the new weights from scratch
    fresh = Scorer.from_pretrained(build_debug_model("qwen3", seed=1)).score(
        pairs(), with_entropy=True
    )
    assert_same(after, fresh)

    # a state dict works too, and takes us back
    scorer.load_weights(build_debug_model("qwen3", seed=0).state_dict(), version="base-again")
    assert_same(before, scorer.score(pairs()))


def test_load_weights_rejects_bad_checkpoints_atomically():
    scorer = Scorer.from_pretrained(build_debug_model("llama", seed=0))
    before = scorer.score(pairs())
    good = build_debug_model("llama", seed=1).state_dict()
    bad_shape = dict(good)
    bad_shape["model.norm.weight"] = torch.ones(3)
    with pytest.raises(InputError, match="shape"):
        scorer.load_weights(bad_shape, version="x")
    unknown = dict(good, **{"model.extra.weight": torch.ones(2)})
    with pytest.raises(InputError, match="does not have"):
        scorer.load_weights(unknown, version="x")
    missing = {k: v for k, v in good.items() if "layers.0.mlp" not in k}
    with pytest.raises(InputError, match="missing"):
        scorer.load_weights(missing, version="x")
    assert scorer.policy_version == "0"
    assert_same(before, scorer.score(pairs()))


def test_info_and_half_precision_smoke():
    scorer = Scorer.from_pretrained(
        build_debug_model("qwen2", seed=0), dtype="bfloat16", layers=[1, 3], model_id="debug/qwen2"
    )
    info = scorer.info()
    assert info.model_id == "debug/qwen2" and info.architecture == "Qwen2ForCausalLM"
    assert info.dtype == "bfloat16" and info.layers == (1, 3) and info.num_layers == 6
    assert (info.num_heads, info.num_kv_heads, info.head_dim) == (4, 2, 16)
    assert info.vocab_size == 256 and info.max_positions == 1024
    assert info.kernel_backend == "chunked" and info.stat_version == STAT_VERSION
    res = scorer.score(pairs(), strategy="entropy")
    for (_, r), x in zip(pairs(), res, strict=True):
        for arr in (x.waad, x.fai, x.gamma, x.entropy):
            assert arr.dtype == np.float32 and arr.shape == (len(r),) and np.isfinite(arr).all()
        assert {layer for layer, _ in x.local_heads + x.global_heads} <= {1, 3}


def test_triton_packed_backend_under_interpreter(monkeypatch):
    """The runner's packed-kernel path (GPU default) on CPU via Triton's interpreter."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from anchorcredit.engine.span.triton_kernel import span_stats_packed

    try:  # the kernel's own tests own its correctness; this test is about the plumbing
        span_stats_packed(torch.randn(2, 20, 16), torch.randn(1, 20, 16), [0, 20], [3])
    except Exception as err:
        pytest.skip(f"the triton kernel does not run under the interpreter here: {err!r}"[:200])
    model = build_debug_model("qwen3", seed=0)
    want = Scorer.from_pretrained(model, backend="chunked").score(pairs())
    scorer = Scorer.from_pretrained(model, backend="triton")
    assert scorer.info().kernel_backend == "triton"
    assert_same(want, scorer.score(pairs()), atol=1e-4)


def test_sliding_window_layers_run_but_are_not_captured():
    """Qwen2 with sliding-window layers 3..5: capture the full layers, entropy matches eager."""
    kw = dict(use_sliding_window=True, sliding_window=8, max_window_layers=3)
    scorer = Scorer.from_pretrained(build_debug_model("qwen2", seed=0, **kw), layers=[0, 2])
    eager = build_debug_model("qwen2", seed=0, **kw)
    eager.set_attn_implementation("eager")
    got = scorer.score(pairs(), with_entropy=True)
    with torch.no_grad():
        for (p, r), g in zip(pairs(), got, strict=True):
            logits = eager(torch.tensor([p + r]), use_cache=False).logits[0].double()
            logp = torch.log_softmax(logits, -1)
            want = -(logp.exp() * logp).sum(-1)[len(p) - 1 : len(p) + len(r) - 1]
            np.testing.assert_allclose(g.entropy, want.numpy(), atol=1e-4, rtol=0)
    # Sliding-window layers are scored from the windowed softmax when asked for (checked
    # against eager attention in tests/runner/test_families.py).
    windowed = Scorer.from_pretrained(scorer.model, layers=[3]).score(pairs())
    assert all(np.isfinite(g.waad).all() and np.isfinite(g.fai).all() for g in windowed)


def test_tied_embeddings_reload(tmp_path):
    """save_pretrained omits the tied lm_head.weight; load_weights must accept that."""
    scorer = Scorer.from_pretrained(build_debug_model("llama", seed=0, tie_word_embeddings=True))
    path = save_debug_model(tmp_path / "tied", arch="llama", seed=3, tie_word_embeddings=True)
    scorer.load_weights(path, version="tied-3")
    fresh = Scorer.from_pretrained(build_debug_model("llama", seed=3, tie_word_embeddings=True))
    got, want = scorer.score(pairs(), with_entropy=True), fresh.score(pairs(), with_entropy=True)
    assert_same(got, want)
    for x, y in zip(got, want, strict=True):
        np.testing.assert_allclose(x.entropy, y.entropy, atol=1e-5, rtol=0)


def test_default_model_goes_through_anchorcredit_models(llama_model, tmp_path, monkeypatch):
    models = pytest.importorskip("anchorcredit.models.packaged")
    path = llama_model
    monkeypatch.setattr(models, "embedded_default_path", lambda *a, **k: path)
    scorer = Scorer.from_pretrained(None)
    assert scorer.info().model_id == models.EMBEDDED_MODEL_ID
    assert len(scorer.score(pairs())[0].gamma) == PAIRS_SHAPES[0][1]


def test_score_batch_reports_stage_seconds():
    from anchorcredit.runner.timing import StageTimer

    scorer = Scorer.from_pretrained(build_debug_model("llama", seed=0))
    pairs = scorer.validate([([1, 2, 3], list(range(4, 60))), ([5], list(range(7, 40)))])
    out = scorer.score_batch(pairs, DEFAULTS)
    run = out.stage_seconds
    assert len(out.results) == 2 and "entropy" not in run
    for stage in ("forward", "statistics", "credit"):
        assert run[stage] > 0, stage
    # Statistics run inside the forward, and every stage inside the whole call.
    assert run["statistics"] <= run["forward"] <= run["runner"]
    run = scorer.score_batch(pairs, DEFAULTS, with_entropy=True).stage_seconds
    assert 0 < run["entropy"] <= run["runner"]

    timer = StageTimer(torch.device("cpu"))
    for _ in range(2):
        with timer.stage("a"):
            pass
    assert set(timer.seconds()) == {"a"}


def test_random_baseline_draws_per_sequence_and_ignores_batching():
    scorer = Scorer.from_pretrained(build_debug_model("llama", seed=0))
    pairs = [([1, 2], list(range(10, 50))), ([3, 4], list(range(60, 100)))]
    a, b = scorer.score(pairs, strategy="random", seed=7)
    assert int((a.gamma > 1).sum()) == int((b.gamma > 1).sum()) == 16  # ceil(0.4 * 40)
    assert not np.array_equal(a.gamma, b.gamma)  # one shared seed would give the same positions
    [alone] = scorer.score(pairs[1:], strategy="random", seed=7)
    np.testing.assert_array_equal(alone.gamma, b.gamma)  # the batch does not matter
    [other] = scorer.score(pairs[1:], strategy="random", seed=8)
    assert not np.array_equal(other.gamma, b.gamma)


def test_non_finite_activations_fail_loudly():
    model = build_debug_model("llama", seed=0)
    with torch.no_grad():
        model.model.embed_tokens.weight[5] = float("nan")  # token 5 poisons every later row
    scorer = Scorer.from_pretrained(model)
    with pytest.raises(ValueError, match="finite"):
        scorer.score([([1, 2], [3, 4, 5, 6, 7, 8])])


def test_reload_failing_half_way_keeps_the_old_weights():
    """A read error half way through a reload hits the staging buffer, never the model: the
    old weights and version keep serving (a commit failing half way: test_weight_staging)."""
    model = build_debug_model("llama", seed=0)
    scorer = Scorer.from_pretrained(model, policy_version="v0")
    good = {k: v.clone() for k, v in build_debug_model("llama", seed=1).state_dict().items()}

    class FailsOnThird(dict):
        reads = 0

        def __getitem__(self, key):
            FailsOnThird.reads += 1
            if FailsOnThird.reads == 3:
                raise OSError("disk read error")
            return super().__getitem__(key)

    pairs = [([1, 2], list(range(3, 30)))]
    [before] = scorer.score(pairs)
    with pytest.raises(OSError, match="disk read error"):
        scorer.load_weights(FailsOnThird(good), version="v1")
    assert scorer.policy_version == "v0"
    [same] = scorer.score(pairs)
    assert same.policy_version == "v0"
    np.testing.assert_array_equal(same.waad, before.waad)
    scorer.load_weights(good, version="v1")
    [r] = scorer.score(pairs)
    assert r.policy_version == "v1"
