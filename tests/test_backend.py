"""The server/compute seam is two Protocols: scoring, and the weight lifecycle.

A scoring-only backend (what the batcher needs, e.g. a test's fake) satisfies
ScoringBackend without any weight method; the runner's Scorer satisfies both
(ServingBackend); neither Protocol names the other's members.
"""

from __future__ import annotations

from anchorcredit.backend import BatchScores, ScoringBackend, ServingBackend, WeightLifecycle


def _members(protocol: type) -> set[str]:
    return {
        name for name in vars(protocol) if not name.startswith("_") and name not in ("register",)
    }


class ScoringOnly:
    policy_version = "0"

    def info(self): ...

    def validate(self, pairs):
        return list(pairs)

    def score_batch(self, pairs, params, *, with_entropy=False):
        return BatchScores([])


def test_scoring_and_weight_lifecycle_are_separate_protocols():
    scoring, weights = _members(ScoringBackend), _members(WeightLifecycle)
    assert scoring == {"policy_version", "info", "validate", "score_batch"}
    assert weights == {"stage_weights", "commit_weights", "join_weight_group"}
    assert not scoring & weights


def test_a_scoring_only_backend_needs_no_weight_methods():
    backend = ScoringOnly()
    assert isinstance(backend, ScoringBackend)
    assert not isinstance(backend, WeightLifecycle)
    assert not isinstance(backend, ServingBackend)


def test_the_runner_scorer_serves_both_protocols():
    from debug_model import build_debug_model

    from anchorcredit.runner import Scorer

    scorer = Scorer.from_pretrained(build_debug_model("llama", seed=0))
    assert isinstance(scorer, ScoringBackend)
    assert isinstance(scorer, WeightLifecycle)
    assert isinstance(scorer, ServingBackend)
