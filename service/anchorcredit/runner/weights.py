"""Swap policy weights into a loaded model in place (no restart, no re-registration).

Sources: a directory of *.safetensors shards (what save_pretrained writes), one .safetensors
file, or a state dict. Everything is checked (names, shapes) before the first copy, so a
bad checkpoint leaves the old weights intact. Keys the model ties to another key (e.g.
lm_head.weight = embed_tokens.weight) may be absent, as save_pretrained omits them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from anchorcredit.errors import InputError


class PartialWeightsError(RuntimeError):
    """A copy failed after some tensors were already replaced: the model holds mixed weights."""


def _safetensors_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if files:
            return files
    raise InputError(f"no .safetensors weights at {path}", field="weights")


def _open_sources(source: Any, stack: ExitStack) -> tuple[dict[str, tuple[int, ...]], Any]:
    """(name -> shape, loader(name) -> tensor) for a path or a state dict."""
    if isinstance(source, Mapping):
        shapes = {k: tuple(v.shape) for k, v in source.items()}
        return shapes, lambda name: source[name]
    from safetensors import safe_open

    handles = {}
    shapes = {}
    for f in _safetensors_files(Path(source)):
        h = stack.enter_context(safe_open(str(f), framework="pt", device="cpu"))
        for name in h.keys():
            handles[name] = h
            shapes[name] = tuple(h.get_slice(name).get_shape())
    return shapes, lambda name: handles[name].get_tensor(name)


def _model_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def load_weights_into(model: torch.nn.Module, source: Any) -> int:
    """Copy `source` into `model`'s parameters in place; returns the number of tensors copied."""
    targets = dict(_model_tensors(model))
    persistent = set(model.state_dict().keys())
    with ExitStack() as stack:
        shapes, load = _open_sources(source, stack)
        unknown = sorted(set(shapes) - set(targets))
        if unknown:
            raise InputError(
                f"{len(unknown)} tensors the model does not have, e.g. {unknown[:3]}",
                field="weights",
            )
        bad = [
            f"{n}: {shapes[n]} != {tuple(targets[n].shape)}"
            for n in shapes
            if shapes[n] != tuple(targets[n].shape)
        ]
        if bad:
            raise InputError(f"shape mismatch: {'; '.join(bad[:3])}", field="weights")
        given_storage = {targets[n].data_ptr() for n in shapes}
        missing = sorted(
            n
            for n in persistent - set(shapes)
            if n in targets and targets[n].data_ptr() not in given_storage
        )
        if missing:
            raise InputError(
                f"{len(missing)} model tensors missing from the new weights, e.g. {missing[:3]}",
                field="weights",
            )
        copied = 0
        with torch.no_grad():
            for name in shapes:
                dst = targets[name]
                try:
                    dst.copy_(load(name).to(device=dst.device, dtype=dst.dtype))
                except Exception as err:  # a read error or device OOM half way through
                    if copied == 0:
                        raise
                    raise PartialWeightsError(
                        f"loading {name!r} failed after {copied} of {len(shapes)} tensors "
                        f"were replaced: {err}"
                    ) from err
                copied += 1
    return len(shapes)
