"""Tensor parallelism refuses a model whose plan does not split attention by head.

Its own module: a process holds one default process group, and
test_tensor_parallel.py's module-scoped scorers keep theirs until that module ends.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anchorcredit.runner.tensor_parallel import launch


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
