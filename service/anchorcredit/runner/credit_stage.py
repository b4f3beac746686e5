"""After the forward: head classes, WAAD/FAI means and gamma of every sequence (SPEC.md).

The whole batch at once, on the statistics' device: per sequence, the heads of the selected
layers sorted by span (a stable sort, so ties go to the earlier layer, then the lower head,
as SPEC.md and engine.aggregate.classify_heads order them), the mean WAAD over its local
heads and the mean FAI over its global heads at every response position; then ONE
device-to-host copy of the means, the entropies, the head indices and a finiteness flag.
gamma (numpy, float64: engine.credit) is then computed per sequence on the host, from the
same numbers the per-sequence path (engine.aggregate) gives.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import torch

from anchorcredit.backend import Head, ScoreResult, TokenPair
from anchorcredit.contract import CreditParams
from anchorcredit.engine import PackedStats, credit
from anchorcredit.engine.aggregate import num_class_heads


def sequence_seed(seed: int, prompt: np.ndarray, response: np.ndarray) -> list[int]:
    """The random baseline's seed for one sequence: the request's seed and the sequence's ids.

    One shared seed would boost the same positions in every response of a batch; the batch
    index would make a cached result depend on its batch. The ids' crc32 does neither.
    """
    return [int(seed), zlib.crc32(np.asarray(prompt, "<u4").tobytes()),
            zlib.crc32(np.asarray(response, "<u4").tobytes())]  # fmt: skip


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on `device` without a host sync (pinned, asynchronous on CUDA)."""
    host = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def to_host(t: torch.Tensor) -> torch.Tensor:
    """`t` on the host: on CUDA one asynchronous copy into pinned memory and a wait for that
    copy alone (an event, not a device-wide synchronisation)."""
    if t.device.type != "cuda":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    done.synchronize()
    return host


def _fixed_heads(
    heads: Sequence[Head], layers: Sequence[int], num_heads: int, device: torch.device
) -> torch.Tensor:
    where = {layer: i for i, layer in enumerate(layers)}
    flat = []
    for layer, h in heads:
        if layer not in where or not 0 <= h < num_heads:
            raise ValueError(f"head {(layer, h)} is not among layers {list(layers)}")
        flat.append(where[layer] * num_heads + h)
    return to_device(np.asarray(flat, dtype=np.int64), device)


def _head_mean(
    fields: list[torch.Tensor], heads: torch.Tensor, owner: torch.Tensor
) -> torch.Tensor:
    """[n_resp]: at every response position, the mean over its sequence's `heads` (flat
    indices into the layers' heads, [B, n]) of the layers' field [Hq, n_resp] each."""
    index = heads.t().contiguous().index_select(1, owner)  # [n, n_resp], built contiguous
    return torch.cat(fields).gather(0, index).mean(0)


def credit_results(
    pairs: Sequence[TokenPair],
    stats: Sequence[PackedStats],
    entropy: torch.Tensor | None,
    params: CreditParams,
    layers: Sequence[int],
    policy_version: str,
    local_heads: Sequence[Head] | None = None,
    global_heads: Sequence[Head] | None = None,
) -> list[ScoreResult]:
    """Every sequence's ScoreResult from the batch's per-layer statistics (in `layers`
    order) and entropies [n_resp], with one device-to-host copy."""
    if not stats:
        raise ValueError("stats must hold at least one layer's PackedStats")
    if (local_heads is None) != (global_heads is None):
        raise ValueError("give both local_heads and global_heads, or neither")
    offsets = stats[0].offsets
    shapes = {(s.num_heads, s.offsets) for s in stats}
    if len(shapes) != 1 or len(layers) != len(stats) or len(pairs) != len(offsets) - 1:
        raise ValueError(f"all layers must share (Hq, responses); got {len(shapes)} layouts")
    hq, batch, n_resp = stats[0].num_heads, len(pairs), offsets[-1]
    device = stats[0].waad.device

    # Head classes per sequence: a stable ascending sort of [B, layers * Hq] spans, whose
    # flat index (layer slot * Hq + head) breaks ties as SPEC.md says.
    spans = torch.stack([s.span for s in stats], 1).reshape(batch, len(stats) * hq)
    n = num_class_heads(spans.shape[1], params.head_quantile)
    if local_heads is None:
        order = torch.sort(spans, dim=1, stable=True).indices
        local, global_ = order[:, :n], order[:, -n:]
    else:
        local = _fixed_heads(local_heads, layers, hq, device).expand(batch, -1)
        global_ = _fixed_heads(global_heads, layers, hq, device).expand(batch, -1)
        if local.shape[1] == 0 or global_.shape[1] == 0:
            raise ValueError("a fixed head set needs at least one local and one global head")

    # Means at every response position over its own sequence's heads (gathered in the
    # sequence's head order, as engine.aggregate stacks them).
    owner = to_device(np.repeat(np.arange(batch), np.diff(offsets)), device)
    waad = _head_mean([s.waad for s in stats], local, owner)
    fai = _head_mean([s.fai for s in stats], global_, owner)
    parts = [waad.float(), fai.float()]
    if entropy is not None:
        parts.append(entropy.float())
    finite = torch.isfinite(spans).all() if local_heads is None else spans.new_ones(())
    parts += [local.reshape(-1).float(), global_.reshape(-1).float(), finite.float()[None]]
    host = to_host(torch.cat(parts)).numpy()  # the batch's one device-to-host copy

    if not host[-1]:
        # A NaN would make the sort order meaningless and misclassify finite heads silently.
        raise ValueError("head spans must be finite (non-finite q/k reached the statistics?)")
    cut = 2 * n_resp + (n_resp if entropy is not None else 0)
    ent_all = host[2 * n_resp : cut] if entropy is not None else None
    local_ids = host[cut : cut + local.numel()].astype(np.int64).reshape(batch, -1)
    global_ids = host[cut + local.numel() : -1].astype(np.int64).reshape(batch, -1)
    kwargs = params.credit_kwargs()
    results = []
    for b, pair in enumerate(pairs):
        lo, hi = offsets[b], offsets[b + 1]
        w, f = host[lo:hi].copy(), host[n_resp + lo : n_resp + hi].copy()
        ent = None if ent_all is None else ent_all[lo:hi].copy()
        kwargs["seed"] = sequence_seed(params.seed, pair.prompt, pair.response)
        gamma = credit(params.strategy, waad=w, fai=f, entropy=ent, **kwargs)
        results.append(
            ScoreResult(
                waad=w,
                fai=f,
                gamma=np.asarray(gamma, dtype=np.float32),
                entropy=ent,
                local_heads=[(layers[i // hq], int(i % hq)) for i in local_ids[b]],
                global_heads=[(layers[i // hq], int(i % hq)) for i in global_ids[b]],
                policy_version=policy_version,
            )
        )
    return results
