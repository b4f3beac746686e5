"""The model runner: token IDs -> per-token WAAD, FAI, gamma (and entropy) from the policy.

  scorer.py        Scorer: the server seam (validate, score_batch, info; stage and commit
                   weights) and load_weights for Python callers
  loading.py       model folder / object / embedded default -> the model on its device
  inputs.py        the one check of token ids against the model
  forward.py       one packed forward: attention capture, statistics, early exit
  capture.py       the attention function transformers calls (q/k capture, varlen SDPA)
  packing.py       sequences end to end (cu_seqlens, restarting positions)
  credit_stage.py  head classes, aggregation and gamma per sequence
  entropy.py, layers.py, timing.py, weights.py

Usage: `Scorer.from_pretrained(model_dir).score([(prompt_ids, response_ids)])` returns one
ScoreResult per pair (numpy float32 waad, fai, gamma of the response's length). See
docs/RUNNER.md.
"""

from __future__ import annotations

from anchorcredit.backend import ScoreResult
from anchorcredit.runner.layers import select_layers
from anchorcredit.runner.scorer import Scorer

__all__ = ["ScoreResult", "Scorer", "select_layers"]
