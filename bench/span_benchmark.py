"""The span statistics' benchmark: every backend side by side, one table per device.

    python bench/span_benchmark.py                                  # CPU table (+ CUDA if present)
    python bench/span_benchmark.py --device cuda --h-hi 100 end --lse   # GPU: Qwen3-8B heads
    python bench/span_benchmark.py --device cuda --batch 512 --n 1024 --prompt-frac 0.25 --lse
    python bench/span_benchmark.py --device cpu --n 1024 2048 4096 8192

In the spirit of the Triton fused-attention tutorial's perf_report: for each N (and each
horizon) one row per backend that runs on the device, with its time (CUDA: the median of
--repeats do_bench medians, and their spread, (max - min) / median), its peak extra memory,
both as ratios against a baseline measured in the same run on the same inputs, the time
against FlashAttention-2, and the max relative error of its statistics against the float64
reference (for N <= --err-max-n; '-' above it):

    device  baseline                              rows
    cpu     reference (materialised attention)    reference, chunked [, triton under
                                                  TRITON_INTERPRET=1 with --interpret]
    cuda    the fastest SDPA backend of the run   sdpa_flash, sdpa_cudnn, sdpa_efficient,
            (cuDNN attention on Hopper, flash     fa2, triton, triton_kernel [, triton_lse,
            elsewhere), causal, k/v expanded      triton_kernel_lse], chunked, eager
    cuda,   torch's varlen flash attention (the   varlen, fa2, triton, triton_kernel [, ...]
    --batch the runner's own attention call)
    B > 1

Two kinds of triton rows, judged apart (bench/gpu_targets.py): `triton*` is the whole call
as the runner makes it (the engine's packed front: planning, cached tables, outputs, the
span reduction), `triton_kernel*` the launches alone on a prepared plan; the difference is
the host's share. `_lse` rows are the one-pass path with the layer's row LSE given (the
runner has it at every selected layer but the last; at a finite h_hi with one_pass=True):
the LSE is the row pass's own, computed before the timing, as the model's attention
computes it before the statistics. --gqa-pack adds `triton_gqa` / `triton_kernel_gqa`
(the row pass's GQA group packed), --band-fold `triton_fold` / `triton_kernel_fold`
(FAI's band summed in the row pass). `fa2` is flash_attn (flash_attn_func, or its varlen
function for a batch) where installed, else the FA2 column reads PyTorch's FlashAttention-2
(sdpa_flash, or varlen). `eager` is the materialised fp32 attention reduced with
vectorised diagonals, what the paper's extra `output_attentions` pass does. The error is
max over span, WAAD and FAI of max |got - ref| / max |ref| (each statistic relative to its
own scale), ref the float64 reference on the same (rounded) inputs; for a batch over its
first four sequences.

Measurement. CPU: each (backend, N) runs in a fresh process, median of --reps calls after a
small warm-up, peak memory = ru_maxrss after the calls minus the resident size before them.
CUDA: triton.testing.do_bench medians, peak memory = torch.cuda.max_memory_allocated during
one call minus the memory allocated before. Rows print one N at a time, so a run cut short
still reports the sizes it finished; with --budget-s, rows after the budget is spent are
timed once instead of --repeats times (no size is dropped).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from anchorcredit.contract import DEFAULTS, H_HI_END, parse_h_hi
from anchorcredit.engine.span import span_stats_packed
from anchorcredit.engine.span.reference import max_relative_error, span_stats_reference
from anchorcredit.engine.types import PackedStats, SpanStats

MIB = 1 << 20
LOG2E = 1.4426950408889634
COLUMNS = (
    "N", "h_hi", "backend", "ms", "spread %", "peak MiB", "time x base", "memory x base",
    "time x fa2", "max rel err",
)  # fmt: skip
# The baseline per device: CPU the reference; CUDA the fastest SDPA backend of the run.
BASELINE = {"cpu": "reference", "cuda": "fastest sdpa_* (a batch: varlen)"}
SDPA = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION",
        "sdpa_efficient": "EFFICIENT_ATTENTION"}  # fmt: skip
ATTENTION = (*SDPA, "varlen", "fa2")  # rows that do not depend on the horizon
# Per device: sizes and shapes when the flags leave them out (CUDA: Qwen3-8B's heads).
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {"n": [1024, 2048, 4096], "heads": 4, "kv_heads": 2, "head_dim": 64,
            "dtype": "float32"},
    "cuda": {"n": [1024, 4096, 8192, 16384, 32768], "heads": 32, "kv_heads": 8,
             "head_dim": 128, "dtype": "bfloat16"},
}  # fmt: skip
LAUNCH_OPTIONS = ("block_m", "block_n", "num_warps", "num_stages", "col_block_m", "col_block_n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python bench/span_benchmark.py",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_shape_arguments(ap)
    _add_run_arguments(ap)
    ap.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # CPU: one measurement
    for name in LAUNCH_OPTIONS:
        ap.add_argument(
            f"--{name.replace('_', '-')}", type=int, default=None, help="CUDA: kernel launch option"
        )
    args = ap.parse_args(argv)
    args.h_hi = [parse_h_hi(h) for h in args.h_hi]
    return args  # fmt: skip


def _add_shape_arguments(ap: argparse.ArgumentParser) -> None:
    """What is measured: devices, sizes, dtype and the span parameters."""
    ap.add_argument(
        "--device",
        nargs="+",
        choices=["cpu", "cuda"],
        default=["cpu", "cuda"],
        help="a table per device; cuda is skipped with a note when absent",
    )
    ap.add_argument(
        "--n",
        type=int,
        nargs="+",
        default=None,
        help="sequence lengths (default cpu: 1K..4K, cuda: 1K..32K)",
    )
    ap.add_argument(
        "--batch",
        type=int,
        default=1,
        help="sequences of N tokens packed end to end (the runner's layout)",
    )
    ap.add_argument("--heads", type=int, default=None, help="query heads (cpu 4, cuda 32)")
    ap.add_argument("--kv-heads", type=int, default=None, help="kv heads (cpu 2, cuda 8)")
    ap.add_argument("--head-dim", type=int, default=None, help="head dim (cpu 64, cuda 128)")
    ap.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="q/k dtype (cpu float32, cuda bfloat16)",
    )
    ap.add_argument(
        "--prompt-frac",
        type=float,
        default=0.0,
        help="prompt share of N (0: a 1-token prompt, so the work matches SDPA's)",
    )
    ap.add_argument("--window", type=int, default=DEFAULTS.window)
    ap.add_argument("--h-lo", type=int, default=DEFAULTS.h_lo)
    ap.add_argument(
        "--h-hi",
        nargs="+",
        default=[str(DEFAULTS.h_hi)],
        help=f"one or more horizons: an int or '{H_HI_END}'",
    )


def _add_run_arguments(ap: argparse.ArgumentParser) -> None:
    """How it is measured: repetitions, budgets and which rows."""
    ap.add_argument(
        "--err-max-n",
        type=int,
        default=2048,
        help="measure the error against float64 for N up to this",
    )
    ap.add_argument("--reps", type=int, default=3, help="CPU: calls per measurement (median)")
    ap.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="CUDA: do_bench runs per row (the median of their medians; spread)",
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="CUDA: once the run took this long, time the remaining rows once",
    )
    ap.add_argument("--threads", type=int, default=2, help="CPU: torch threads")
    ap.add_argument(
        "--interpret",
        action="store_true",
        help="CPU: add the triton kernel under TRITON_INTERPRET=1 (slow; error only)",
    )
    ap.add_argument("--no-eager", action="store_true", help="CUDA: skip the eager row")
    ap.add_argument(
        "--backends",
        nargs="+",
        default=None,
        help="CUDA: only these rows (e.g. triton triton_kernel for a tile sweep)",
    )
    ap.add_argument(
        "--lse",
        action="store_true",
        help="CUDA: add triton_lse / triton_kernel_lse (the one-pass path, LSE given)",
    )
    ap.add_argument(
        "--gqa-pack",
        action="store_true",
        help="CUDA: add triton_gqa / triton_kernel_gqa (GQA-packed row pass)",
    )
    ap.add_argument(
        "--band-fold",
        action="store_true",
        help="CUDA: add triton_fold / triton_kernel_fold (band='fold', finite h_hi)",
    )


# -- shared pieces --------------------------------------------------------------------------


def make_qk(hq: int, hkv: int, n: int, d: int, dtype: torch.dtype, device: str):
    gen = torch.Generator(device=device).manual_seed(n)
    q = torch.randn(hq, n, d, generator=gen, device=device, dtype=dtype)
    k = torch.randn(hkv, n, d, generator=gen, device=device, dtype=dtype)
    return q, k


def layout(cfg: dict[str, Any], n: int, batch: int) -> tuple[list[int], list[int]]:
    """cu_seqlens and prompt lengths of `batch` sequences of n tokens."""
    prompt = min(n - 1, max(1, int(cfg["prompt_frac"] * n)))
    return [i * n for i in range(batch + 1)], [prompt] * batch


def max_rel_err(got: SpanStats, ref: SpanStats) -> float:
    """Max over span, WAAD, FAI of max |got - ref| / max |ref| (reference.max_relative_error)."""
    return max_relative_error(got, ref)


def float64_reference(q, k, prompt_len: int, cfg: dict[str, Any], h_hi) -> SpanStats:
    scale = q.shape[-1] ** -0.5
    return span_stats_reference(
        q.double(), k.double(), prompt_len, cfg["window"], cfg["h_lo"], h_hi, scale
    )


def eager_stats(q, k, prompt_len, window, h_lo, h_hi, scale) -> SpanStats:
    """SPEC.md statistics from the materialised fp32 attention (the paper's eager pass)."""
    hq, n, _ = q.shape
    kk = k.repeat_interleave(hq // k.shape[0], dim=0).float()
    scores = torch.matmul(q.float(), kk.transpose(1, 2)).mul_(scale)  # fp32, as the kernel
    future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu_(1)
    attn = scores.masked_fill_(future, float("-inf")).softmax(-1)
    del scores
    pos = torch.arange(n, device=q.device, dtype=torch.float32)
    span = (pos[prompt_len:] - attn[:, prompt_len:] @ pos).mean(-1)
    waad = torch.full((hq, n - prompt_len), float(window), device=q.device)
    for d in range(min(window, n)):  # A[t, t-d] for t >= max(d, P)
        diag = attn.diagonal(offset=-d, dim1=1, dim2=2)
        t0 = max(d, prompt_len)
        waad[:, t0 - prompt_len :] -= (window - d) * diag[:, t0 - d :]
    r = n - prompt_len
    fai = torch.zeros(hq, r, device=q.device)
    if h_hi is None:
        fai = attn.tril_(-h_lo)[:, prompt_len:, prompt_len:].sum(1)
    else:
        for o in range(h_lo, min(h_hi, n - 1) + 1):  # A[s+o, s] for s >= P
            diag = attn.diagonal(offset=-o, dim1=1, dim2=2)[:, prompt_len:]
            fai[:, : diag.shape[1]] += diag
    s = torch.arange(prompt_len, n, device=q.device)
    last = torch.full_like(s, n - 1) if h_hi is None else (s + h_hi).clamp(max=n - 1)
    count = (last - s - h_lo + 1).clamp(min=0)
    fai = torch.where(count > 0, fai / count.clamp(min=1), torch.zeros_like(fai))
    return SpanStats(span=span, waad=waad, fai=fai)


def row_lse(q, k, cu, prompts, horizon) -> torch.Tensor:
    """The row LSE (natural log) the one-pass rows are given, from the row pass itself."""
    from anchorcredit.engine.span import triton_kernel

    plan = triton_kernel.plan_packed(q, k, cu, prompts, *horizon, check_finite=False)
    plan.run()
    return (plan.lse[:, : q.shape[1]] / LOG2E).contiguous()


def stats_fn(
    backend: str, q, k, cu: list[int], prompts: list[int], cfg: dict[str, Any], h_hi
) -> Callable[[], Any]:
    """A no-argument call of `backend` on the packed batch, as the runner would make it."""
    scale = q.shape[-1] ** -0.5
    horizon = (cfg["window"], cfg["h_lo"], h_hi, scale)
    launch: dict[str, Any] = {o: cfg.get(o) for o in LAUNCH_OPTIONS}
    suffix = backend.split("_", 2)[-1] if backend.count("_") else ""
    base = backend.removesuffix("_" + suffix) if suffix in ("gqa", "fold", "lse") else backend
    if suffix == "gqa":
        launch["gqa_pack"] = True
    elif suffix == "fold":
        launch["band"] = "fold"
    if base == "triton":  # the whole call, as the runner makes it (the engine's front)
        lse = row_lse(q, k, cu, prompts, horizon) if suffix == "lse" else None
        if suffix in ("gqa", "fold") or any(launch[o] for o in LAUNCH_OPTIONS):
            from anchorcredit.engine.span import triton_kernel

            return lambda: triton_kernel.span_stats_packed(
                q, k, cu, prompts, *horizon, check_finite=False, lse=lse, **launch
            )
        if suffix == "lse" and h_hi is not None:  # the one-pass path at a finite horizon
            from anchorcredit.engine.span import triton_kernel

            return lambda: triton_kernel.span_stats_packed(
                q, k, cu, prompts, *horizon, check_finite=False, lse=lse, one_pass=True
            )
        return lambda: span_stats_packed(q, k, cu, prompts, *horizon, "triton", lse=lse)
    if base == "triton_kernel":  # the launches alone, on a prepared plan
        from anchorcredit.engine.span import triton_kernel

        if suffix == "lse":
            launch.update(lse=row_lse(q, k, cu, prompts, horizon), one_pass=True)
        plan = triton_kernel.plan_packed(q, k, cu, prompts, *horizon, check_finite=False,
                                         **launch)  # fmt: skip
        return plan.run
    if backend == "eager":
        return lambda: eager_stats(q, k, prompts[0], *horizon)
    if backend in ("fa2", "varlen"):
        return _flash(backend, q, k, cu)
    if backend in SDPA:
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        hq = q.shape[0]
        qs = q.unsqueeze(0)
        ks = k.repeat_interleave(hq // k.shape[0], dim=0).unsqueeze(0)
        vs = torch.randn_like(ks)
        which = getattr(SDPBackend, SDPA[backend])

        def sdpa():
            with sdpa_kernel(which):  # errors out rather than fall back
                return F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)

        return sdpa
    return lambda: span_stats_packed(q, k, cu, prompts, *horizon, backend=backend)


def _flash(backend: str, q, k, cu: list[int]) -> Callable[[], Any]:
    """FlashAttention-2's forward over the packed batch: flash_attn's (fa2) or torch's
    varlen flash attention (varlen, the runner's own attention call)."""
    qf, kf = q.transpose(0, 1).contiguous(), k.transpose(0, 1).contiguous()  # [T, H, d]
    vf = torch.randn_like(kf)
    longest = max(b - a for a, b in zip(cu[:-1], cu[1:], strict=True))
    cu_t = torch.tensor(cu, dtype=torch.int32, device=q.device)
    if backend == "varlen":
        from torch.nn.attention.varlen import varlen_attn

        gqa = k.shape[0] != q.shape[0]
        return lambda: varlen_attn(qf, kf, vf, cu_t, cu_t, longest, longest,
                                   window_size=(-1, 0), enable_gqa=gqa)  # fmt: skip
    if len(cu) == 2:
        from flash_attn import flash_attn_func  # GQA native: k/v keep their Hkv heads

        return lambda: flash_attn_func(qf[None], kf[None], vf[None], causal=True)
    from flash_attn import flash_attn_varlen_func

    return lambda: flash_attn_varlen_func(qf, kf, vf, cu_t, cu_t, longest, longest, causal=True)


# -- CPU: one fresh process per measurement --------------------------------------------------


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


def cpu_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Run in a fresh process: time, peak extra memory and error of one (backend, N)."""
    if spec["backend"] == "triton":
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel is jitted, on first use
    torch.set_num_threads(spec["threads"])
    n, dtype, h_hi = spec["n"], getattr(torch, spec["dtype"]), spec["h_hi_one"]
    q, k = make_qk(spec["heads"], spec["kv_heads"], n, spec["head_dim"], dtype, "cpu")
    cu, prompts = layout(spec, n, 1)
    w = min(n, 128)  # warm-up on a prefix: kernels and allocator, not the peak
    stats_fn(spec["backend"], q[:, :w], k[:, :w], [0, w], [min(prompts[0], w - 1)], spec, h_hi)()
    call = stats_fn(spec["backend"], q, k, cu, prompts, spec, h_hi)
    before = _rss_kib()
    times = []
    for _ in range(spec["reps"]):
        t = time.perf_counter()
        got = call()
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    out: dict[str, Any] = {
        "ms": 1e3 * sorted(times)[len(times) // 2],
        "mib": max(0.0, (peak - before) / 1024),  # RSS can shrink below `before`
        "err": None,
    }
    if n <= spec["err_max_n"]:
        out["err"] = max_rel_err(got[0], float64_reference(q, k, prompts[0], spec, h_hi))
    return out


def _run_probe(spec: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--probe", json.dumps(spec)],
        capture_output=True, text=True,
    )  # fmt: skip
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines() or [f"exit {out.returncode}"]
        return {"error": lines[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_cpu(args: argparse.Namespace, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    backends = ["reference", "chunked"] + (["triton"] if args.interpret else [])
    rows = []
    for h_hi in args.h_hi:
        for n in cfg["n"]:
            for backend in backends:
                spec = {**cfg, "backend": backend, "n": n, "h_hi_one": h_hi}
                rows.append({"n": n, "h_hi": h_hi, "backend": backend, **_run_probe(spec)})
    return rows


# -- CUDA: in process, do_bench and the caching allocator's peak -----------------------------


def cuda_backends(args: argparse.Namespace, h_hi, batch: int) -> list[str]:
    """The rows of one (N, horizon), in table order."""
    triton = ["triton", "triton_kernel"]
    if args.lse:
        triton += ["triton_lse", "triton_kernel_lse"]
    if args.gqa_pack:
        triton += ["triton_gqa", "triton_kernel_gqa"]
    if args.band_fold and h_hi is not None:
        triton += ["triton_fold", "triton_kernel_fold"]
    flash = ["fa2"] if importlib.util.find_spec("flash_attn") is not None else []
    if batch > 1:
        rows = ["varlen", *flash, *triton]
    else:
        rows = [*SDPA, *flash, *triton, "chunked"] + ([] if args.no_eager else ["eager"])
    if args.backends:
        rows = [b for b in rows if b in args.backends]
    return rows


def time_call(call: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """(median of `repeats` do_bench medians in ms, their spread (max - min) / median)."""
    from triton.testing import do_bench

    runs = [do_bench(call, return_mode="median") for _ in range(max(1, repeats))]
    mid = statistics.median(runs)
    return mid, (max(runs) - min(runs)) / mid if mid > 0 else 0.0


def bench_cuda(
    args: argparse.Namespace,
    cfg: dict[str, Any],
    on_size: Callable[[list[dict]], None] | None = None,
) -> list[dict[str, Any]]:
    """The CUDA rows; on_size(rows of one N) after each N, so a run cut short by a time
    limit still leaves the sizes it finished."""
    dtype = getattr(torch, cfg["dtype"])
    batch = cfg["batch"]
    started = time.perf_counter()
    rows = []
    for n in cfg["n"]:
        q, k = make_qk(cfg["heads"], cfg["kv_heads"], n * batch, cfg["head_dim"], dtype, "cuda")
        cu, prompts = layout(cfg, n, batch)
        checked = min(batch, 4)  # the error over the first sequences of a batch
        size_rows, shared = [], {}
        for h_hi in args.h_hi:
            refs = None
            if n <= cfg["err_max_n"]:
                refs = [
                    float64_reference(q[:, a:e], k[:, a:e], prompts[b], cfg, h_hi)
                    for b, (a, e) in enumerate(zip(cu[:checked], cu[1 : checked + 1], strict=True))
                ]
            backends = cuda_backends(args, h_hi, batch)
            eager_bytes = 12 * cfg["heads"] * n * n  # 16-bit scores, fp32 attention, a temporary
            if "eager" in backends and eager_bytes >= 0.8 * torch.cuda.mem_get_info()[0]:
                backends.remove("eager")
            for backend in backends:
                if backend in ATTENTION and backend in shared:  # horizon-free: timed once
                    size_rows.append({**shared[backend], "h_hi": h_hi})
                    continue
                repeats = cfg["repeats"]
                if args.budget_s is not None and time.perf_counter() - started > args.budget_s:
                    repeats = 1
                row = _measure(backend, q, k, cu, prompts, cfg, h_hi, refs, repeats)
                row.update(n=n, h_hi=h_hi, backend=backend, batch=batch)
                if backend in ATTENTION:
                    shared[backend] = row
                size_rows.append(row)
                torch.cuda.empty_cache()
        rows += size_rows
        del q, k
        torch.cuda.empty_cache()
        if on_size is not None:
            on_size(size_rows)
    return rows


def _measure(backend, q, k, cu, prompts, cfg, h_hi, refs, repeats) -> dict[str, Any]:
    from anchorcredit.engine.span import fallback

    row: dict[str, Any] = {"err": None}
    try:
        fell_back = fallback.total()
        call = stats_fn(backend, q, k, cu, prompts, cfg, h_hi)
        got = call()  # compiles / warms up outside the timing
        torch.cuda.synchronize()
        if fallback.total() != fell_back:  # the front answered with the chunked backend
            return {"error": "triton failed: the call fell back to chunked"}
        if refs is not None and isinstance(got, PackedStats):
            row["err"] = max(max_rel_err(got[b], ref) for b, ref in enumerate(refs))
        elif refs is not None and isinstance(got, SpanStats):
            row["err"] = max_rel_err(got, refs[0])
        del got
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call()
        torch.cuda.synchronize()
        row["mib"] = (torch.cuda.max_memory_allocated() - base) / MIB
        row["ms"], row["spread"] = time_call(call, repeats)
    except torch.cuda.OutOfMemoryError:
        row = {"error": "out of memory"}
    except RuntimeError as err:  # an SDPA backend this card or shape does not have
        row = {"error": str(err).splitlines()[0][:60]}
    return row


# -- the table -------------------------------------------------------------------------------


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def baseline_rows(rows: list[dict[str, Any]], device: str) -> dict[tuple, dict[str, Any]]:
    """The baseline row per (N, horizon): the reference on the CPU, the fastest SDPA backend
    on CUDA (torch's varlen flash attention for a batch)."""
    ok = [r for r in rows if "error" not in r]
    if device == "cpu":
        return {(r["n"], r.get("h_hi")): r for r in ok if r["backend"] == "reference"}
    base: dict[tuple, dict[str, Any]] = {}
    for r in ok:
        key = (r["n"], r.get("h_hi"))
        if r["backend"] in (*SDPA, "varlen") and (key not in base or r["ms"] < base[key]["ms"]):
            base[key] = r
    return base


def fa2_rows(rows: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """FlashAttention-2's forward per (N, horizon): flash_attn's `fa2` row where it ran, else
    PyTorch's FlashAttention-2 (sdpa_flash, or varlen for a batch), so the column is filled
    on machines without the flash_attn package."""
    ok = [r for r in rows if "error" not in r]
    out = {(r["n"], r.get("h_hi")): r for r in ok if r["backend"] in ("sdpa_flash", "varlen")}
    out.update({(r["n"], r.get("h_hi")): r for r in ok if r["backend"] == "fa2"})
    return out


def size_label(r: dict[str, Any]) -> str:
    return f"{r['batch']}x{r['n']}" if r.get("batch", 1) > 1 else str(r["n"])


def table(rows: list[dict[str, Any]], device: str) -> list[str]:
    """Markdown lines: one row per (N, horizon, backend), ratios against the device's
    baseline and FlashAttention-2 at the same N; the baseline row's name gets '(base)'."""
    base = baseline_rows(rows, device)
    fa2 = fa2_rows(rows)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---:|---|---|" + "---:|" * (len(COLUMNS) - 3)]
    for r in rows:
        h_hi = H_HI_END if r.get("h_hi", "-") is None else str(r.get("h_hi", "-"))
        if "error" in r:
            cells = [size_label(r), h_hi, r["backend"], r["error"], *["-"] * (len(COLUMNS) - 4)]
            lines.append("| " + " | ".join(cells) + " |")
            continue
        key = (r["n"], r.get("h_hi"))
        b, f = base.get(key), fa2.get(key)
        name = r["backend"] + (" (base)" if b is r and device == "cuda" else "")
        t_ratio = r["ms"] / b["ms"] if b else None
        m_ratio = r["mib"] / max(b["mib"], 1.0) if b else None
        f_ratio = r["ms"] / f["ms"] if f else None
        spread = r.get("spread")
        lines.append(
            f"| {size_label(r)} | {h_hi} | {name} | {r['ms']:.3f} | "
            f"{_fmt(None if spread is None else 100 * spread, '.1f')} | {r['mib']:.0f} | "
            f"{_fmt(t_ratio, '.2f')} | {_fmt(m_ratio, '.2f')} | {_fmt(f_ratio, '.2f')} | "
            f"{_fmt(r['err'], '.1e')} |"
        )
    return lines


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} cores"


def config_for(device: str, args: argparse.Namespace) -> dict[str, Any]:
    preset = PRESETS[device]
    cfg = {name: getattr(args, name) or preset[name] for name in preset}
    cfg.update({o: getattr(args, o) for o in LAUNCH_OPTIONS})
    cfg.update(
        window=args.window, h_lo=args.h_lo, err_max_n=args.err_max_n, reps=args.reps,
        repeats=args.repeats, threads=args.threads, prompt_frac=args.prompt_frac,
        batch=max(1, args.batch),
    )  # fmt: skip
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.probe is not None:  # a CPU measurement in its own process
        print(json.dumps(cpu_probe(json.loads(args.probe))))
        return 0
    horizons = ", ".join(H_HI_END if h is None else str(h) for h in args.h_hi)
    for device in args.device:
        if device == "cuda" and not torch.cuda.is_available():
            print("cuda: skipped, no CUDA device here (triton, SDPA and FA2 run only there)\n")
            continue
        cfg = config_for(device, args)
        if device == "cpu":
            where = f"{_cpu_name()}, {args.threads} torch threads, median of {args.reps}"
        else:
            import triton

            where = (f"{torch.cuda.get_device_name()}, triton {triton.__version__}, median of "
                     f"{args.repeats} do_bench medians")  # fmt: skip
        print(f"## span statistics on {device}: {where}\n")
        print(
            f"torch {torch.__version__}, {cfg['dtype']} q/k, Hq={cfg['heads']} "
            f"Hkv={cfg['kv_heads']} d={cfg['head_dim']}, batch={cfg['batch']}, "
            f"prompt_frac={args.prompt_frac}, W={args.window} h_lo={args.h_lo} "
            f"h_hi={horizons}; baseline {BASELINE[device]}; error vs float64 reference for "
            f"N <= {args.err_max_n}\n"
        )
        sys.stdout.flush()
        if device == "cpu":
            print("\n".join(table(bench_cpu(args, cfg), device)) + "\n")
        else:  # a table that grows one N at a time (ratios are per N)
            print("\n".join(table([], device)), flush=True)
            bench_cuda(
                args, cfg, lambda rows: print("\n".join(table(rows, "cuda")[2:]), flush=True)
            )
            print()
            print(
                "targets (bench/gpu_targets.py): time x fa2 <= 0.50 and x base <= 0.70 at "
                "h_hi=100, x fa2 <= 0.70 at h_hi=end; `triton*` rows are whole calls, "
                "`triton_kernel*` the launches alone.\n"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
