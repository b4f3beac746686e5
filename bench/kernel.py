"""Span kernel benchmark: the fused Triton kernel vs PyTorch SDPA's flash forward.

    python bench/kernel.py                 # GPU: N in 1K..32K, Qwen3-8B head shapes
    python bench/kernel.py --smoke         # CPU: one tiny size under TRITON_INTERPRET

For each N it prints the kernel's time, SDPA flash forward time for the same shape (q
[1, 32, N, 128], causal, k/v expanded to 32 heads), their ratio (target <= 0.7), the
eager path's time and peak memory (materialised fp32 attention, as the paper's extra pass
does) where it fits, and the kernel's peak extra memory (O(N)). The kernel covers every
row (prompt length 1) unless --prompt-frac says otherwise, so the work matches SDPA's.
Times are medians of triton.testing.do_bench; the kernel call includes its host-side
block tables and the cu_seqlens read (check_finite=False, as the runner calls it).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

GIB = 1 << 30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ns", default="1024,4096,8192,16384,32768", help="sequence lengths")
    ap.add_argument("--heads", type=int, default=32, help="query heads (Qwen3-8B: 32)")
    ap.add_argument("--kv-heads", type=int, default=8, help="key/value heads (Qwen3-8B: 8)")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--prompt-frac", type=float, default=0.0, help="prompt share of N")
    ap.add_argument("--h-hi", default="100", help="FAI horizon, or 'end'")
    ap.add_argument("--block-m", type=int, default=None)
    ap.add_argument("--block-n", type=int, default=None)
    ap.add_argument("--num-warps", type=int, default=None)
    ap.add_argument("--num-stages", type=int, default=None)
    ap.add_argument("--no-eager", action="store_true", help="skip the materialised baseline")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU-interpreted run, no GPU")
    return ap.parse_args(argv)


def eager_stats(q, k, prompt_len, window, h_lo, h_hi, scale):
    """SPEC.md statistics from the materialised fp32 attention (the paper's eager pass)."""
    hq, n, _ = q.shape
    kk = k.repeat_interleave(hq // k.shape[0], dim=0)
    scores = torch.matmul(q, kk.transpose(1, 2)).float().mul_(scale)
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
    top = n - 1 if h_hi is None else h_hi
    if h_hi is None:
        fai = attn.tril_(-h_lo)[:, prompt_len:, prompt_len:].sum(1)
    else:
        for o in range(h_lo, min(top, n - 1) + 1):  # A[s+o, s] for s >= P
            diag = attn.diagonal(offset=-o, dim1=1, dim2=2)[:, prompt_len:]
            fai[:, : diag.shape[1]] += diag
    s = torch.arange(prompt_len, n, device=q.device)
    last = torch.full_like(s, n - 1) if h_hi is None else (s + h_hi).clamp(max=n - 1)
    count = (last - s - h_lo + 1).clamp(min=0)
    fai = torch.where(count > 0, fai / count.clamp(min=1), torch.zeros_like(fai))
    return span, waad, fai


def smoke(args: argparse.Namespace) -> int:
    os.environ["TRITON_INTERPRET"] = "1"
    from anchorcredit.engine import span_stats
    from anchorcredit.engine.span.triton_kernel import span_stats_packed

    gen = torch.Generator().manual_seed(0)
    n, prompt_len = 96, 8
    q = torch.randn(4, n, 16, generator=gen)
    k = torch.randn(2, n, 16, generator=gen)
    start = time.perf_counter()
    (got,) = span_stats_packed(q, k, [0, n], [prompt_len], block_m=32, block_n=32)
    took = time.perf_counter() - start
    ref = span_stats(q.double(), k.double(), prompt_len, backend="reference")
    err = max(
        float((getattr(got, f).double() - getattr(ref, f)).abs().max())
        / max(1.0, float(getattr(ref, f).abs().max()))
        for f in ("span", "waad", "fai")
    )
    print(f"smoke (CPU, TRITON_INTERPRET=1): N={n} Hq=4 Hkv=2 d=16  {took:.2f} s  "
          f"max rel err vs reference {err:.1e}")  # fmt: skip
    return 0 if err <= 1e-4 else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        return smoke(args)
    if not torch.cuda.is_available():
        print(
            "bench/kernel.py needs a CUDA GPU (none found). Run it on the GPU box, or run\n"
            "`python bench/kernel.py --smoke` for a tiny CPU-interpreted correctness check.",
            file=sys.stderr,
        )
        return 2

    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    from anchorcredit.engine.span.triton_kernel import span_stats_packed

    dtype = getattr(torch, args.dtype)
    hq, hkv, d = args.heads, args.kv_heads, args.head_dim
    h_hi = None if args.h_hi == "end" else int(args.h_hi)
    scale = d**-0.5
    launch = {
        "block_m": args.block_m, "block_n": args.block_n,
        "num_warps": args.num_warps, "num_stages": args.num_stages,
    }  # fmt: skip
    dev = torch.device("cuda")
    import triton

    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"triton {triton.__version__}")  # fmt: skip
    print(f"shape: Hq={hq} Hkv={hkv} d={d} {args.dtype}  prompt_frac={args.prompt_frac}  "
          f"W=10 h_lo=10 h_hi={args.h_hi}")  # fmt: skip
    head = (f"{'N':>6} {'kernel ms':>10} {'sdpa ms':>9} {'ratio':>6} {'eager ms':>9} "
            f"{'eager GiB':>9} {'kernel MiB':>10} {'rel err':>8}")  # fmt: skip
    print(head)
    for n in [int(x) for x in args.ns.split(",")]:
        gen = torch.Generator(device=dev).manual_seed(n)
        q = torch.randn(hq, n, d, generator=gen, device=dev, dtype=dtype)
        k = torch.randn(hkv, n, d, generator=gen, device=dev, dtype=dtype)
        prompt_len = max(1, int(args.prompt_frac * n))

        def kernel(q=q, k=k, n=n, prompt_len=prompt_len):
            return span_stats_packed(q, k, [0, n], [prompt_len], 10, 10, h_hi, scale,
                                     check_finite=False, **launch)  # fmt: skip

        got = kernel()[0]  # compile outside the timing
        torch.cuda.synchronize()
        t_kernel = do_bench(kernel, return_mode="median")
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        kernel()
        torch.cuda.synchronize()
        kernel_mib = (torch.cuda.max_memory_allocated() - base) / (1 << 20)

        qs = q.unsqueeze(0)
        ks = k.repeat_interleave(hq // hkv, dim=0).unsqueeze(0)
        vs = torch.randn_like(ks)

        def sdpa(qs=qs, ks=ks, vs=vs):
            return F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # errors out rather than fall back
            t_sdpa = do_bench(sdpa, return_mode="median")
        del qs, ks, vs

        eager_ms = eager_gib = err = None
        need = 12 * hq * n * n  # bytes: bf16 scores, fp32 attention, one fp32 temporary
        if not args.no_eager and need < 0.8 * torch.cuda.mem_get_info()[0]:
            try:
                args_e = (q, k, prompt_len, 10, 10, h_hi, scale)
                span, waad, fai = eager_stats(*args_e)
                err = max(
                    float((a - b).abs().max()) / max(1.0, float(b.abs().max()))
                    for a, b in ((got.span, span), (got.waad, waad), (got.fai, fai))
                )
                del span, waad, fai
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                eager_stats(*args_e)
                torch.cuda.synchronize()
                eager_gib = (torch.cuda.max_memory_allocated() - base) / GIB
                eager_ms = do_bench(lambda a=args_e: eager_stats(*a), warmup=2, rep=20,
                                    return_mode="median")  # fmt: skip
            except torch.cuda.OutOfMemoryError:
                eager_ms = eager_gib = None
            torch.cuda.empty_cache()

        def fmt(x, spec):
            return format(x, spec) if x is not None else "-"

        print(f"{n:>6} {t_kernel:>10.3f} {t_sdpa:>9.3f} {t_kernel / t_sdpa:>6.2f} "
              f"{fmt(eager_ms, '>9.2f')} {fmt(eager_gib, '>9.2f')} {kernel_mib:>10.1f} "
              f"{fmt(err, '>8.1e')}")  # fmt: skip
        del q, k, got
        torch.cuda.empty_cache()
    print("target: ratio <= 0.70; eager '-' = skipped (would not fit) or --no-eager")
    return 0


if __name__ == "__main__":
    sys.exit(main())
