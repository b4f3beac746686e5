"""Post-RoPE Q/K capture through transformers' AttentionInterface, with packed varlen attention.

`capture_attention_forward` is registered as the attention implementation ATTN_IMPLEMENTATION.
Every decoder layer calls it with the layer's post-RoPE query [1, Hq, T, d], key and value
[1, Hkv, T, d]. While a CaptureState is active it
  1. computes the layer output with SDPA segment by segment (block-diagonal causal over the
     packed sequences), or with torch's flash varlen kernel on CUDA in half precision; at a
     selected layer, when the state asks for it (want_lse), with the attention's row
     log-sum-exp [Hq, T] (natural log, the sink included), which the span kernel's one-pass
     path reads instead of recomputing the softmax statistics;
  2. hands q/k of the selected layers (module.layer_idx), and that LSE, to the state's sink,
     which turns them into span statistics right away (so only one layer's q/k is alive at a
     time),
  3. raises StopForward at the state's stop layer, before its attention (early exit: neither
     that layer's attention output, its MLP, the later layers nor the LM head run; its
     statistics get no LSE).
No N x N matrix (probabilities or mask) is built for full-attention layers.

Model-true attention: a layer's logit soft-capping (`softcap`, Gemma 2), attention sinks
(`s_aux`, gpt-oss) and sliding window (`sliding_window`) reach the statistics with its q/k
(the sink's [Hq] logits, the window, the cap), so span, WAAD and FAI read what the layer
really attends to; its own output honours them too (soft-capped or sink layers: an eager
softmax in blocks of query rows per sequence, never more than BLOCK_ELEMENTS scores at once).

Masks in transformers 5.x: `create_causal_mask` asks AttentionMaskInterface for a mask builder
keyed by the attention implementation. A name that is NOT registered there early-exits with
mask None (the "TGI/vLLM custom attention" path), which is what we want: registering sdpa_mask
under our name would make transformers detect the packed position ids and materialise a
[1, 1, T, T] block-diagonal boolean mask. So no mask builder is registered, and packing
(cu_seqlens) reaches the attention function through the active CaptureState instead.
Outside a CaptureState the function behaves like transformers' SDPA path (causal, no padding),
so the model still works for plain single-sequence forwards.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from anchorcredit.backend import check_cancelled

ATTN_IMPLEMENTATION = "anchorcredit_capture"

# sink(layer_idx, q [Hq, T, d], k [Hkv, T, d], scale, variant, lse); variant holds the
# layer's `softcap` (float | None), `sinks` ([Hq] tensor | None) and `sliding_window`
# (int | None): the keywords of anchorcredit.engine.span_stats_packed; lse the attention's
# row log-sum-exp [Hq, T] (float32, natural log) or None.
QKSink = Callable[
    [int, torch.Tensor, torch.Tensor, float, dict[str, Any], torch.Tensor | None], None
]

# Scores of one eager block (soft-capped or sink layers) hold at most this many elements.
BLOCK_ELEMENTS = 1 << 24


class StopForward(Exception):
    """Raised inside the forward once the last needed layer's q/k are captured (early exit)."""


@dataclass
class CaptureState:
    """What one packed forward needs: segment boundaries, layers to capture, where to stop."""

    cu_seqlens: list[int]
    layers: frozenset[int]
    sink: QKSink
    stop_after: int | None = None  # layer index whose capture ends the forward; None = run all
    want_lse: bool = False  # hand the sink each selected layer's attention LSE where computed
    captured: set[int] = field(default_factory=set)
    _cu_tensor: torch.Tensor | None = None

    @property
    def max_len(self) -> int:
        return max(b - a for a, b in zip(self.cu_seqlens[:-1], self.cu_seqlens[1:], strict=True))

    def cu_tensor(self, device: torch.device) -> torch.Tensor:
        if self._cu_tensor is None or self._cu_tensor.device != device:
            host = torch.tensor(self.cu_seqlens, dtype=torch.int32)
            if device.type == "cuda":  # pinned: an asynchronous copy, no host sync
                host = host.pin_memory()
            self._cu_tensor = host.to(device, non_blocking=True)
        return self._cu_tensor


_ACTIVE: contextvars.ContextVar[CaptureState | None] = contextvars.ContextVar(
    "anchorcredit_capture_state", default=None
)


@contextlib.contextmanager
def capturing(state: CaptureState) -> Iterator[CaptureState]:
    """Make `state` the one the attention function reads for the duration of a forward."""
    token = _ACTIVE.set(state)
    try:
        yield state
    finally:
        _ACTIVE.reset(token)


_VARLEN_FAILED = False


def _flash_varlen_ok(query: torch.Tensor, head_dim_v: int) -> bool:
    if query.device.type != "cuda" or query.dtype not in (torch.float16, torch.bfloat16):
        return False
    if query.shape[-1] != head_dim_v or query.shape[-1] > 256:
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def eager_segment_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    sliding_window: int | None = None,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """One sequence's causal attention as transformers' eager path computes it (scale, then
    soft-capping, mask, a sink in the denominator), in blocks of query rows.
    query [Hq, n, d], key/value [Hkv, n, d*] -> [n, Hq, dv]; softmax in float32 (float64 for
    float64 inputs). lse [Hq, n], when given, receives each row's log-sum-exp (the sink
    included), the softmax's own."""
    hq, n, _ = query.shape
    hkv, dv = key.shape[0], value.shape[-1]
    group = hq // hkv
    dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    kt = key.to(dtype).transpose(1, 2)  # [Hkv, d, n]
    v = value.to(dtype)
    out = value.new_empty(n, hq, dv)
    pos = torch.arange(n, device=query.device)
    rows = max(1, min(n, BLOCK_ELEMENTS // max(1, hq * n)))
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        b = r1 - r0
        qb = query[:, r0:r1].to(dtype).reshape(hkv, group * b, -1)
        scores = torch.bmm(qb, kt[:, :, :r1]).view(hq, b, r1) * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        dist = pos[r0:r1, None] - pos[None, :r1]
        hidden = dist < 0
        if sliding_window is not None:
            hidden |= dist >= sliding_window
        scores.masked_fill_(hidden, float("-inf"))
        if sinks is not None:
            sink = sinks.to(dtype)[:, None, None].expand(hq, b, 1)
            scores = torch.cat([scores, sink], -1)
        probs = torch.softmax(scores, -1)[..., :r1]
        if lse is not None:
            lse[:, r0:r1] = torch.logsumexp(scores, -1)
        ctx = torch.bmm(probs.view(hkv, group * b, r1), v[:, :r1]).view(hq, b, dv)
        out[r0:r1] = ctx.transpose(0, 1).to(out.dtype)
    return out


def packed_causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    state: CaptureState,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    with_lse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Block-diagonal causal attention over packed sequences -> ([1, T, Hq, dv], lse): lse
    the rows' log-sum-exp [Hq, T] (float32, natural log) when with_lse and the path computes
    it (eager, torch's varlen flash kernel, the CPU flash kernel), else None."""
    _, hq, t, _ = query.shape
    dv = value.shape[-1]
    if softcap is not None or sinks is not None:
        # Neither SDPA nor flash varlen soft-caps or takes a sink: the eager softmax, per
        # sequence, in row blocks.
        out = query.new_empty(1, t, hq, dv)
        dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
        lse = torch.empty(hq, t, dtype=dtype, device=query.device) if with_lse else None
        for a, b in zip(state.cu_seqlens[:-1], state.cu_seqlens[1:], strict=True):
            out[0, a:b] = eager_segment_attention(
                query[0, :, a:b], key[0, :, a:b], value[0, :, a:b], scale,
                softcap, sinks, sliding_window, None if lse is None else lse[:, a:b],
            )  # fmt: skip
        return out, None if lse is None else lse.float()
    global _VARLEN_FAILED
    if not _VARLEN_FAILED and _flash_varlen_ok(query, dv):
        try:
            return _varlen(query, key, value, state, scale, sliding_window, with_lse)
        except torch.OutOfMemoryError:
            raise  # the scorer halves the batch and retries
        except (RuntimeError, NotImplementedError) as err:
            # Not validated on every GPU generation: fall back to per-sequence SDPA for good.
            _VARLEN_FAILED = True
            warnings.warn(f"varlen flash attention failed ({err}); using SDPA", stacklevel=2)

    out = query.new_empty(1, t, hq, dv)
    gqa = key.shape[1] != hq
    # The CPU flash kernel is SDPA's own on the CPU (same output) and returns the LSE.
    cpu_lse = with_lse and query.device.type == "cpu" and sliding_window is None
    lse = torch.empty(hq, t, dtype=torch.float32) if cpu_lse else None
    for a, b in zip(state.cu_seqlens[:-1], state.cu_seqlens[1:], strict=True):
        mask = None
        if sliding_window is not None and b - a > sliding_window:
            # Sliding-window layers only: transformers' rule, key j visible from i iff
            # 0 <= i - j < window. This one does build an n x n boolean mask per sequence.
            i = torch.arange(b - a, device=query.device)
            d = i[:, None] - i[None, :]
            mask = (d >= 0) & (d < sliding_window)
        segment = (query[:, :, a:b], key[:, :, a:b], value[:, :, a:b])
        if lse is not None:
            seg, seg_lse = _cpu_flash(*segment, scale)
            lse[:, a:b] = seg_lse[0]
        else:
            seg = F.scaled_dot_product_attention(
                *segment, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=gqa
            )
        out[0, a:b] = seg[0].transpose(0, 1)
    return out, lse


def _varlen(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    state: CaptureState,
    scale: float,
    sliding_window: int | None,
    with_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """torch's flash varlen kernel over the packed batch, with its LSE where asked for."""
    from torch.nn.attention import varlen

    cu = state.cu_tensor(query.device)
    left = -1 if sliding_window is None else int(sliding_window) - 1
    args = (query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), cu, cu,
            state.max_len, state.max_len)  # fmt: skip
    kw = dict(scale=scale, window_size=(left, 0), enable_gqa=key.shape[1] != query.shape[1])
    if not with_lse or not hasattr(varlen, "AuxRequest"):  # older torch: no LSE to return
        return varlen.varlen_attn(*args, **kw)[None], None
    try:
        out, lse = varlen.varlen_attn(*args, return_aux=varlen.AuxRequest(lse=True), **kw)
    except TypeError:  # a torch whose varlen_attn takes no return_aux: the two-pass path
        return varlen.varlen_attn(*args, **kw)[None], None
    hq, t = query.shape[1], query.shape[2]
    if tuple(lse.shape) != (hq, t):  # flash's varlen LSE is [Hq, T]; the docs say [T, Hq]
        lse = lse.transpose(0, 1)
    return out[None], lse.float().contiguous()


def _cpu_flash(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA's CPU flash kernel on one causal segment [1, H, n, d]: (output, LSE [1, Hq, n])."""
    group = query.shape[1] // key.shape[1]
    if group > 1:
        key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, 0.0, True, scale=scale
    )
    return out, lse


def capture_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The registered attention function (transformers' AttentionInterface signature)."""
    state = _ACTIVE.get()
    if state is None:
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            softcap=softcap,
            **kwargs,
        )
    check_cancelled()  # cooperative: stop between layers once every caller gave up
    sinks = kwargs.get("s_aux")
    sinks = None if sinks is None else sinks.detach()
    softcap = None if softcap is None else float(softcap)
    sliding_window = None if sliding_window is None else int(sliding_window)
    if attention_mask is not None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        raise RuntimeError(
            "the runner expects one packed row without a mask or cache; got a mask or a "
            f"batch of {query.shape[0]} (q_len {query.shape[2]}, kv_len {key.shape[2]})"
        )
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    layer = int(module.layer_idx)
    selected = layer in state.layers
    variant = {"softcap": softcap, "sinks": sinks, "sliding_window": sliding_window}
    if layer == state.stop_after:  # its attention output would not be used: none is computed
        if selected:
            state.sink(layer, query[0], key[0], scale, variant, None)
            state.captured.add(layer)
        raise StopForward
    out, lse = packed_causal_attention(
        query, key, value, state, scale, sliding_window, softcap, sinks,
        with_lse=selected and state.want_lse,
    )  # fmt: skip
    if selected:
        state.sink(layer, query[0], key[0], scale, variant, lse)
        state.captured.add(layer)
    return out, None


AttentionInterface.register(ATTN_IMPLEMENTATION, capture_attention_forward)
