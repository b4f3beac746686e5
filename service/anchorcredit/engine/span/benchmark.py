"""The span statistics' benchmark: every backend side by side, one table per device.

    python -m anchorcredit.engine.span.benchmark                 # CPU table (+ CUDA if present)
    python -m anchorcredit.engine.span.benchmark --device cuda   # GPU: Qwen3-8B heads, 1K..32K
    python -m anchorcredit.engine.span.benchmark --device cuda --h-hi end   # analysis horizon
    python -m anchorcredit.engine.span.benchmark --device cpu --n 1024 2048 4096 8192

In the spirit of the Triton fused-attention tutorial's perf_report: for each N one row per
backend that runs on the device, with its time, its peak extra memory, both as ratios against
a baseline measured in the same run on the same inputs, the time against FlashAttention-2
(CUDA, when flash_attn is installed), and the max relative error of its statistics against
the float64 reference (for N <= --err-max-n; '-' above it). Without flash_attn the FA2
column is against `sdpa_flash`, the FlashAttention-2 kernels PyTorch ships:

    device  baseline                              rows
    cpu     reference (materialised attention)    reference, chunked [, triton under
                                                  TRITON_INTERPRET=1 with --interpret]
    cuda    the fastest SDPA backend of the run   sdpa_flash, sdpa_cudnn, sdpa_efficient,
            (cuDNN attention on Hopper, flash     fa2, triton, triton_kernel, chunked,
            elsewhere), causal, k/v expanded      eager

`triton` is the whole call as the runner makes it (check_finite=False, as the engine's
packed front passes it; host-side checks and the cached block tables included);
`triton_kernel` is the two kernel launches alone on a prepared plan (plan_packed), so
the difference is the host's share. With --gqa-pack, `triton_gqa` and `triton_kernel_gqa`
follow them: the same with the row pass's GQA group packed into one program (gqa_pack=True;
pick them with --backends for a packed vs one-head-per-program comparison). With
--overlap-off, `triton_kernel_nooverlap` follows: the launches with the QK^T dots not
pipelined (overlap_qk=False), against `triton_kernel` with the default (pipelined on sm_90+).
With --band-fold (a finite h_hi), `triton_fold` and `triton_kernel_fold` follow: FAI's band
summed in the row pass instead of a column pass (band="fold").
`fa2` is flash_attn_func (causal, GQA native).
`eager` is the materialised fp32 attention reduced with vectorised diagonals, what the
paper's extra `output_attentions` pass does (run where it fits in memory); on the GPU it
stands in for `reference`, whose literal per-column FAI loop would time Python, not the GPU.
The error is max over span, WAAD and FAI of max |got - ref| / max |ref| (each statistic
relative to its own scale), ref the float64 reference on the same (rounded) inputs.

Measurement. CPU: each (backend, N) runs in a fresh process, median of --reps calls after a
small warm-up, peak memory = ru_maxrss after the calls minus the resident size before them
(so the number belongs to that backend alone). CUDA: median of triton.testing.do_bench, peak
memory = torch.cuda.max_memory_allocated during one call minus the memory allocated before.
chunked and reference go through span_stats_packed, the runner's entry point. The
kernel's target: time x base <= 0.70 at Qwen3-8B shapes. The GPU-only rows are skipped,
with a line that says so, when there is no CUDA device.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from anchorcredit.contract import DEFAULTS, H_HI_END, parse_h_hi
from anchorcredit.engine.span import span_stats_packed
from anchorcredit.engine.span.reference import max_relative_error, span_stats_reference
from anchorcredit.engine.types import SpanStats

MIB = 1 << 20
COLUMNS = (
    "N", "backend", "ms", "peak MiB", "time x base", "memory x base", "time x fa2",
    "max rel err",
)  # fmt: skip
# The baseline per device: CPU the reference; CUDA the fastest SDPA backend of the run.
BASELINE = {"cpu": "reference", "cuda": "fastest sdpa_*"}
SDPA = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION",
        "sdpa_efficient": "EFFICIENT_ATTENTION"}  # fmt: skip
# Per device: sizes and shapes when the flags leave them out (CUDA: Qwen3-8B's heads).
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {"n": [1024, 2048, 4096], "heads": 4, "kv_heads": 2, "head_dim": 64,
            "dtype": "float32"},
    "cuda": {"n": [1024, 4096, 8192, 16384, 32768], "heads": 32, "kv_heads": 8,
             "head_dim": 128, "dtype": "bfloat16"},
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m anchorcredit.engine.span.benchmark",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
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
    ap.add_argument("--h-hi", default=str(DEFAULTS.h_hi), help=f"an int or '{H_HI_END}'")
    ap.add_argument(
        "--err-max-n",
        type=int,
        default=2048,
        help="measure the error against float64 for N up to this",
    )
    ap.add_argument("--reps", type=int, default=3, help="CPU: calls per measurement (median)")
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
        "--gqa-pack",
        action="store_true",
        help="CUDA: add triton_gqa / triton_kernel_gqa rows (the row pass's GQA group packed)",
    )
    ap.add_argument(
        "--overlap-off",
        action="store_true",
        help="CUDA: add a triton_kernel_nooverlap row (overlap_qk=False: QK^T not pipelined)",
    )
    ap.add_argument(
        "--band-fold",
        action="store_true",
        help="CUDA: add triton_fold / triton_kernel_fold rows (band='fold', finite h_hi)",
    )
    for name in ("block-m", "block-n", "num-warps", "num-stages", "col-block-m", "col-block-n"):
        ap.add_argument(f"--{name}", type=int, default=None, help="CUDA: kernel launch option")
    args = ap.parse_args(argv)
    args.h_hi = parse_h_hi(args.h_hi)
    return args  # fmt: skip


# -- shared pieces --------------------------------------------------------------------------


def make_qk(hq: int, hkv: int, n: int, d: int, dtype: torch.dtype, device: str):
    gen = torch.Generator(device=device).manual_seed(n)
    q = torch.randn(hq, n, d, generator=gen, device=device, dtype=dtype)
    k = torch.randn(hkv, n, d, generator=gen, device=device, dtype=dtype)
    return q, k


def max_rel_err(got: SpanStats, ref: SpanStats) -> float:
    """Max over span, WAAD, FAI of max |got - ref| / max |ref| (reference.max_relative_error)."""
    return max_relative_error(got, ref)


def float64_reference(q, k, prompt_len: int, cfg: dict[str, Any]) -> SpanStats:
    scale = q.shape[-1] ** -0.5
    return span_stats_reference(
        q.double(), k.double(), prompt_len, cfg["window"], cfg["h_lo"], cfg["h_hi"], scale
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


LAUNCH_OPTIONS = ("block_m", "block_n", "num_warps", "num_stages", "col_block_m", "col_block_n")


def stats_fn(backend: str, q, k, prompt_len: int, cfg: dict[str, Any]) -> Callable[[], Any]:
    """A no-argument call of `backend` on one sequence, as the runner would make it."""
    n, scale = q.shape[1], q.shape[-1] ** -0.5
    horizon = (cfg["window"], cfg["h_lo"], cfg["h_hi"], scale)
    launch = {o: cfg.get(o) for o in LAUNCH_OPTIONS}
    if backend.endswith("_gqa"):  # the same kernel with the row pass's GQA group packed
        backend, launch["gqa_pack"] = backend.removesuffix("_gqa"), True
    if backend.endswith("_nooverlap"):  # the same kernel with its QK^T dots not pipelined
        backend, launch["overlap_qk"] = backend.removesuffix("_nooverlap"), False
    if backend.endswith("_fold"):  # the same kernel with FAI's band summed in the row pass
        backend, launch["band"] = backend.removesuffix("_fold"), "fold"
    if backend == "triton":  # the whole call, as the engine's packed front makes it
        from anchorcredit.engine.span import triton_kernel

        return lambda: triton_kernel.span_stats_packed(
            q, k, [0, n], [prompt_len], *horizon, check_finite=False, **launch
        )[0]
    if backend == "triton_kernel":  # the two launches alone, on a prepared plan
        from anchorcredit.engine.span import triton_kernel

        plan = triton_kernel.plan_packed(
            q, k, [0, n], [prompt_len], *horizon, check_finite=False, **launch
        )
        return plan.run
    if backend == "eager":
        return lambda: eager_stats(q, k, prompt_len, *horizon)
    if backend == "fa2":
        from flash_attn import flash_attn_func  # GQA native: k/v keep their Hkv heads

        qf, kf = q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0)
        vf = torch.randn_like(kf)
        return lambda: flash_attn_func(qf, kf, vf, causal=True)
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
    return lambda: span_stats_packed(q, k, [0, n], [prompt_len], *horizon, backend=backend)[0]


# -- CPU: one fresh process per measurement --------------------------------------------------


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


def cpu_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Run in a fresh process: time, peak extra memory and error of one (backend, N)."""
    if spec["backend"] == "triton":
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel is jitted, on first use
    torch.set_num_threads(spec["threads"])
    n, dtype = spec["n"], getattr(torch, spec["dtype"])
    q, k = make_qk(spec["heads"], spec["kv_heads"], n, spec["head_dim"], dtype, "cpu")
    prompt_len = spec["prompt_len"]
    w = min(n, 128)  # warm-up on a prefix: kernels and allocator, not the peak
    stats_fn(spec["backend"], q[:, :w], k[:, :w], min(prompt_len, w - 1), spec)()
    call = stats_fn(spec["backend"], q, k, prompt_len, spec)
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
        out["err"] = max_rel_err(got, float64_reference(q, k, prompt_len, spec))
    return out


def _run_probe(spec: dict[str, Any]) -> dict[str, Any]:
    code = (
        "import json, sys\n"
        "from anchorcredit.engine.span.benchmark import cpu_probe\n"
        "print(json.dumps(cpu_probe(json.loads(sys.argv[1]))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True
    )
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines() or [f"exit {out.returncode}"]
        return {"error": lines[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_cpu(args: argparse.Namespace, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    backends = ["reference", "chunked"] + (["triton"] if args.interpret else [])
    rows = []
    for n in cfg["n"]:
        for backend in backends:
            spec = {**cfg, "backend": backend, "n": n, "prompt_len": prompt_len_of(args, n)}
            rows.append({"n": n, "backend": backend, **_run_probe(spec)})
    return rows


# -- CUDA: in process, do_bench and the caching allocator's peak -----------------------------


def bench_cuda(
    args: argparse.Namespace,
    cfg: dict[str, Any],
    on_size: Callable[[list[dict]], None] | None = None,
) -> list[dict[str, Any]]:
    """The CUDA rows; on_size(rows of one N) after each N, so a run cut short by a time
    limit still leaves the sizes it finished."""
    from triton.testing import do_bench

    dtype = getattr(torch, cfg["dtype"])
    rows = []
    for n in cfg["n"]:
        q, k = make_qk(cfg["heads"], cfg["kv_heads"], n, cfg["head_dim"], dtype, "cuda")
        prompt_len = prompt_len_of(args, n)
        ref = float64_reference(q, k, prompt_len, cfg) if n <= cfg["err_max_n"] else None
        backends = [*SDPA, "triton", "triton_kernel", "chunked"]
        if args.gqa_pack:
            backends[backends.index("chunked") : 0] = ["triton_gqa", "triton_kernel_gqa"]
        if args.overlap_off:
            backends.insert(backends.index("triton_kernel") + 1, "triton_kernel_nooverlap")
        if args.band_fold and cfg["h_hi"] is not None:
            backends[backends.index("chunked") : 0] = ["triton_fold", "triton_kernel_fold"]
        if importlib.util.find_spec("flash_attn") is not None:
            backends.insert(len(SDPA), "fa2")
        # bytes: 16-bit scores, fp32 attention, one fp32 temporary (the eager pass's peak)
        if not args.no_eager and 12 * cfg["heads"] * n * n < 0.8 * torch.cuda.mem_get_info()[0]:
            backends.append("eager")
        if args.backends:
            backends = [b for b in dict.fromkeys([*backends, "eager"]) if b in args.backends]
        for backend in backends:
            row: dict[str, Any] = {"n": n, "backend": backend, "err": None}
            try:
                call = stats_fn(backend, q, k, prompt_len, cfg)
                got = call()  # compiles / warms up outside the timing
                torch.cuda.synchronize()
                if ref is not None and isinstance(got, SpanStats):
                    row["err"] = max_rel_err(got, ref)
                del got
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                call()
                torch.cuda.synchronize()
                row["mib"] = (torch.cuda.max_memory_allocated() - base) / MIB
                row["ms"] = do_bench(call, return_mode="median")
                del call
            except torch.cuda.OutOfMemoryError:
                row = {"n": n, "backend": backend, "error": "out of memory"}
            except RuntimeError as err:  # an SDPA backend this card or shape does not have
                row = {"n": n, "backend": backend, "error": str(err).splitlines()[0][:60]}
            rows.append(row)
            torch.cuda.empty_cache()
        del q, k, ref
        torch.cuda.empty_cache()
        if on_size is not None:
            on_size([r for r in rows if r["n"] == n])
    return rows


# -- the table -------------------------------------------------------------------------------


def prompt_len_of(args: argparse.Namespace, n: int) -> int:
    return min(n - 1, max(1, int(args.prompt_frac * n)))


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def baseline_rows(rows: list[dict[str, Any]], device: str) -> dict[int, dict[str, Any]]:
    """The baseline row per N: the reference on the CPU, the fastest SDPA backend on CUDA."""
    ok = [r for r in rows if "error" not in r]
    if device == "cpu":
        return {r["n"]: r for r in ok if r["backend"] == "reference"}
    base: dict[int, dict[str, Any]] = {}
    for r in ok:
        if r["backend"] in SDPA and (r["n"] not in base or r["ms"] < base[r["n"]]["ms"]):
            base[r["n"]] = r
    return base


def fa2_rows(rows: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """FlashAttention-2's forward per N: flash_attn's `fa2` row where it ran, else PyTorch's
    SDPA flash backend (`sdpa_flash`: the FlashAttention-2 kernels PyTorch ships), so the
    column is filled on machines without the flash_attn package."""
    ok = [r for r in rows if "error" not in r]
    out = {r["n"]: r for r in ok if r["backend"] == "sdpa_flash"}
    out.update({r["n"]: r for r in ok if r["backend"] == "fa2"})
    return out


def table(rows: list[dict[str, Any]], device: str) -> list[str]:
    """Markdown lines: one row per (N, backend), ratios against the device's baseline and
    FlashAttention-2 at the same N; the baseline row's name is marked with '(base)'."""
    base = baseline_rows(rows, device)
    fa2 = fa2_rows(rows)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---:|---|" + "---:|" * (len(COLUMNS) - 2)]
    for r in rows:
        if "error" in r:
            cells = [str(r["n"]), r["backend"], r["error"], *["-"] * (len(COLUMNS) - 3)]
            lines.append("| " + " | ".join(cells) + " |")
            continue
        b, f = base.get(r["n"]), fa2.get(r["n"])
        name = r["backend"] + (" (base)" if b is r and device == "cuda" else "")
        t_ratio = r["ms"] / b["ms"] if b else None
        m_ratio = r["mib"] / max(b["mib"], 1.0) if b else None
        f_ratio = r["ms"] / f["ms"] if f else None
        lines.append(
            f"| {r['n']} | {name} | {r['ms']:.2f} | {r['mib']:.0f} | "
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
    cfg.update(
        window=args.window, h_lo=args.h_lo, h_hi=args.h_hi, err_max_n=args.err_max_n,
        reps=args.reps, threads=args.threads, gqa_pack=args.gqa_pack,
        block_m=args.block_m, block_n=args.block_n, num_warps=args.num_warps,
        num_stages=args.num_stages, col_block_m=args.col_block_m, col_block_n=args.col_block_n,
    )  # fmt: skip
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    h_hi = H_HI_END if args.h_hi is None else args.h_hi
    for device in args.device:
        if device == "cuda" and not torch.cuda.is_available():
            print("cuda: skipped, no CUDA device here (triton, SDPA and FA2 run only there)\n")
            continue
        cfg = config_for(device, args)
        if device == "cpu":
            where = f"{_cpu_name()}, {args.threads} torch threads, median of {args.reps}"
        else:
            import triton

            where = f"{torch.cuda.get_device_name()}, triton {triton.__version__}, do_bench median"
        print(f"## span statistics on {device}: {where}\n")
        print(
            f"torch {torch.__version__}, {cfg['dtype']} q/k, Hq={cfg['heads']} "
            f"Hkv={cfg['kv_heads']} d={cfg['head_dim']}, prompt_frac={args.prompt_frac}, "
            f"W={args.window} h_lo={args.h_lo} h_hi={h_hi}; baseline {BASELINE[device]}; "
            f"error vs float64 reference for N <= {args.err_max_n}\n"
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
        if device == "cuda":
            print(
                "target: triton time x base (the fastest SDPA) <= 0.70. time x fa2: against "
                "flash_attn's fa2 where installed, else sdpa_flash (PyTorch's FlashAttention-2). "
                "eager runs where it fits (12 * Hq * N^2 bytes < 80% of free memory) unless "
                "--no-eager.\n"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
