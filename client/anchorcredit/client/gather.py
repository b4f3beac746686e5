"""A trained model's full tensors under the served checkpoint's names (needs torch when called).

    with full_state(model) as weights:          # [(name, full tensor)], valid inside
        client.push_weights(weights, version)
    for name, t in full_state_items(model): ...  # each tensor safe to keep

The way TRL prepares its vLLM weight sync (trl/generation/vllm_generation.py,
`_iter_named_params`), for one push of the whole model:

- plain module: `named_parameters()` (a tied tensor once, under its first name);
- wrappers: DistributedDataParallel / DataParallel / DeepSpeedEngine (`.module`) and
  torch.compile (`._orig_mod`) are unwrapped; `_orig_mod.`, `_fsdp_wrapped_module.` and
  `_checkpoint_wrapped_module.` name parts are dropped wherever they appear;
- FSDP1: `FullyShardedDataParallel.summon_full_params(model, writeback=False)`;
- FSDP2 / DTensor parameters: `full_tensor()` (an all-gather: every rank must call this);
- DeepSpeed ZeRO-3 (deepspeed imported and parameters carrying `ds_id`):
  `deepspeed.zero.GatheredParameters(all parameters)` (every rank must call this);
- PEFT (LoRA): `merge_adapter()` inside the gathered state, names without
  `base_model.model.`, `.base_layer` or `modules_to_save.default.`, no adapter (`lora_`)
  or `original_module` tensors; `unmerge_adapter()` on the way out;
- persistent floating-point buffers are included (`buffers=False` leaves them out); integer
  and boolean buffers are not weights and never travel.

Tested for real on the CPU: plain, tied, wrapper prefixes (DDP-like `.module`,
torch.compile), PEFT LoRA merged, DTensor (a 1-process gloo mesh). FSDP1 and ZeRO-3 are
written against those libraries' documented APIs only (they need several processes and,
for ZeRO-3, deepspeed).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

_WRAPPER_PARTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})
_UNWRAP_CLASSES = frozenset({"DistributedDataParallel", "DataParallel", "DeepSpeedEngine"})
_PEFT_ROOT = "base_model.model."


def unwrap_model(model: Any) -> Any:
    """Strip DDP / DataParallel / DeepSpeedEngine (`.module`) and torch.compile
    (`._orig_mod`) wrappers; FSDP wrappers stay (they are needed to gather)."""
    for _ in range(16):
        if type(model).__name__ in _UNWRAP_CLASSES and hasattr(model, "module"):
            model = model.module
        elif getattr(model, "_orig_mod", None) is not None:
            model = model._orig_mod
        else:
            break
    return model


def _is_peft(model: Any) -> bool:
    return callable(getattr(model, "merge_adapter", None)) and hasattr(model, "peft_config")


def _peft_prefix(model: Any) -> str:
    try:
        return str(model.prefix)
    except AttributeError:
        return "lora_"


def _fsdp1_modules(model: Any) -> bool:
    fsdp = sys.modules.get("torch.distributed.fsdp")
    cls = getattr(fsdp, "FullyShardedDataParallel", None)
    return cls is not None and any(isinstance(m, cls) for m in model.modules())


def _zero3(params: list[Any]) -> Any:
    """deepspeed.zero when the parameters are ZeRO-3 partitioned, else None."""
    ds = sys.modules.get("deepspeed")
    if ds is None or not any(hasattr(p, "ds_id") for p in params):
        return None
    return ds.zero


def clean_name(name: str, peft: bool = False) -> str:
    """The served checkpoint's name for a trainer-side parameter name."""
    if peft:
        name = name.removeprefix(_PEFT_ROOT).replace(".base_layer", "")
        name = name.replace("modules_to_save.default.", "")
    parts = [p for p in name.split(".") if p not in _WRAPPER_PARTS]
    return ".".join(parts)


def _full(t: Any) -> Any:
    """A DTensor's full value (all-gather), else the tensor itself, detached."""
    if hasattr(t, "full_tensor") and hasattr(t, "placements"):
        return t.full_tensor().detach()
    return t.detach()


def _named_tensors(model: Any, peft: bool, buffers: bool) -> Iterator[tuple[str, Any, bool]]:
    """(clean name, full tensor, merged?) for parameters, then persistent float buffers;
    each tensor once."""
    prefix = _peft_prefix(model) if peft else ""
    seen_names: set[str] = set()
    seen_ids: set[int] = set()

    def keep(raw: str, t: Any) -> str | None:
        if peft and (prefix in raw or "original_module" in raw):
            return None  # adapter weights are merged into the base layer; not served
        name = clean_name(raw, peft)
        if name in seen_names or id(t) in seen_ids:
            return None
        seen_names.add(name)
        seen_ids.add(id(t))
        return name

    for raw, p in model.named_parameters():
        name = keep(raw, p)
        if name is not None:
            yield name, _full(p), peft and ".base_layer" in raw
    if not buffers:
        return
    for mod_name, mod in model.named_modules():
        skip = getattr(mod, "_non_persistent_buffers_set", set())
        for bname, b in mod._buffers.items():
            if b is None or bname in skip or not b.is_floating_point():
                continue
            raw = f"{mod_name}.{bname}" if mod_name else bname
            name = keep(raw, b)
            if name is not None:
                yield name, _full(b), False


@contextmanager
def _gathered(model: Any, buffers: bool) -> Iterator[tuple[list[tuple[str, Any, bool]], bool]]:
    """([(name, tensor, merged?)], sharded?) while gathered and merged."""
    model = unwrap_model(model)
    peft = _is_peft(model)
    with ExitStack() as stack:
        zero = _zero3(list(model.parameters()))
        fsdp1 = _fsdp1_modules(model)
        if zero is not None:
            stack.enter_context(zero.GatheredParameters(list(model.parameters())))
        if fsdp1:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            stack.enter_context(FSDP.summon_full_params(model, recurse=True, writeback=False))
        if peft:
            model.merge_adapter()
            stack.callback(model.unmerge_adapter)  # runs before any re-sharding
        yield list(_named_tensors(model, peft, buffers)), zero is not None or fsdp1


@contextmanager
def full_state(model: Any, *, buffers: bool = True) -> Iterator[list[tuple[str, Any]]]:
    """The model's full (gathered, adapter-merged) tensors as [(name, tensor)], valid until
    the block ends: no copies beyond what gathering itself allocates. On sharded models every
    rank must enter it (the gathers are collectives); push from rank 0 only."""
    with _gathered(model, buffers) as (items, _sharded):
        yield [(name, t) for name, t, _ in items]


def full_state_items(model: Any, *, buffers: bool = True) -> Iterator[tuple[str, Any]]:
    """Yield (name, full tensor) pairs that stay valid after the generator finishes (so a
    list of them can be pushed): plain and DTensor parameters are yielded as they are (a
    reference, or the all-gathered full tensor); tensors that only exist inside the gathered
    or merged state (FSDP1, ZeRO-3, PEFT-merged layers) are copied (to the CPU when
    sharded). `full_state` is the copy-free form."""
    with _gathered(model, buffers) as (items, sharded):
        for name, t, merged in items:
            if sharded:
                yield name, t.to("cpu", copy=True)
            elif merged:
                yield name, t.clone()
            else:
                yield name, t
