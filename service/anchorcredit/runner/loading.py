"""Building the policy model: dtype names, a local folder or a model object, offline."""

from __future__ import annotations

from pathlib import Path

import torch

from anchorcredit.runner.capture import ATTN_IMPLEMENTATION

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'float32' / 'bfloat16' / 'float16' (or short aliases, or a torch.dtype)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r}; use float32, bfloat16 or float16") from None


def load_model(
    path_or_model: str | Path | torch.nn.Module | None,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[torch.nn.Module, str | None]:
    """The causal LM on device/dtype with our attention implementation, and a model id
    (None for a model object: its config's name is used). None loads the embedded default."""
    model_id: str | None = None
    if path_or_model is None:
        try:
            from anchorcredit.offline.models import EMBEDDED_MODEL_ID, embedded_default_path
        except ImportError as e:
            raise RuntimeError(
                "no model given and the embedded default model (anchorcredit.offline.models) "
                "is not available; pass a model directory"
            ) from e
        path_or_model, model_id = embedded_default_path(), str(EMBEDDED_MODEL_ID)
    if isinstance(path_or_model, torch.nn.Module):
        return path_or_model.to(device=device, dtype=dtype), model_id
    from transformers import AutoModelForCausalLM

    path = Path(path_or_model)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {path}")
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION, local_files_only=True
    ).to(device)
    return model, model_id or str(path_or_model)
