"""Building the policy model: dtype names, a local folder or a model object, offline.

Only what the scores need is loaded from a folder (docs/MEMORY.md). The forward stops at the
last selected layer (forward.py), so the decoder is built with `layers_needed` layers and,
unless entropy is wanted, without the LM head: the checkpoint's tensors of later layers and
of the head are skipped by name and never read into memory. The parameter counts of what was
loaded and of the whole model travel with the model (ModelInfo, the startup log).

    loaded = load_model(path, device, dtype, layers_needed=19, with_head=False)
    loaded.model                 # a CausalLM whose decoder has 19 layers and no LM head
    loaded.loaded_param_count    # parameters on the device (tied ones once)
    loaded.total_param_count     # parameters of the whole checkpoint's model
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from anchorcredit.models import packaged
from anchorcredit.models.source import local_model_dir
from anchorcredit.runner.capture import ATTN_IMPLEMENTATION

log = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class LoadedModel:
    """A model on its device and what it holds of the checkpoint's model."""

    model: torch.nn.Module  # a CausalLM; get_output_embeddings() is None without the head
    model_id: str | None  # None for a model object (its config's name is used)
    config: Any  # the checkpoint's config, all layers (the model's own may be truncated)
    loaded_param_count: int  # parameters held (tied ones once)
    total_param_count: int  # parameters of the whole model (tied ones once)
    # Tensors of the whole model that were not loaded (later layers, the head): name -> shape.
    # A weight update may carry them; they are checked against these shapes and dropped.
    skipped_tensors: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        """Decoder layers of the whole model (not only those loaded)."""
        return int(self.config.get_text_config().num_hidden_layers)

    @property
    def layers_loaded(self) -> int:
        return int(self.model.config.get_text_config().num_hidden_layers)

    @property
    def has_head(self) -> bool:
        return self.model.get_output_embeddings() is not None


def resolve_source(
    path_or_model: str | Path | torch.nn.Module | None,
) -> tuple[Path | torch.nn.Module, str | None]:
    """A folder or model object, and a model id; None is the embedded default model."""
    if path_or_model is None:
        return packaged.embedded_default_path(), packaged.EMBEDDED_MODEL_ID
    if isinstance(path_or_model, torch.nn.Module):
        return path_or_model, None
    # a local folder, or a Hugging Face id already in the local cache; never a download
    return local_model_dir(path_or_model), str(path_or_model)


def model_config(source: Path | torch.nn.Module) -> Any:
    """The config of a folder (config.json only, no weights read) or of a model object."""
    if isinstance(source, torch.nn.Module):
        return source.config
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(source), local_files_only=True)


def param_count(model: torch.nn.Module) -> int:
    """Parameters of `model`, tied ones once (parameters() yields a shared tensor once)."""
    return sum(p.numel() for p in model.parameters())


def truncated_config(config: Any, layers: int) -> Any:
    """A copy of `config` whose text model has its first `layers` decoder layers.

    Per-layer lists (layer_types of Gemma 2/3, Qwen2/3 sliding windows, gpt-oss; no_rope_layers
    of SmolLM3, ...) are cut to match, as configs check their length against the depth."""
    cfg = copy.deepcopy(config)
    text = cfg.get_text_config()
    depth = int(text.num_hidden_layers)
    if not 1 <= layers <= depth:
        raise ValueError(f"layers_needed must be in [1, {depth}], got {layers}")
    if layers < depth:
        for name, value in list(vars(text).items()):
            if isinstance(value, list | tuple) and len(value) == depth and depth > 1:
                setattr(text, name, type(value)(value[:layers]))
        text.num_hidden_layers = layers
    return cfg


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers prints a table of skipped keys for a truncated load; we check the
    loading info ourselves (_check_loading) and log one line instead."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _check_loading(info: dict[str, Any], path: Path) -> None:
    """Every tensor of the built model must come from the checkpoint: a missing one would be
    random-initialised and score silently wrong."""
    missing = sorted(info.get("missing_keys") or ())
    mismatched = sorted(info.get("mismatched_keys") or ())
    if missing or mismatched or info.get("error_msgs"):
        raise RuntimeError(
            f"the checkpoint at {path} does not fill the model: missing {missing[:3]}, "
            f"mismatched {mismatched[:3]} {info.get('error_msgs') or ''}"
        )


def _meta_model(config: Any) -> torch.nn.Module:
    """The whole CausalLM on the meta device: shapes only, no memory, nothing read."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, attn_implementation=ATTN_IMPLEMENTATION)


def _from_folder(
    path: Path,
    model_id: str,
    device: torch.device,
    dtype: torch.dtype,
    layers_needed: int | None,
    with_head: bool,
) -> LoadedModel:
    from transformers import AutoModel, AutoModelForCausalLM

    full = model_config(path)
    depth = int(full.get_text_config().num_hidden_layers)
    layers = depth if layers_needed is None else int(layers_needed)
    if with_head and layers != depth:
        raise ValueError(
            f"the LM head reads the last layer's output: with_head needs all {depth} layers, "
            f"got layers_needed={layers}"
        )
    config = truncated_config(full, layers)
    shell = _meta_model(full)
    total = param_count(shell)
    every = {name: tuple(t.shape) for name, t in shell.state_dict(keep_vars=True).items()}
    # Straight onto an accelerator (no host copy of the weights); on the CPU as before.
    placement = {} if device.type == "cpu" else {"device_map": {"": str(device)}}
    kwargs = dict(
        config=config,
        dtype=dtype,
        attn_implementation=ATTN_IMPLEMENTATION,
        local_files_only=True,
        output_loading_info=True,
        **placement,
    )
    with _quiet_transformers():
        if with_head:
            model, info = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
        else:
            # The base model: the checkpoint's lm_head.weight (and the later layers') are
            # unexpected keys, skipped unread. It goes into the meta CausalLM shell so tensor
            # names stay the checkpoint's (model.layers.0...) for weight updates.
            base, info = AutoModel.from_pretrained(str(path), **kwargs)
            model = _headless(shell, base)
    _check_loading(info, path)
    model = model.to(device)
    loaded = param_count(model)
    skipped = len(info.get("unexpected_keys") or ())
    log.info(
        "loaded %d of %d layers%s: %d of %d parameters (%d checkpoint tensors skipped)",
        layers,
        depth,
        " and the LM head" if with_head else ", no LM head",
        loaded,
        total,
        skipped,
    )
    held = model.state_dict(keep_vars=True).keys()
    skipped_tensors = {name: shape for name, shape in every.items() if name not in held}
    return LoadedModel(model, model_id, full, loaded, total, skipped_tensors)


def _headless(shell: torch.nn.Module, base: torch.nn.Module) -> torch.nn.Module:
    """`shell` (a meta CausalLM) around the loaded `base` decoder, with no output head."""
    head = shell.get_output_embeddings()
    for name, child in list(shell.named_children()):
        if child is head:
            setattr(shell, name, None)
    setattr(shell, shell.base_model_prefix, base)
    shell.config = base.config
    leftover = [n for n, p in shell.named_parameters() if p.device.type == "meta"]
    if leftover:  # an architecture with parameters outside its base model and head
        raise RuntimeError(f"cannot load this model without its LM head: {leftover[:3]} unset")
    return shell


def load_model(
    path_or_model: str | Path | torch.nn.Module | None,
    device: torch.device,
    dtype: torch.dtype,
    *,
    layers_needed: int | None = None,
    with_head: bool = True,
) -> LoadedModel:
    """The causal LM on device/dtype with our attention implementation.

    path_or_model: a safetensors folder (offline), a model object, or None for the embedded
    default. From a folder only the first `layers_needed` decoder layers (None: all) and,
    with `with_head`, the LM head are built and read; with_head needs every layer. A model
    object is already built: it is moved as it is (loaded == total)."""
    source, model_id = resolve_source(path_or_model)
    if isinstance(source, torch.nn.Module):
        model = source.to(device=device, dtype=dtype)
        n = param_count(model)
        return LoadedModel(model, None, model.config, n, n)
    assert model_id is not None
    return _from_folder(source, model_id, device, dtype, layers_needed, with_head)
