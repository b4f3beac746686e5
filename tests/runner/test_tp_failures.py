"""Tensor parallelism when things go wrong: a model whose plan does not split attention by
head is refused; a rank that dies breaks the group for good, said once.

Its own module: a process holds one default process group, and
test_tensor_parallel.py's module-scoped scorers keep theirs until that module ends.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from anchorcredit.runner.tensor_parallel import TensorParallelGroupBroken, launch


def test_plan_without_head_split_refused(tmp_path: Path):
    """Phi-3's plan gathers its fused qkv projection: every rank would see every head."""
    import transformers

    config = transformers.Phi3Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "phi3")
    with pytest.raises(ValueError, match="not split by head"):
        launch(2, tmp_path / "phi3", entropy=False)


def test_dead_rank_breaks_the_group(llama_model: Path, tmp_path: Path):
    scorer = launch(2, llama_model, entropy=False)
    assert scorer is not None
    calls = []
    scorer.on_broken = lambda: calls.append(1)
    pairs = [(np.arange(5), np.arange(7))]
    try:
        assert len(scorer.score(pairs)) == 1
        worker = scorer.group.workers[0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(10)
        with pytest.raises(TensorParallelGroupBroken, match="restart every rank"):
            scorer.score(pairs)
        with pytest.raises(TensorParallelGroupBroken):  # at once, the group is not touched
            scorer.score(pairs)
        assert calls == [1]
    finally:
        scorer.close()  # no stop sent to a broken group; the dead worker is reaped
    assert not scorer.group.workers
