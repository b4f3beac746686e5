"""Fused Triton span kernel: SPEC.md's per-head span, WAAD and FAI without the N x N matrix.

Contract
    Inputs: post-RoPE q [Hq, total_N, d] and k [Hkv, total_N, d] (bf16, fp16 or fp32;
    float64 is computed in fp32), Hq a multiple of Hkv (query head h reads kv head
    h // (Hq / Hkv)). Several sequences may be packed along the token axis: cu_seqlens [B+1]
    (cumulative lengths, 0 first, total_N last) and prompt_lens [B] (1 <= P_b < len_b). The
    mask is block-diagonal causal: a token attends only to earlier tokens of its sequence.
    Optionally the row LSE [Hq, total_N] of the layer's own attention (lse=..., natural log
    as torch's attention returns it), which turns on the one-pass path at h_hi = end.
    Output: PackedStats (float32): each sequence's span [Hq], and WAAD / FAI [Hq, n_resp]
    over the batch's response positions end to end; indexing it gives one SpanStats per
    sequence. Accumulation is fp32 throughout; the result is deterministic (no atomics).

Kernels (docs/KERNEL.md has the derivations, FLOP/byte counts and the AOT table)
    kernel_row.py  row pass: online softmax, span rows, WAAD, the row LSE (two-pass path)
    kernel_col.py  column pass: FAI from the row LSE (band, or to the end)
    kernel_lse.py  one-pass path with the LSE given: FAI and span columns in one causal
                   pass, and WAAD's row band
    tiles.py       the K-tile load, QK^T and soft-cap helpers they share; jitting per mode
    defaults.py    tiles per device (shared memory) and dtype
    plan.py        block tables per layout, launches, collecting the outputs
This module plans a call (cached per layout: a repeated layout plans nothing) and runs it.

Limits
    head dim <= 256 (padded to a power of two >= 16); block sizes powers of two >= 16.
    fp32 inputs use IEEE fp32 dot products (no TF32) on small tiles: a CPU/debug path.
    No host sync when cu_seqlens/prompt_lens are Python ints and check_finite=False;
    runtime integers are not specialised (no recompiles inside the service).

Tested on
    TRITON_INTERPRET=1 on CPU (fp32/bf16/fp16 inputs, N <= 512) against the float64
    reference, and compiled ahead of time for sm_80/86/89/90 under triton 3.6 and 3.9
    (bench/span_aot.py). NOT yet run on a GPU (bash bench/gpu_suite.sh --part kernel).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from anchorcredit.contract import DEFAULTS
from anchorcredit.engine.span import tiles
from anchorcredit.engine.span.checks import (
    check_attention_variant,
    check_finite_qk,
    check_horizon,
    check_lengths,
    check_qk_pair,
    check_scale,
)
from anchorcredit.engine.span.defaults import Blocks, default_blocks, device_for
from anchorcredit.engine.span.kernel_col import col_pass
from anchorcredit.engine.span.kernel_lse import lse_pass, waad_pass
from anchorcredit.engine.span.kernel_row import row_pass
from anchorcredit.engine.span.plan import FoldedFai, Launch, Plan, layout_for
from anchorcredit.engine.types import PackedStats

triton = tiles.triton
LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256

# Runtime integers that change between calls must not pick a new specialisation (a compile
# inside the service): Triton specialises an int argument equal to 1 or divisible by 16, and
# a pointer aligned to 16 bytes. Horizons, the GQA group and the sliding window vary per
# request or model; the block tables are slices of one int32 table at any offset; a given
# LSE's row stride is its total_N. The q/k strides stay specialised, their divisibility is
# what lets the loads vectorise (multiples of d, divisible by 16 for d = 64..256), and our
# outputs' row stride is total_N rounded up to 16.
TABLE_POINTERS = ("BLK_SEQ", "BLK_START", "CU", "BLK_INDEX", "OUT_SHIFT", "RESP_START")
DYNAMIC = {
    "row": ("group", "slide", "window", "near", "h_lo", "h_hi", "slots"),
    "col": ("group", "slide", "h_lo", "h_hi"),
    "lse": ("group", "slide", "h_lo", "h_hi", "stride_lh"),
    "waad": ("group", "slide", "window", "stride_lh"),
}
KERNEL_FUNCTIONS = {"row": row_pass, "col": col_pass, "lse": lse_pass, "waad": waad_pass}
_KERNELS: dict[bool, dict[str, Any]] = {}


def kernels() -> dict[str, Any]:
    """The four kernels jitted for the current interpreter mode (once per mode)."""
    mode = tiles.interpreting()
    if mode not in _KERNELS:
        _KERNELS[mode] = tiles.jit_family({
            name: (fn, {"do_not_specialize": DYNAMIC[name],
                        "do_not_specialize_on_alignment": TABLE_POINTERS})
            for name, fn in KERNEL_FUNCTIONS.items()
        })  # fmt: skip
    return _KERNELS[mode]


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError(
            "the triton span backend needs the `triton` package (pip install triton, Linux + "
            "CUDA); use backend='chunked' on machines without it"
        )


def _as_int_list(x: torch.Tensor | Sequence[int], name: str) -> list[int]:
    if isinstance(x, torch.Tensor):
        if x.dim() != 1 or x.is_floating_point():
            raise ValueError(f"{name} must be a 1-D integer tensor, got {x.dtype} {tuple(x.shape)}")
        return [int(v) for v in x.tolist()]
    return [int(v) for v in x]


def _check_packed(q: torch.Tensor, k: torch.Tensor, cu: list[int], prompts: list[int]) -> None:
    check_qk_pair(q, k)
    n, d = q.shape[1], q.shape[2]
    if d > MAX_HEAD_DIM:
        raise ValueError(f"head dim {d} > {MAX_HEAD_DIM} is not supported by the kernel")
    if len(cu) < 2 or cu[0] != 0 or cu[-1] != n:
        raise ValueError(f"cu_seqlens must start at 0 and end at total_N={n}, got {cu}")
    if len(prompts) != len(cu) - 1:
        raise ValueError(f"{len(prompts)} prompt lengths for {len(cu) - 1} sequences")
    for b, p in enumerate(prompts):
        try:
            check_lengths(cu[b + 1] - cu[b], p)
        except ValueError as err:
            raise ValueError(f"sequence {b}: {err}") from None


def _check_block(value: int, name: str) -> int:
    if value < 16 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 16, got {value}")
    return value


def _check_lse(lse: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    if not isinstance(lse, torch.Tensor) or not lse.is_floating_point():
        raise ValueError("lse must be a floating point tensor [Hq, total_N]")
    if tuple(lse.shape) != (q.shape[0], q.shape[1]):
        want = tuple(q.shape[:2])
        raise ValueError(f"lse must be [Hq, total_N] = {want}, got {tuple(lse.shape)}")
    if lse.device != q.device:
        raise ValueError(f"lse is on {lse.device}, q on {q.device}")
    lse = lse if lse.dtype == torch.float32 else lse.float()
    return lse if lse.stride(-1) == 1 else lse.contiguous()


# Plans per call signature (everything but the values of q, k, sinks and lse): a layer of a
# known batch reuses the checks, tiles, tables and launch options of the first. Each entry
# keeps its layout's tables alive (~8 bytes per token on the device and pinned on the host),
# and a batch needs one to three (the one-pass layers, the stop layer, a sliding-window kind).
_PLANS: OrderedDict[tuple, Any] = OrderedDict()
_PLANS_LOCK = threading.Lock()
PLAN_CACHE_SIZE = 16


def plan_packed(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens: torch.Tensor | Sequence[int],
    prompt_lens: torch.Tensor | Sequence[int],
    window: int = DEFAULTS.window,
    h_lo: int = DEFAULTS.h_lo,
    h_hi: int | None = DEFAULTS.h_hi,
    scale: float | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    col_block_m: int | None = None,
    col_block_n: int | None = None,
    check_finite: bool = True,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    sliding_window: int | None = None,
    gqa_pack: bool = False,
    capability: tuple[int, int] | None = None,
    band: str = "columns",
    lse: torch.Tensor | None = None,
    lse_base: str = "e",
    one_pass: bool | None = None,
) -> Plan:
    """Validate a call of span_stats_packed and prepare its launches (nothing runs yet).

    q and k may live on the CPU with the interpreter off: the AOT compile
    (bench/span_aot.py) plans GPU launches that way, for `capability` (major, minor); by
    default the launches are for the tensors' device, whose shared memory picks the tiles.

    lse [Hq, total_N]: the row log-sum-exp of the layer's own attention (the scaled,
    soft-capped scores, sinks included; natural log, or base 2 with lse_base="2"). With it
    and h_hi=None the call runs the one-pass path (kernel_lse.py: the triangle once instead
    of twice); one_pass=True takes that path at a finite h_hi too, False never.

    gqa_pack=True (off by default; untimed): the row pass runs one program per (query
    block, kv head) over the group's query heads stacked into one tile; block_m then counts
    positions per head (default: the unpacked tile's rows divided by the group).

    band (a finite h_hi only): "columns" (default) sums FAI's band in the column pass;
    "fold" in the row pass, into per-slot partial sums a few torch ops add up (FoldedFai).
    """
    _require_triton()
    cu = _as_int_list(cu_seqlens, "cu_seqlens")
    prompts = _as_int_list(prompt_lens, "prompt_lens")
    softcap, sinks, sliding_window = check_attention_variant(
        softcap, sinks, sliding_window, q, check_finite=check_finite
    )
    check_qk_pair(q, k)
    if q.dtype == torch.float64:  # the kernel computes in fp32
        q, k = q.float(), k.float()
        if not bool(torch.isfinite(q).all()) or not bool(torch.isfinite(k).all()):
            raise ValueError("q and k overflow float32, the kernel's precision")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if check_finite:
        check_finite_qk(q, k)
    if lse is not None:
        lse = _check_lse(lse, q)
    if lse_base not in ("e", "2"):
        raise ValueError(f"lse_base must be 'e' or '2', got {lse_base!r}")
    options = (
        block_m,
        block_n,
        num_warps,
        num_stages,
        col_block_m,
        col_block_n,
        gqa_pack,
        band,
        one_pass,
        lse_base,
        None if capability is None else tuple(capability),
    )
    stream = torch.cuda.current_stream(q.device).cuda_stream if q.device.type == "cuda" else 0
    key = (str(q.device), stream, tiles.interpreting(), tuple(q.shape), tuple(k.shape),
           q.dtype, q.stride(), k.stride(), tuple(cu), tuple(prompts), window, h_lo, h_hi,
           scale, softcap, sinks is None, sliding_window, None if lse is None else lse.stride(0),
           options)  # fmt: skip
    with _PLANS_LOCK:
        template = _PLANS.get(key)
        if template is not None:
            _PLANS.move_to_end(key)
    if template is None:
        template = _template(q, k, cu, prompts, window, h_lo, h_hi, scale, softcap,
                             sinks is not None, sliding_window, lse is not None,
                             *options)  # fmt: skip
        with _PLANS_LOCK:
            _PLANS[key] = template
            while len(_PLANS) > PLAN_CACHE_SIZE:
                _PLANS.popitem(last=False)
    return template(q, k, sinks, lse)


def _template(q, k, cu, prompts, window, h_lo, h_hi, scale, softcap, has_sink, sliding_window,
              has_lse, block_m, block_n, num_warps, num_stages, col_block_m, col_block_n,
              gqa_pack, band, one_pass, lse_base, capability):  # fmt: skip
    """Everything about a call that its tensors' values do not change, checked; returns
    make(q, k, sinks, lse) -> Plan, which allocates the outputs and binds the launches."""
    _check_packed(q, k, cu, prompts)
    check_horizon(window, h_lo, h_hi)
    scale = check_scale(scale, q.shape[-1])
    # Distances never exceed the longest sequence, so clamping the horizon there changes no
    # number and keeps the kernel's int32 index arithmetic (s + h_hi, ...) from wrapping.
    longest = max(b - a for a, b in zip(cu[:-1], cu[1:], strict=True))
    window, h_lo = min(int(window), longest), min(int(h_lo), longest)
    h_hi = None if h_hi is None else min(int(h_hi), longest)
    if sliding_window is not None and sliding_window >= longest:
        sliding_window = None  # every window holds its whole sequence: plain causal
    if band not in ("columns", "fold"):
        raise ValueError(f"band must be 'columns' or 'fold', got {band!r}")
    fold = band == "fold"
    one = has_lse and h_hi is None if one_pass is None else bool(one_pass)
    if one and not has_lse:
        raise ValueError("one_pass=True needs the row LSE of the layer's attention (lse=...)")
    if fold and h_hi is None:
        raise ValueError(
            "band='fold' needs a finite h_hi: the horizon to the end runs the column pass"
        )
    hq, n, d = q.shape
    group = hq // k.shape[0]
    pack = triton.next_power_of_2(group) if gqa_pack else 1
    if (fold or pack > 1) and one:
        raise ValueError("band='fold' and gqa_pack=True are options of the two-pass path")
    if fold and pack > 1:
        raise ValueError("band='fold' does not combine with gqa_pack=True")
    block_d = max(16, triton.next_power_of_2(d))
    dev = device_for(capability, None if capability is not None else q.device)
    interpreting = tiles.interpreting()
    kinds = ("waad", "lse") if one else ("row", "band" if h_hi is not None else "col")
    row_cfg, col_cfg = (default_blocks(kd, q.dtype, block_d, dev, interpreting) for kd in kinds)
    if block_m or block_n or num_warps or num_stages:  # explicit options set both passes
        row_cfg = col_cfg = Blocks(
            _check_block(block_m or row_cfg.block_m, "block_m"),
            _check_block(block_n or row_cfg.block_n, "block_n"),
            num_warps or row_cfg.num_warps,
            num_stages or row_cfg.num_stages,
        )
    if col_block_m or col_block_n:
        col_cfg = replace(
            col_cfg,
            block_m=_check_block(col_block_m or col_cfg.block_m, "col_block_m"),
            block_n=_check_block(col_block_n or col_cfg.block_n, "col_block_n"),
        )
    if pack > 1 and not block_m:  # keep the stacked tile at the unpacked tile's rows
        row_cfg = replace(row_cfg, block_m=max(16, row_cfg.block_m // pack))
    lay = layout_for(cu, prompts, row_cfg.block_m, col_cfg.block_n, col_cfg.block_n,
                     h_hi is None, q.device)  # fmt: skip

    qk_scale = scale * LOG2E  # softmax in base 2: exp(x * scale) = exp2(x * scale * log2 e)
    cap_in = cap_out = 1.0
    if softcap is not None:  # base-2 logits cap * log2 e * tanh(x * scale / cap)
        cap_in, cap_out, qk_scale = scale / softcap, softcap * LOG2E, 1.0
    slide = 0 if sliding_window is None else int(sliding_window)
    hi = 0 if h_hi is None else int(h_hi)
    # Triton 3.9's interpreter multiplies bf16 tiles wrongly; it gets exact fp32 copies.
    shared = {"BLOCK_D": block_d, "UPCAST": interpreting and q.dtype == torch.bfloat16,
              "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",  # 16-bit: unused
              "SOFTCAP": softcap is not None, "HAS_SLIDE": sliding_window is not None}  # fmt: skip

    def options(cfg: Blocks, **extra: Any) -> dict[str, Any]:
        # FMA contraction on explicitly (it is what `s * scale - m` is written for).
        return {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, **shared, **extra,
                "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                "enable_fp_fusion": True}  # fmt: skip

    ks = kernels()
    width = -(-n // 16) * 16  # output row stride: a multiple of 16 for every total_N
    tables = (lay.cu, lay.out_shift)
    row_grid = (lay.row_seq.shape[0], hq // group if pack > 1 else hq)

    if one:
        waad_opts = options(row_cfg, HAS_SINK=has_sink)
        lse_opts = options(col_cfg, HAS_HI=h_hi is not None)
        lse_scale = LOG2E if lse_base == "e" else 1.0

        def make(q, k, sinks, lse) -> Plan:
            span_col, waad, fai = torch.empty(3, hq, width, device=q.device).unbind(0)
            strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), width)
            sinks2 = lse if sinks is None else (sinks.float() * LOG2E).contiguous()
            waad_launch = Launch(ks["waad"], row_grid, (
                q, k, lse, waad, lay.row_seq, lay.row_start, lay.cu, sinks2, lay.out_shift,
                *strides, lse.stride(0), qk_scale, lse_scale, group, d, window, cap_in,
                cap_out, slide), waad_opts)  # fmt: skip
            lse_launch = Launch(ks["lse"], (lay.all_seq.shape[0], hq), (
                q, k, lse, span_col, fai, lay.all_seq, lay.all_start, *tables[:1],
                lay.resp_start, lay.out_shift, *strides, width, lse.stride(0), qk_scale,
                lse_scale, group, d, h_lo, hi, cap_in, cap_out, slide), lse_opts)  # fmt: skip
            return Plan((waad_launch, lse_launch), lay, True, lse, span_col, waad, fai)

        return make

    row_opts = options(row_cfg, HAS_SINK=has_sink)
    if pack > 1:  # passed only when packing: the default launch binds exactly as before
        row_opts["GQA_PACK"] = pack
    slots = 1 + -(-(hi - h_lo) // row_cfg.block_m) if fold else 1
    if fold:
        row_opts["FOLD_BAND"] = True
    col_opts = options(col_cfg, HAS_HI=h_hi is not None)

    def make(q, k, sinks, lse) -> Plan:
        lse2, span_row, waad, fai = torch.empty(4, hq, width, device=q.device).unbind(0)
        strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), width, width)
        # Sink logits in base 2 (fp32, one per q head); the LSE buffer stands in when absent.
        sinks2 = lse2 if sinks is None else (sinks.float() * LOG2E).contiguous()
        if fold:  # per-slot column sums; the row stride padded like the outputs'
            part = torch.zeros(hq, slots, width, device=q.device)
            fold_args = (part, lay.row_index, part.stride(0), part.stride(1), h_lo, hi, slots)
        else:  # unused: stand-ins that bind the same way
            fold_args = (lse2, lay.row_index, width, width, h_lo, hi, 1)
        row = Launch(ks["row"], row_grid, (
            q, k, lse2, span_row, waad, lay.row_seq, lay.row_start, lay.cu, sinks2,
            lay.out_shift, *strides, qk_scale, group, d, window, max(window, 1), cap_in,
            cap_out, slide, *fold_args), row_opts)  # fmt: skip
        if fold:
            col = FoldedFai(part, lay, h_lo, hi, fai)
        else:
            col = Launch(ks["col"], (lay.col_seq.shape[0], hq), (
                q, k, lse2, fai, lay.col_seq, lay.col_start, *tables, *strides, qk_scale,
                group, d, h_lo, hi, cap_in, cap_out, slide), col_opts)  # fmt: skip
        return Plan((row, col), lay, False, lse2, span_row, waad, fai)

    return make


def span_stats_packed(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens: torch.Tensor | Sequence[int],
    prompt_lens: torch.Tensor | Sequence[int],
    window: int = DEFAULTS.window,
    h_lo: int = DEFAULTS.h_lo,
    h_hi: int | None = DEFAULTS.h_hi,
    scale: float | None = None,
    **options: Any,
) -> PackedStats:
    """SPEC.md span/WAAD/FAI for every sequence of a packed batch (PackedStats; indexing it
    gives one SpanStats per sequence).

    q [Hq, total_N, d], k [Hkv, total_N, d]; sequence b occupies tokens
    cu_seqlens[b]:cu_seqlens[b+1] with its first prompt_lens[b] tokens the prompt.
    Keyword options (plan_packed): block_m, block_n, num_warps, num_stages (both passes;
    powers of two >= 16), col_block_m, col_block_n (the column pass alone), default per
    device (defaults.py); check_finite=False skips the NaN/inf scan of q, k and sinks (a
    full read and a device sync each) for inputs straight from a model forward (the
    runner); softcap / sinks [Hq] / sliding_window: the layer's attention as the model
    computes it (None = plain causal softmax); lse [Hq, total_N]: the layer's own row LSE
    (one-pass path at h_hi=None); gqa_pack, band: two-pass options (plan_packed).
    """
    _require_triton()
    if q.device.type != "cuda" and not tiles.interpreting():
        raise RuntimeError(
            f"the triton span kernel needs CUDA tensors (got {q.device}); set "
            "TRITON_INTERPRET=1 before the first call to run it on CPU, or use backend='chunked'"
        )
    plan = plan_packed(q, k, cu_seqlens, prompt_lens, window, h_lo, h_hi, scale, **options)
    plan.run()
    return plan.collect()


def span_stats_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    prompt_len: int,
    window: int,
    h_lo: int,
    h_hi: int | None,
    scale: float,
    **variant: Any,
):
    """One sequence through the packed kernel (the engine front's `backend="triton"`, which
    has already validated the arguments and scanned q and k for NaN/inf). variant: softcap,
    sinks, sliding_window."""
    cu, prompts = [0, q.shape[1]], [prompt_len]
    return span_stats_packed(
        q, k, cu, prompts, window, h_lo, h_hi, scale, check_finite=False, **variant
    )[0]
