"""Tiny random-initialised causal LMs (Llama, Qwen2, Qwen3 shapes): the preset CI runs on.

Test support, not part of the package. Tests take the saved copies from tests/conftest.py's
session fixtures (`llama_model`, `qwen2_model`, `qwen3_model`, `other_llama_model`); one
that needs its own modified copy saves it (tests/support is on pytest's pythonpath):

    from debug_model import save_debug_model
    path = save_debug_model(tmp_path / "tied", arch="llama", tie_word_embeddings=True)

Shapes are small enough for 2 CPU cores but keep what matters: GQA (4 query / 2 kv heads),
several layers so the middle-third selection is non-trivial, RoPE.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

ARCHITECTURES = ("llama", "qwen2", "qwen3")


def debug_config(arch: str = "llama", **overrides: Any):
    """A transformers config of the tiny model for `arch`; overrides replace any field."""
    import transformers

    common: dict[str, Any] = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        cfg_cls, extra = transformers.LlamaConfig, {"head_dim": 16}
    elif arch == "qwen2":
        cfg_cls, extra = transformers.Qwen2Config, {"use_sliding_window": False}
    elif arch == "qwen3":
        cfg_cls, extra = transformers.Qwen3Config, {"head_dim": 16, "use_sliding_window": False}
    else:
        raise ValueError(f"unknown debug architecture {arch!r}; choose one of {ARCHITECTURES}")
    return cfg_cls(**{**common, **extra, **overrides})


def build_debug_model(arch: str = "llama", seed: int = 0, **overrides: Any):
    """A float32 random-initialised AutoModelForCausalLM, deterministic for a given seed."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(debug_config(arch, **overrides))
    return model.float().eval()


def save_debug_model(
    path: str | Path, arch: str = "llama", seed: int = 0, **overrides: Any
) -> Path:
    """Write the tiny model to `path` as safetensors + config.json and return the path."""
    path = Path(path)
    build_debug_model(arch, seed, **overrides).save_pretrained(path)
    return path
