"""The model runner: token IDs -> per-token WAAD, FAI, gamma (and entropy) from the policy.

Usage: `Scorer.from_pretrained(model_dir).score([(prompt_ids, response_ids)])` returns one
ScoreResult per pair (numpy float32 waad, fai, gamma of the response's length). See
docs/RUNNER.md.
"""

from __future__ import annotations

from anchorcredit.runner.layers import select_layers
from anchorcredit.runner.scorer import Scorer, ScoreResult

__all__ = ["ScoreResult", "Scorer", "select_layers"]
